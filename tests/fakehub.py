"""A small stand-in for the Hugging Face hub's download endpoints, for tests without network.

It answers what huggingface_hub's `hf_hub_download` asks, the way the hub does for an LFS
file: `HEAD/GET {endpoint}/{repo}/resolve/{revision}/{filename}` gives a 302 whose headers
carry the metadata (X-Repo-Commit, X-Linked-Etag = the sha256, X-Linked-Size, ETag) and a
Location on another origin (the "CDN", a second server, named `localhost` so that its host
differs from the hub's `127.0.0.1`: huggingface_hub 1.x follows a HEAD's redirect to the same
host and would then miss the metadata headers), which serves the bytes with
Content-Length and honours Range requests. Unknown repositories, revisions and files get
404s with the hub's X-Error-Code header.

Knobs for failure tests: `drop_after` cuts the next CDN transfer after that many bytes
(huggingface_hub then resumes with a Range request), `corrupt` serves different bytes than
the advertised sha256, `lie_size` advertises a wrong size.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")
MAIN_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    """Two threaded HTTP servers (hub and CDN) on free local ports; use as a context manager."""

    files: dict = field(default_factory=dict)  # (repo, commit, filename) -> bytes
    refs: dict = field(default_factory=dict)  # (repo, branch) -> commit
    drop_after: int | None = None
    corrupt: bool = False
    lie_size: int | None = None
    requests: list = field(default_factory=list)  # (method, path, Range header)

    def add(self, repo: str, filename: str, data: bytes, commit: str = MAIN_COMMIT, branch: str | None = "main"):
        self.files[(repo, commit, filename)] = data
        if branch:
            self.refs[(repo, branch)] = commit

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    def __enter__(self):
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=False))
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=True))
        for server in (self._hub, self._cdn):
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    def _blob(self, sha: str) -> bytes | None:
        for data in self.files.values():
            if hashlib.sha256(data).hexdigest() == sha:
                return data
        return None


def _handler(hub: FakeHub, cdn: bool):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool):
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
            if cdn:
                self._cdn(body)
            else:
                self._resolve()

        def _error(self, status: int, code: str, commit: str | None = None):
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _resolve(self):
            m = _RESOLVE.match(self.path.split("?")[0])
            if not m:
                return self._error(404, "RepoNotFound")
            repo, rev, name = m["repo"], m["rev"], m["file"]
            if not any(key[0] == repo for key in hub.files):
                return self._error(404, "RepoNotFound")
            commit = hub.refs.get((repo, rev), rev)
            if not any(key[:2] == (repo, commit) for key in hub.files):
                return self._error(404, "RevisionNotFound")
            data = hub.files.get((repo, commit, name))
            if data is None:
                return self._error(404, "EntryNotFound", commit)
            sha = hashlib.sha256(data).hexdigest()
            self.send_response(302)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", '"' + hashlib.sha1(data[:64]).hexdigest() + '"')  # the pointer's git oid
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(hub.lie_size or len(data)))
            self.send_header("Location", f"http://localhost:{hub._cdn.server_address[1]}/cdn/{sha}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _cdn(self, body: bool):
            m = _CDN.match(self.path.split("?")[0])
            data = hub._blob(m["sha"]) if m else None
            if data is None:
                return self._error(404, "EntryNotFound")
            if hub.corrupt:
                data = bytes(b ^ 0xFF for b in data[:16]) + data[16:]
            start = 0
            ranged = self.headers.get("Range")
            if ranged and (r := re.match(r"bytes=(\d+)-", ranged)):
                start = int(r[1])
            part = data[start:]
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(part)))
            self.send_header("Accept-Ranges", "bytes")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            if hub.drop_after is not None and not start:
                cut, hub.drop_after = hub.drop_after, None
                self.wfile.write(part[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # mid-body: the client sees a truncated transfer
                return
            self.wfile.write(part)

    return Handler
