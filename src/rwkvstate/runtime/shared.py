"""Named sessions kept in a store shared by several engine cores (replicas), so that any
replica can continue any session.

The store itself is given to the core (`CoreConfig.shared_store`: a factory, e.g. the Redis
store of cluster/store.py); this module only needs its methods: `put(id, blob, expected=,
tokens=, created=) -> version`, `get(id) -> Entry | None`, `version(id) -> int`, `delete(id)`,
`ids()`, `infos(ids)`, `refused(id, reason)` and `format`. Its failures are the store errors of
errors.py (StoreUnavailable: 503, StoreConflict: 409, StoreFull: 507).

The registry (registry.py) calls this on the core's thread:
- `sync` before a request or operation touches a session: one round trip reads the stored
  version; a copy here that is missing or older is (re)loaded from the store;
- `save` after every request or operation that changed a session, before it is answered: the
  session goes to the store as a state file, naming the version this core last saw, so a
  stale copy never overwrites a newer one;
- `delete` when a client deletes a session.
A blob that fails its checksum, fingerprint or shape checks is refused (counted in the store,
logged, answered 500), never loaded.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import RequestError, StateError, StorageError

log = logging.getLogger("rwkvstate.core")


class SharedSessions:
    def __init__(self, store: Any):
        self.store = store

    def save(self, record) -> None:
        """Writes the session; on failure the record is marked stale (version -1), so the next
        request reloads what the store holds: the state of the last answered request."""
        from .persist import session_bytes

        session = record.session
        try:
            blob = session_bytes(session, self.store.format, extra={"server_session": {"id": record.id,
                                 "created": record.created}})  # fmt: skip
            record.version = self.store.put(record.id, blob, expected=record.version, tokens=len(session.tokens),
                                            created=record.created)  # fmt: skip
        except StorageError:
            record.version = -1
            raise

    def version(self, session_id: str) -> int:
        """The stored version of a session (0: not stored)."""
        return self.store.version(session_id)

    def load(self, engine, session_id: str, make_record):
        """A record for the stored session, its state loaded into a new engine session; None if
        the store has no such session."""
        from .persist import load_session_bytes

        entry = self.store.get(session_id)
        if entry is None:
            return None
        session = engine.session()
        try:
            load_session_bytes(session, entry.blob, f"session {session_id} in the store")
        except StateError as e:
            session.close()
            self.store.refused(session_id, str(e))
            message = f"the stored state of session {session_id} was refused, not loaded: {e}"
            log.error("%s", message)
            raise RequestError(500, message, code="stored_state_refused") from None
        except BaseException:
            session.close()
            raise
        return make_record(session_id, entry.created, session, version=entry.version)

    def delete(self, session_id: str) -> None:
        self.store.delete(session_id)

    def listing(self) -> list[dict]:
        """Every stored session, most recently used first (GET /v1/sessions)."""
        rows = self.store.infos(self.store.ids())
        return [{"id": r["id"], "object": "session", "created": r["created"], "tokens": r["tokens"],
                 "location": "store", "bytes": r["bytes"], "version": r["version"], "persistent": True}
                for r in rows]  # fmt: skip
