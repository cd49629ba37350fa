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
from ..state.files import StateFile, decode_state_file, encode_state_file, read_state_file, save_state_file
from .session import SessionSnapshot

if TYPE_CHECKING:
    from .session import Session


def save_session(session: Session, path: str | Path, *, extra: Mapping | None = None) -> Path:
    """Saves a session's state (in its pool's storage dtype), token log and logits."""
    return save_state_file(path, **_file_fields(session, None, extra))


def session_bytes(session: Session, storage_dtype=None, *, extra: Mapping | None = None) -> bytes:
    """The session as the bytes of a state file, for a store that is not a file system;
    storage_dtype: fp32, fp16, bf16 or int8 (default: the pool's storage dtype)."""
    return encode_state_file(**_file_fields(session, storage_dtype, extra))


def _file_fields(session: Session, storage_dtype, extra: Mapping | None) -> dict:
    snap = session.snapshot()
    assert isinstance(snap.state, dict)  # fmt None: the canonical dict
    engine = session.engine
    return dict(
        state=snap.state, fingerprint=engine.model.fingerprint, model_info=engine.model.description,
        storage_dtype=engine.pool.dtype if storage_dtype is None else storage_dtype, tokens=snap.tokens,
        logits=snap.logits, extra={"from_zero": snap.from_zero, "undo_points": session.undo_points, **(extra or {})},
    )  # fmt: skip


def load_session(session: Session, path: str | Path, *, allow_other_weights: bool = False) -> StateFile:
    """Restores a session from a state file, validated completely (model fingerprint, pool
    layout, vocab, range of the pool's storage dtype, the session metadata) before anything is
    written. allow_other_weights: accept a file saved from other weights of the same shape (a
    state tuned on a base model, loaded into its fine-tune)."""
    read = lambda **checks: read_state_file(path, allow_other_weights=allow_other_weights, **checks)  # noqa: E731
    return _restore(session, read, path)


def load_session_bytes(session: Session, data: bytes, name: str) -> StateFile:
    """load_session for the bytes of a state file; messages name it `name`."""
    return _restore(session, lambda **checks: decode_state_file(data, name=name, **checks), name)


def _restore(session: Session, read, path) -> StateFile:
    engine = session.engine
    model = engine.model
    sf = read(fingerprint=model.fingerprint, layout=engine.pool.layout, vocab_size=model.config.vocab_size,
              model_info=model.description)  # fmt: skip
    try:
        engine.pool.check_fits(sf.state)
    except StateError as e:
        raise StateError(f"{path}: {e}") from None
    from_zero, marks = _session_meta(path, sf)
    if sf.is_empty and session.location == "none" and not session.tokens:
        return sf  # a new session already is what the file holds: it takes no slot and no memory
    session.restore(SessionSnapshot(sf.state, sf.tokens, sf.logits, from_zero=from_zero))
    if from_zero and all(0 <= m < len(sf.tokens) for m in marks):
        engine.timeline.set_undo_points(session, marks)  # undo works across a save and load
    return sf


def _session_meta(path, sf: StateFile) -> tuple[bool, list[int]]:
    """(from_zero, undo points) from the file's `extra`. from_zero: the writer's word that the
    token log, fed from the zero state, gives this state; it lets the loaded session roll back
    before the loaded point by re-feeding."""
    from_zero = sf.extra.get("from_zero", sf.is_empty)
    marks = sf.extra.get("undo_points", [])
    if not isinstance(from_zero, bool):
        raise StateError(f"{path}: metadata from_zero must be true or false, got {from_zero!r}")
    if not isinstance(marks, list) or not all(type(m) is int for m in marks):
        raise StateError(f"{path}: metadata undo_points must be a list of token positions")
    return from_zero, marks
