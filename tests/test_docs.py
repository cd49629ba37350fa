"""Every Python and shell snippet of README.md and docs/*.md runs.

How snippets run (so a doc can be written to pass):
- ```python and ```bash blocks, in file order; the Python blocks of one file share one namespace,
  and everything runs in a fresh working directory per file; `rwkvstate` is this checkout's CLI.
- What cannot run here is substituted: a named RWKV-7 checkpoint (`rwkv7-....pth`) becomes the
  bundled model (and its bare name, the model id a server serves, the bundled model's id);
  `--device cuda` / `device="cuda"` becomes the CPU when there is no GPU; `pip install ...`
  is skipped (the tests run inside the installed package); token limits (`--max-tokens N`,
  `max_tokens=N`) become 8.
- Official models by name (`rwkvstate pull NAME`, `--model NAME`) come from a local stand-in for
  the Hugging Face hub (tests/fakehub.py, HF_ENDPOINT) that serves a tiny RWKV-7 world-vocabulary
  checkpoint under every name whose table entry has no pinned sha256; a doc that names a pinned
  model in a runnable block fails (the stand-in cannot serve the published bytes).
- A shell block that starts `rwkvstate serve` runs in the background on a free port (which
  later blocks' `127.0.0.1:8000` becomes) until the end of its file, then gets Ctrl-C.
- A block with a comment saying `(not run by the docs test: REASON)` is not run; each is
  reported as a skipped test with its reason. Keep that list short.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import rwkvstate
from rwkvstate.cli import BUNDLED_MODEL
from rwkvstate.model import hub
from rwkvstate.model.synthetic import random_checkpoint, save_checkpoint

from fakehub import FakeHub
from test_hub import WORLD_CFG

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "shell": "shell"}
NOT_RUN = re.compile(r"\(not run by the docs test: ([^)]+)\)")
FENCE = re.compile(r"^```(\w*)\s*$")
TINY_TOKENS = 8
SERVER_START_S = 120


@dataclass
class Snippet:
    file: Path
    line: int  # of the opening fence
    kind: str  # "python" or "shell"
    code: str

    @property
    def name(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"

    @property
    def not_run(self) -> str | None:
        found = NOT_RUN.search(self.code)
        return found.group(1) if found else None


def snippets(path: Path) -> list[Snippet]:
    found, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        kind = LANGUAGES.get(fence.group(1).lower())
        if kind:
            found.append(Snippet(path, i + 1, kind, "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
    return found


ALL = [s for path in DOCS for s in snippets(path)]


# ---- substitutions --------------------------------------------------------------------------------
def substitute(code: str, port: int | None) -> str:
    bundled = str(BUNDLED_MODEL)
    code = re.sub(r"rwkv7-[\w.-]+?\.(pth|safetensors)\b", bundled, code)
    code = re.sub(r"\brwkv7-g1-[\w.]+?\b(?=[\"'])", BUNDLED_MODEL.stem, code)  # a served model id
    code = re.sub(r"--max-tokens \d+", f"--max-tokens {TINY_TOKENS}", code)
    code = re.sub(r"\bmax_tokens=\d+", f"max_tokens={TINY_TOKENS}", code)
    if not torch.cuda.is_available():
        code = code.replace("--device cuda", "--device cpu").replace('device="cuda"', 'device="cpu"')
    if port is not None:
        code = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    return code


def shell_code(code: str) -> str:
    """Drops `pip install ...` commands (alone on a line or before &&)."""
    out = []
    for line in code.splitlines():
        line = re.sub(r"^\s*pip install [^&]*&&\s*", "", line)
        if not re.match(r"^\s*pip install ", line):
            out.append(line)
    return "\n".join(out) + "\n"


# ---- running ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    """The hub stand-in serving a tiny world checkpoint under every unpinned official name."""
    path = save_checkpoint(random_checkpoint(WORLD_CFG, seed=7, dtype=torch.float16),
                           tmp_path_factory.mktemp("hub") / "w.pth")  # fmt: skip
    with FakeHub() as server:
        for entry in hub.KNOWN_MODELS.values():
            if entry.sha256 is None:
                server.add(entry.repo, entry.filename, path.read_bytes())
        yield server


@pytest.fixture(scope="module")
def shell_env(tmp_path_factory, fake_hub) -> dict:
    """PATH with an `rwkvstate` that runs this checkout's CLI with this interpreter; the hub
    is the local stand-in, its cache a fresh directory."""
    bin_dir = tmp_path_factory.mktemp("bin")
    shim = bin_dir / "rwkvstate"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m rwkvstate.cli "$@"\n')
    shim.chmod(0o755)
    src = str(Path(rwkvstate.__file__).resolve().parents[1])
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    env.pop("RWKVSTATE_DEBUG", None)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "RWKVSTATE_MODEL"):
        env.pop(var, None)
    env["HF_ENDPOINT"], env["HF_HOME"] = fake_hub.endpoint, str(tmp_path_factory.mktemp("hf"))
    return env


class DocRun:
    """One file's snippets: a shared Python namespace, a working directory, background servers."""

    def __init__(self, cwd: Path, env: dict):
        self.cwd, self.env = cwd, env
        self.namespace: dict = {"__name__": "__doc__"}
        self.port: int | None = None
        self.servers: list[subprocess.Popen] = []

    def run(self, snippet: Snippet) -> None:
        code = substitute(snippet.code, self.port)
        if snippet.kind == "python":
            exec(compile(code, snippet.name, "exec"), self.namespace)
        elif "rwkvstate serve" in code:
            self._serve(snippet, shell_code(code))
        else:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", shell_code(code)], cwd=self.cwd, env=self.env,
                                  capture_output=True, text=True, timeout=300)  # fmt: skip
            assert done.returncode == 0, f"{snippet.name} exited {done.returncode}:\n{done.stderr[-3000:]}"

    def _serve(self, snippet: Snippet, code: str) -> None:
        self.port = _free_port()
        code = code.replace("rwkvstate serve", f"rwkvstate serve --port {self.port}")
        server = subprocess.Popen(["bash", "-euo", "pipefail", "-c", code], cwd=self.cwd, env=self.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)  # fmt: skip
        self.servers.append(server)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"{snippet.name}: the server exited {server.returncode}:\n{server.stdout.read()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        pytest.fail(f"{snippet.name}: the server did not listen on port {self.port} within {SERVER_START_S} s")

    def close(self) -> None:
        for server in self.servers:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGINT)  # Ctrl-C, as a user would stop it
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_snippets_run(path, tmp_path, shell_env, monkeypatch):
    runnable = [s for s in snippets(path) if s.not_run is None]
    if not runnable:
        return
    monkeypatch.chdir(tmp_path)
    doc = DocRun(tmp_path, shell_env)
    try:
        for snippet in runnable:
            doc.run(snippet)
    finally:
        doc.close()


@pytest.mark.parametrize("snippet", [s for s in ALL if s.not_run], ids=lambda s: s.name)
def test_snippets_not_run(snippet):
    """The report of blocks marked as not run here, one skip each, with the doc's reason."""
    pytest.skip(f"{snippet.name} is not run: {snippet.not_run}")


def test_the_collector_finds_the_snippets():
    """Guards the collector itself: the README's snippets are all found, fences included."""
    readme = snippets(ROOT / "README.md")
    assert [s.kind for s in readme][:5] == ["shell", "shell", "shell", "python", "python"]
    assert readme[1].not_run and "python -m pytest" in readme[1].code
    assert "rwkvstate pull" in readme[2].code and "s.regenerate()" in readme[4].code
    assert substitute('Model.load("rwkv7-g1-0.1b.pth")', None) == f'Model.load("{BUNDLED_MODEL}")'
    assert shell_code('pip install -e . && rwkvstate x\npip install y\n') == "rwkvstate x\n"
