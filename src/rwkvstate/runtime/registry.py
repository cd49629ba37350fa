"""Named sessions of the engine core: the registry, the state directory and its path rules.

A SessionRecord names an engine Session for API clients (`sess_<hex>`). The engine core owns
the registry and touches it only on its own thread, so `busy` (a request or operation holds
the session) is decided in one place for every API process. With a state directory, sessions are written through the state-file format
(`sessions/<id>.state`, atomic writes) after every request and operation that changes them,
before it is answered, and on shutdown; they are loaded back at startup, where a bad file of
any kind is logged, counted and skipped, and temporary files of interrupted writes are removed.
With a shared store (shared.py: Redis, for replicas), sessions are written there instead, and a
session whose copy here is missing or older than the stored one is loaded from it first (`sync`).
Limits: the number of sessions (`max_sessions`), and through Storage (storage.py) the bytes of
the state directory and the number of snapshot files.

Paths a client names (`state_file`, snapshot `name`) are relative to the state directory and
must stay inside it: absolute paths, `..`, backslashes and symlinks that lead outside are
refused, and so are names over MAX_NAME_CHARS characters, MAX_NAME_PARTS components or 255
bytes in one component. `sessions/` is the server's own and cannot be written by name.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Iterator

from ..errors import RequestError, RwkvStateError, StateError, StorageError
from .storage import SESSIONS_DIR, Storage

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("rwkvstate.core")

SESSION_ID = re.compile(r"sess_[0-9a-f]{16}")
SNAPSHOTS_DIR = "snapshots"
MAX_NAME_CHARS = 1024  # a client-given file name (state_file, snapshot name)
MAX_NAME_PARTS = 32  # path components of such a name
EMPTY_FILE_BYTES = 4096  # about what the file of an empty session takes (no state stored)


@dataclass(eq=False)
class SessionRecord:
    id: str
    created: int  # unix time
    session: Session  # the engine Session
    busy: bool = False  # held by a request or operation
    version: int = 0  # with a shared store: the stored version this copy is (0: not stored yet, -1: stale)


class SessionStore:
    def __init__(self, state_dir: Path | None, max_sessions: int | None = None, max_state_dir_bytes: int | None = None,
                 max_snapshots: int | None = None, allow_other_weights: bool = False, file_bytes: int = 0,
                 shared=None):  # fmt: skip
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.records: dict[str, SessionRecord] = {}
        self.max_sessions = max_sessions
        self.storage = Storage(self.state_dir, max_state_dir_bytes, max_snapshots)
        self.allow_other_weights = allow_other_weights
        self.file_bytes = file_bytes  # about what one saved session with a state takes on disk
        # a store shared with other cores (shared.py): sessions live there rather than in the
        # state directory, and are loaded on demand
        self.shared = shared

    @property
    def durable(self) -> bool:
        """Whether sessions are saved (in the state directory or a shared store)."""
        return self.persistent or self.shared is not None

    @property
    def persistent(self) -> bool:
        return self.state_dir is not None

    @property
    def _dir(self) -> Path:
        """The state directory (callers check `persistent` or answer 400 first)."""
        assert self.state_dir is not None
        return self.state_dir

    @property
    def roots(self) -> tuple[Path, ...]:
        """Directories whose paths never appear in an error message."""
        return () if self.state_dir is None else (self.state_dir,)

    # ---- holding a session ----------------------------------------------------------------------------
    def sync(self, engine, session_id: str | None) -> None:
        """With a shared store: makes this core's copy of the session the stored one (loading it
        if it is missing or older here; dropping it if the store no longer has it)."""
        if self.shared is None or session_id is None:
            return
        version = self.shared.version(session_id)
        record = self.records.get(session_id)
        if record is not None and (record.busy or record.version == version > 0):
            return  # current, or in use here (the request gets 409)
        if record is not None:
            del self.records[session_id]
            record.session.close()
        if version == 0:
            return  # not stored (any more): 404 follows
        fresh = self.shared.load(engine, session_id, SessionRecord)
        if fresh is not None:
            self.records[session_id] = fresh

    def get(self, session_id: str, param: str | None = None) -> SessionRecord:
        record = self.records.get(session_id)
        if record is None:
            raise RequestError(404, f"no session {session_id!r}", param=param, code="session_not_found")
        return record

    def acquire(self, session_id: str, param: str | None = None) -> SessionRecord:
        """The record, marked busy; 409 if a request or operation is using it."""
        record = self.get(session_id, param)
        if record.busy:
            raise RequestError(409, f"session {session_id!r} is busy with another request; retry when it is done",
                           param=param, code="session_busy")  # fmt: skip
        record.busy = True
        return record

    @staticmethod
    def release(record: SessionRecord) -> None:
        record.busy = False

    @contextmanager
    def held(self, session_id: str) -> Iterator[SessionRecord]:
        """The record, busy for the length of the block (an operation on the session): 409 if a
        request or operation is using it; released however the block ends."""
        record = self.acquire(session_id)
        try:
            yield record
        finally:
            self.release(record)

    def check_room(self, with_state: bool) -> None:
        """429 if a new session would pass a limit: the number of sessions, or the state
        directory's bytes (a session with a state takes about `file_bytes`)."""
        if self.max_sessions is not None and len(self.records) >= self.max_sessions:
            raise RequestError(429, f"this server holds {len(self.records)} sessions, its limit is "
                                    f"{self.max_sessions}: delete sessions first", code="session_limit")  # fmt: skip
        if self.persistent:
            self.storage.check_room(self.file_bytes if with_state else EMPTY_FILE_BYTES)

    # ---- operations -------------------------------------------------------------------------
    def create(self, engine, state_file: Path | None = None, name: str | None = None) -> SessionRecord:
        """A new session, started from a state file or a state-tuning file when given."""
        session = engine.session()
        try:
            if state_file is not None:
                _load_file(session, state_file, name or state_file.name, self.allow_other_weights)
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
        if self.shared is not None:
            self.shared.delete(record.id)
        elif self.persistent:
            path = self._file(record.id)
            size = path.stat().st_size if path.exists() else 0
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                raise StorageError(f"cannot remove the session's file: {e.strerror or e}") from e
            self.storage.removed(size)
        record.session.close()

    def persist(self, record: SessionRecord) -> None:
        """Saves the session (durably: fsync, rename, or to the shared store); StorageError if it
        cannot be written."""
        if self.shared is not None:
            self.shared.save(record)
        elif self.persistent:
            from .persist import save_session

            path = self._file(record.id)
            extra = {"server_session": {"id": record.id, "created": record.created}}
            self.storage.write(path, lambda: _save(save_session, record.session, path, extra))

    @contextmanager
    def saved_or_undone(self, record: SessionRecord):
        """Runs a change of the session, then saves it; if the save fails, the session is put back
        as it was (state, token log, logits, undo points) and the error goes on: a change that is
        reported as failed is never applied."""
        if not self.durable:
            yield
            return
        session = record.session
        before, marks = session.snapshot(), session.undo_points
        yield
        try:
            self.persist(record)
        except BaseException:
            session.restore(before)
            if before.from_zero:
                session.engine.timeline.set_undo_points(session, marks)
            raise

    def revert(self, record: SessionRecord, length: int) -> None:
        """Takes the session back to `length` tokens (where a failed request found it); if that
        cannot be done, reloads it from its file, which has the state of the last answered request."""
        session = record.session
        try:
            if len(session.tokens) > length:
                session.rollback(len(session.tokens) - length)
            return
        except Exception as e:
            log.warning("session %s: rollback after a failed request failed (%s); reloading its file", record.id, e)
        if self.shared is not None:
            record.version = -1  # stale: the next request reloads it from the store
        elif self.persistent and self._file(record.id).is_file():
            from .persist import load_session

            load_session(session, self._file(record.id), allow_other_weights=True)  # its own file

    def snapshot(self, record: SessionRecord, name: str | None) -> dict:
        """Saves the session to a state file in the state directory; returns its name and size."""
        from .persist import save_session

        if name is None:
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            name = f"{SNAPSHOTS_DIR}/{record.id}-{stamp}-{secrets.token_hex(2)}.state"
        path = self.resolve(name, "name", must_exist=False)
        if SESSIONS_DIR in path.relative_to(self._dir.resolve()).parts[:1]:
            raise RequestError(400, f"{SESSIONS_DIR}/ belongs to the server's own session files", param="name")
        if path.exists():
            raise RequestError(409, f"a file named {name!r} already exists in the state directory", param="name",
                           code="file_exists")  # fmt: skip
        self.storage.check_room(self.file_bytes, snapshot=True)
        self.storage.write(path, lambda: _save(save_session, record.session, path))
        self.storage.added_snapshot()
        return {"name": name, "tokens": len(record.session.tokens), "bytes": path.stat().st_size}

    def load_all(self, engine) -> int:
        """Loads every saved session of the state directory; returns how many. A bad file, whatever
        is wrong with it, is logged, counted (storage.skipped_files) and left where it is; temporary
        files of interrupted writes are removed first."""
        from ..state.files import remove_stale_temp_files

        if not self.persistent or self.shared is not None:
            return 0
        self._dir.mkdir(parents=True, exist_ok=True)
        for temp in remove_stale_temp_files(self._dir):
            log.info("removed %s, left by an interrupted write", temp.relative_to(self._dir))
        self.storage.scan()
        for path in sorted((self._dir / SESSIONS_DIR).glob("*.state")):
            record = self._load_saved(engine, path)
            if record is not None:
                self.records[record.id] = record
        self.storage.probe()
        return len(self.records)

    def _load_saved(self, engine, path: Path) -> SessionRecord | None:
        from .persist import load_session

        session = engine.session()
        try:
            if not SESSION_ID.fullmatch(path.stem):
                raise StateError(f"{path.name} is not named like a session file (sess_ and 16 hex digits)")
            loaded = load_session(session, path, allow_other_weights=self.allow_other_weights)
            return SessionRecord(path.stem, _created(path, loaded.extra), session)
        except Exception as e:  # whatever is inside the file, startup goes on
            session.close()
            self.storage.skipped_files += 1
            reason = str(e).replace(str(path), path.name) if isinstance(e, RwkvStateError) else repr(e)
            log.warning("skipping saved session %s: %s", path.name, reason)
            return None

    def save_all(self) -> None:
        if self.shared is not None:  # saved after every change already
            return
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
        """The path of `name` inside the state directory; RequestError if it is not allowed."""
        if self.state_dir is None:
            raise RequestError(400, "this server has no state directory (start it with --state-dir)", param=param)
        pure = _check_name(name, param)
        root = self.state_dir.resolve()
        try:
            path = (root / pure).resolve()  # follows symlinks, so a link pointing outside is caught
            inside = path != root and root in path.parents
            exists = inside and path.is_file()
        except (OSError, RuntimeError, RecursionError):  # too long for this file system, a symlink loop
            raise RequestError(400, f"{param} {_short(name)} cannot be resolved in the state directory", param=param) from None
        if not inside:
            raise RequestError(400, f"{param} {_short(name)} leads outside the state directory", param=param)
        if must_exist and not exists:
            raise RequestError(404, f"no state file {_short(name)} in the state directory", param=param,
                           code="state_file_not_found")  # fmt: skip
        return path


