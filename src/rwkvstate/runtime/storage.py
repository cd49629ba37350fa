"""The state directory's health and usage, in one place.

Every write of a session or snapshot file goes through `Storage.write`: a failed write (full
or read-only disk, permissions) marks storage degraded (reported by /health and /metrics)
until a later write succeeds, and counts. Usage (bytes of all files, count of snapshot files)
is scanned at startup and kept current by the server's own writes and deletions; before a
limit refuses anything, the directory is scanned again, so files removed by hand count.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, TypeVar

from ..errors import RequestError, StorageError, scrub

log = logging.getLogger("rwkvstate.core")
T = TypeVar("T")
SESSIONS_DIR = "sessions"


class Storage:
    def __init__(self, root: Path | None, max_bytes: int | None = None, max_snapshots: int | None = None):
        self.root = root
        self.max_bytes, self.max_snapshots = max_bytes, max_snapshots
        self.error: str | None = None  # the last failed write's message, until a write succeeds
        self.failed_at: float | None = None
        self.failures = 0  # failed writes since startup
        self.skipped_files = 0  # bad session files skipped at startup
        self.bytes_used = 0
        self.snapshots = 0  # state files outside sessions/

    @property
    def ok(self) -> bool:
        return self.error is None

    def health(self) -> dict:
        if self.root is None:
            return {"status": "none"}
        out: dict = {"status": "ok" if self.ok else "degraded", "bytes": self.bytes_used, "failures": self.failures}
        if self.error is not None:
            out.update(error=self.error, since=int(self.failed_at or 0))
        return out

    @property
    def _root(self) -> Path:
        assert self.root is not None, "only a server with a state directory writes files"
        return self.root

    # ---- writes ----------------------------------------------------------------------------------
    def write(self, path: Path, fn: Callable[[], T]) -> T:
        """Runs fn, which writes `path` atomically; keeps health and usage current."""
        old = _size(path)
        try:
            result = fn()
        except StorageError as e:
            self.failures += 1
            self.error, self.failed_at = self._relative(str(e)), time.time()
            log.error("state directory write failed: %s", e)
            raise
        if self.error is not None:
            log.warning("the state directory takes writes again")
        self.error = None
        self.bytes_used += _size(path) - old
        return result

    def removed(self, size: int) -> None:
        self.bytes_used = max(0, self.bytes_used - size)

    def added_snapshot(self) -> None:
        self.snapshots += 1

    def probe(self) -> None:
        """A test write at startup, so a read-only or full directory shows before the first request."""
        probe = self._root / f".write-probe-{os.getpid()}"
        try:
            self.write(probe, lambda: _write_probe(probe))
        except StorageError:
            return
        probe.unlink(missing_ok=True)

    # ---- limits ----------------------------------------------------------------------------------
    def check_room(self, estimate: int, snapshot: bool = False) -> None:
        """429 if a new file of about `estimate` bytes (a snapshot if `snapshot`) would pass a limit."""
        if self.root is None or not self._over(estimate, snapshot):
            return
        self.scan()  # files may have been removed by hand since the last scan
        if self.max_bytes is not None and self.bytes_used + estimate > self.max_bytes:
            raise RequestError(429, f"the state directory holds {self.bytes_used:,} bytes; a new file of about "
                                f"{estimate:,} would pass this server's limit of {self.max_bytes:,} bytes: delete "
                                "sessions or snapshots first", code="state_dir_full")  # fmt: skip
        if snapshot and self.max_snapshots is not None and self.snapshots >= self.max_snapshots:
            raise RequestError(429, f"the state directory holds {self.snapshots} snapshot files, this server's limit "
                                f"is {self.max_snapshots}: remove some first", param="name",
                           code="snapshot_limit")  # fmt: skip

    def _over(self, estimate: int, snapshot: bool) -> bool:
        over_bytes = self.max_bytes is not None and self.bytes_used + estimate > self.max_bytes
        over_count = snapshot and self.max_snapshots is not None and self.snapshots >= self.max_snapshots
        return over_bytes or over_count

    def scan(self) -> None:
        """Bytes of every file under the root (links not followed) and the snapshot count."""
        total, snapshots = 0, 0
        for directory, _, names in os.walk(self._root):
            inside_sessions = Path(directory).relative_to(self._root).parts[:1] == (SESSIONS_DIR,)
            for name in names:
                total += _size(Path(directory) / name)
                snapshots += name.endswith(".state") and not inside_sessions
        self.bytes_used, self.snapshots = total, snapshots

    def _relative(self, message: str) -> str:
        return scrub(message, (self._root,))


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def _write_probe(path: Path) -> None:
    try:
        with open(path, "wb") as f:
            f.write(b"rwkvstate")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise StorageError(f"cannot write to the state directory: {e.strerror or e}") from e
