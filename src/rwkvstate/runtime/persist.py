"""Saving and loading sessions as state files (state/files.py holds the format).

A saved session is its state in the pool's storage dtype, its token log, its next-token
logits, and in the metadata whether the state is the zero state fed with the log (`from_zero`)
and the session's undo points, so undo works across a save and a load.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import StateError
from ..state.files import StateFile, read_state_file, save_state_file
from .session import SessionSnapshot

if TYPE_CHECKING:
    from .session import Session


def save_session(session: Session, path: str | Path, *, extra: Mapping | None = None) -> Path:
    """Saves a session's state (in its pool's storage dtype), token log and logits."""
    snap = session.snapshot()
    assert isinstance(snap.state, dict)  # fmt None: the canonical dict
    engine = session.engine
    return save_state_file(
        path, snap.state, fingerprint=engine.model.fingerprint, model_info=engine.model.description,
        storage_dtype=engine.pool.dtype, tokens=snap.tokens, logits=snap.logits,
        extra={"from_zero": snap.from_zero, "undo_points": session.undo_points, **(extra or {})},
    )  # fmt: skip


def load_session(session: Session, path: str | Path) -> StateFile:
    """Restores a session from a state file, validated completely (model fingerprint, pool
    layout, vocab, range of the pool's storage dtype) before anything is written."""
    engine = session.engine
    model = engine.model
    sf = read_state_file(
        path, fingerprint=model.fingerprint, layout=engine.pool.layout,
        vocab_size=model.config.vocab_size, model_info=model.description,
    )  # fmt: skip
    try:
        engine.pool.check_fits(sf.state)
    except StateError as e:
        raise StateError(f"{path}: {e}") from None
    # from_zero: the writer's word that the token log, fed from the zero state, gives this state;
    # it lets the loaded session roll back before the loaded point by re-feeding
    from_zero = bool((sf.extra or {}).get("from_zero", False))
    session.restore(SessionSnapshot(sf.state, sf.tokens, sf.logits, from_zero=from_zero))
    marks = (sf.extra or {}).get("undo_points", [])
    if from_zero and isinstance(marks, list) and all(isinstance(m, int) and 0 <= m < len(sf.tokens) for m in marks):
        engine.timeline.set_undo_points(session, marks)  # undo works across a save and load
    return sf