def _check_name(name: str, param: str) -> PurePosixPath:
    """The name as a relative path; RequestError if it is not one this server accepts."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, f"{param} is not valid UTF-8 text", param=param) from None
    if len(name) > MAX_NAME_CHARS:
        raise RequestError(400, f"{param} is {len(name)} characters long, more than {MAX_NAME_CHARS}", param=param)
    pure = PurePosixPath(name)
    if (not name or "\x00" in name or "\\" in name or pure.is_absolute() or ".." in pure.parts
            or re.match(r"[A-Za-z]:", name)):  # fmt: skip
        raise RequestError(400, f"{param} must be a relative path inside the state directory, without '..'", param=param)
    if len(pure.parts) > MAX_NAME_PARTS or any(len(part.encode()) > 255 for part in pure.parts):
        raise RequestError(400, f"{param} must have at most {MAX_NAME_PARTS} path components of at most 255 bytes each",
                       param=param)  # fmt: skip
    return pure


def _short(name: str) -> str:
    return repr(name) if len(name) <= 80 else repr(name[:80]) + "..."


def _save(save_session, session, path: Path, extra=None) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create the directory for {path}: {e.strerror or e}") from e
    save_session(session, path, extra=extra)


def _created(path: Path, extra: dict) -> int:
    """The creation time this server recorded in a session file; StateError if the record is not
    one it wrote (a file edited and re-signed, or another program's)."""
    record = extra.get("server_session")
    if not isinstance(record, dict) or record.get("id") != path.stem:
        raise StateError(f"{path.name}: metadata server_session is not this server's record of {path.stem}")
    created = record.get("created")
    if type(created) is not int or created < 0:
        raise StateError(f"{path.name}: metadata server_session.created must be a unix time, got {created!r}")
    return created


def _new_id(taken) -> str:
    while True:
        session_id = f"sess_{secrets.token_hex(8)}"
        if session_id not in taken:
            return session_id


def _load_file(session, path: Path, name: str, allow_other_weights: bool = False) -> None:
    """Loads an rwkvstate state file or a state-tuning file (told apart by the safetensors
    metadata) into a fresh session. Error messages name the file as the client did."""
    from ..state.convert import load_state_tuning_file
    from .persist import load_session
    from ..state.files import FORMAT_NAME, max_file_bytes

    engine = session.engine
    c = engine.model.config
    try:
        cap = max_file_bytes(engine.pool.layout, c.vocab_size)
        if path.stat().st_size > cap:  # a state-tuning file is read whole: the cap comes first
            raise StateError(f"{path} is larger than a state file for this model can be ({cap:,} bytes)")
        if _format(path) == FORMAT_NAME:
            load_session(session, path, allow_other_weights=allow_other_weights)
        else:
            session.load_state(load_state_tuning_file(path, c.n_layer, c.n_embd, c.head_size))
    except (StorageError, OSError) as e:
        raise StorageError(str(e).replace(str(path), name)) from None
    except (RwkvStateError, ValueError) as e:
        raise RequestError(400, str(e).replace(str(path), name), param="state_file", code="invalid_state_file") from None


def _format(path: Path) -> str | None:
    """The `format` metadata of a safetensors file; None for anything else."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:
        return None
