"""Persistent sessions: the registry, the state directory and its path rules.

A SessionRecord names an engine Session for HTTP clients. Its `session` is touched only on
the worker thread; its `busy` flag only on the event loop (a request or operation holds it).
With a state directory, sessions are written through the state-file format
(`sessions/<id>.state`, atomic writes) after every request and operation that changes them
and on shutdown, and loaded back at startup.

Paths a client names (`state_file`, snapshot `name`) are relative to the state directory and
must stay inside it: absolute paths, `..`, backslashes and symlinks that lead outside are
refused. `sessions/` is the server's own and cannot be written by name.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from ..errors import StateError
from .protocol import APIError

if TYPE_CHECKING:
    from ..runtime.session import Session

log = logging.getLogger("rwkvstate.server")

SESSION_ID = re.compile(r"sess_[0-9a-f]{16}")
SESSIONS_DIR = "sessions"
SNAPSHOTS_DIR = "snapshots"


@dataclass(eq=False)
class SessionRecord:
    id: str
    created: int  # unix time
    session: Session  # the engine Session (worker thread only)
    busy: bool = False  # held by a request or operation (event loop only)


class SessionStore:
    def __init__(self, state_dir: Path | None):
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.records: dict[str, SessionRecord] = {}

    @property
    def persistent(self) -> bool:
        return self.state_dir is not None

    @property
    def _dir(self) -> Path:
        """The state directory (callers check `persistent` or answer 400 first)."""
        assert self.state_dir is not None
        return self.state_dir

    # ---- event loop ----------------------------------------------------------------------------
    def get(self, session_id: str, param: str | None = None) -> SessionRecord:
        record = self.records.get(session_id)
        if record is None:
            raise APIError(404, f"no session {session_id!r}", param=param, code="session_not_found")
        return record

    def acquire(self, session_id: str, param: str | None = None) -> SessionRecord:
        """The record, marked busy; 409 if a request or operation is using it."""
        record = self.get(session_id, param)
        if record.busy:
            raise APIError(409, f"session {session_id!r} is busy with another request; retry when it is done",
                           param=param, code="session_busy")  # fmt: skip
        record.busy = True
        return record

    @staticmethod
    def release(record: SessionRecord) -> None:
        record.busy = False

    # ---- worker thread -------------------------------------------------------------------------
    def create(self, engine, state_file: Path | None = None, name: str | None = None) -> SessionRecord:
        """A new session, started from a state file or a state-tuning file when given."""
        session = engine.session()
        try:
            if state_file is not None:
                _load_file(session, state_file, name or state_file.name)
            record = SessionRecord(_new_id(self.records), int(time.time()), session)
            self.persist(record)
        except BaseException:
            session.close()
            raise
        return record

    def fork(self, engine, record: SessionRecord) -> SessionRecord:
        """A new session with a copy of the record's state, token log and undo points (through
        the host tier when no second slot can be had, e.g. on a one-slot server)."""
        child = record.session.fork()
        new = SessionRecord(_new_id(self.records), int(time.time()), child)
        try:
            self.persist(new)
        except BaseException:
            child.close()
            raise
        return new

    def delete(self, record: SessionRecord) -> None:
        """Removes the file first: if that fails, the session is still there, in memory and on disk."""
        if self.persistent:
            self._file(record.id).unlink(missing_ok=True)
        record.session.close()

    def persist(self, record: SessionRecord) -> None:
        if self.persistent:
            from ..runtime.persist import save_session

            path = self._file(record.id)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_session(record.session, path, extra={"server_session": {"id": record.id, "created": record.created}})

    def snapshot(self, record: SessionRecord, name: str | None) -> dict:
        """Saves the session to a state file in the state directory; returns its name and size."""
        from ..runtime.persist import save_session

        if name is None:
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            name = f"{SNAPSHOTS_DIR}/{record.id}-{stamp}-{secrets.token_hex(2)}.state"
        path = self.resolve(name, "name", must_exist=False)
        if SESSIONS_DIR in path.relative_to(self._dir.resolve()).parts[:1]:
            raise APIError(400, f"{SESSIONS_DIR}/ belongs to the server's own session files", param="name")
        if path.exists():
            raise APIError(409, f"a file named {name!r} already exists in the state directory", param="name",
                           code="file_exists")  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        save_session(record.session, path)
        return {"name": name, "tokens": len(record.session.tokens), "bytes": path.stat().st_size}

    def load_all(self, engine) -> int:
        """Loads every saved session of the state directory; returns how many. A bad file is
        logged and left where it is."""
        from ..runtime.persist import load_session

        if not self.persistent:
            return 0
        self._dir.mkdir(parents=True, exist_ok=True)
        for path in sorted((self._dir / SESSIONS_DIR).glob("sess_*.state")):
            if not SESSION_ID.fullmatch(path.stem):
                continue
            session = engine.session()
            try:
                loaded = load_session(session, path)
            except StateError as e:
                log.warning("skipping saved session %s: %s", path.name, e)
                session.close()
                continue
            created = loaded.extra.get("server_session", {}).get("created", int(time.time()))
            self.records[path.stem] = SessionRecord(path.stem, int(created), session)
        return len(self.records)

    def save_all(self) -> None:
        for record in list(self.records.values()):
            try:
                self.persist(record)
            except Exception:
                log.exception("saving session %s failed", record.id)

    @staticmethod
    def info(engine, record: SessionRecord) -> dict:
        session = record.session
        where = session.location
        return {"id": record.id, "object": "session", "created": record.created, "tokens": len(session.tokens),
                "location": where, "resident": session.is_resident}  # fmt: skip

    # ---- paths -----------------------------------------------------------------------------------
    def _file(self, session_id: str) -> Path:
        return self._dir / SESSIONS_DIR / f"{session_id}.state"

    def resolve(self, name: str, param: str, must_exist: bool = True) -> Path:
        """The path of `name` inside the state directory; APIError if it is not allowed."""
        if self.state_dir is None:
            raise APIError(400, "this server has no state directory (start it with --state-dir)", param=param)
        pure = PurePosixPath(name)
        if (not name or "\x00" in name or "\\" in name or pure.is_absolute() or ".." in pure.parts
                or re.match(r"[A-Za-z]:", name)):  # fmt: skip
            raise APIError(400, f"{param} must be a relative path inside the state directory, without '..'",
                           param=param)  # fmt: skip
        root = self.state_dir.resolve()
        path = (root / pure).resolve()  # follows symlinks, so a link pointing outside is caught
        if path == root or root not in path.parents:
            raise APIError(400, f"{param} {name!r} leads outside the state directory", param=param)
        if must_exist and not path.is_file():
            raise APIError(404, f"no state file {name!r} in the state directory", param=param,
                           code="state_file_not_found")  # fmt: skip
        return path


def _new_id(taken) -> str:
    while True:
        session_id = f"sess_{secrets.token_hex(8)}"
        if session_id not in taken:
            return session_id


def _load_file(session, path: Path, name: str) -> None:
    """Loads an rwkvstate state file or a state-tuning file (told apart by the safetensors
    metadata) into a fresh session. Error messages name the file as the client did."""
    from ..state.convert import load_state_tuning_file
    from ..runtime.persist import load_session
    from ..state.files import FORMAT_NAME

    try:
        if _format(path) == FORMAT_NAME:
            load_session(session, path)
        else:
            c = session.engine.model.config
            session.load_state(load_state_tuning_file(path, c.n_layer, c.n_embd, c.head_size))
    except StateError as e:
        raise APIError(400, str(e).replace(str(path), name), param="state_file", code="invalid_state_file") from None


def _format(path: Path) -> str | None:
    """The `format` metadata of a safetensors file; None for anything else."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:
        return None
