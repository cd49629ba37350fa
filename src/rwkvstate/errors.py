"""Exception types. Every user-facing failure is one of these, with a one-line message; and how
an exception is told to a client (`describe`), without host paths (`scrub`), or quoted inside
another one-line message (`first_line`)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("rwkvstate")


class RwkvStateError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class CheckpointError(RwkvStateError, ValueError):
    """A model file is missing, unreadable, not RWKV-7, or has a missing or mis-shaped tensor."""


class StateError(RwkvStateError, ValueError):
    """A state (dict, file or slot) does not fit the pool or model it is meant for."""


class SlotError(RwkvStateError, ValueError):
    """A slot index is out of range, duplicated, or no slot is free."""


class StorageError(RwkvStateError):
    """Reading or writing a file failed for a reason outside the caller's input: a full or
    read-only disk, permissions, an I/O error. Nothing was changed (atomic writes)."""


class StoreUnavailable(StorageError):
    """The shared session store (Redis) cannot be reached, or failed mid-command: retry when it is back."""


class StoreConflict(StorageError):
    """A session was written to the shared store by another replica since this one read it."""


class StoreFull(StorageError):
    """One session's blob is larger than the shared store's whole byte cap."""


class RequestError(RwkvStateError):
    """A request to the engine core that cannot be served, answered by the server with `status`
    (an HTTP status code), naming the request field at fault (`param`) and a stable `code`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def first_line(e: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message, for a one-line error built around it; `default`
    (else the exception's type name) when the message is empty."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else default or type(e).__name__


def scrub(message: str, roots: tuple[Path, ...]) -> str:
    """The message with every root directory's path (as given and resolved) cut out, so a file
    inside it reads as its relative name."""
    for root in roots:
        for form in {str(root.resolve()), str(root)}:
            if form not in (".", "/"):
                message = message.replace(form + "/", "").replace(form, "<state-dir>")
    return message


def describe(e: BaseException, roots: tuple[Path, ...] = ()) -> tuple[int, str, str | None, str | None]:
    """(HTTP status, message, code, param) for an exception raised by the engine, a session or the
    state directory; `roots`: directories whose paths are cut out of the message. Client mistakes
    are 4xx; the server's own resources failing are 503 (storage) or 500 (anything unexpected,
    with the details in the log only)."""
    if isinstance(e, RequestError):
        return e.status, scrub(e.message, roots), e.code, e.param
    if isinstance(e, SlotError):
        return 503, f"no pool slot is free: {scrub(str(e), roots)}", "no_free_slot", None
    if isinstance(e, StoreUnavailable):
        return 503, scrub(str(e), roots), "session_store_unavailable", None
    if isinstance(e, StoreConflict):
        return 409, str(e), "session_conflict", None
    if isinstance(e, StoreFull):
        return 507, str(e), "session_store_full", None
    if isinstance(e, StorageError):
        return (503, f"the session could not be saved, so the request was not applied: {scrub(str(e), roots)}",
                "storage_unavailable", None)  # fmt: skip
    if isinstance(e, RecursionError):
        return 400, "the request is nested too deeply to process", "invalid_value", None
    if isinstance(e, (RwkvStateError, ValueError)):
        return 400, scrub(str(e), roots), None, None
    if isinstance(e, OSError):
        log.error("file system error", exc_info=e)
        return 503, f"the server's storage failed: {e.strerror or type(e).__name__}", "storage_unavailable", None
    log.error("internal error", exc_info=e)
    return 500, f"internal error ({type(e).__name__}); the server log has the details", "internal_error", None
