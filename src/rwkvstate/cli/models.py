"""Models by name for the command line: `--model NAME|PATH`, `rwkvstate pull`, `rwkvstate models`."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import RwkvStateError

_MODEL_SUFFIXES = (".pth", ".safetensors", ".st", ".bin")
# The small byte-level model trained on the CPython stdlib (docs/model.md), shipped in the package.
BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "data" / "stdlib-byte-l8-c256.safetensors"
BUNDLED_NAME = BUNDLED_MODEL.stem


def looks_like_path(text: str) -> bool:
    """A value that can only mean a file: an existing path, a path separator, or a model suffix."""
    return Path(text).exists() or "/" in text or "\\" in text or text.lower().endswith(_MODEL_SUFFIXES)


def resolve_model(value: str | None, bundled: Path) -> tuple[Path, str | None]:
    """(file, tokenizer kind from the table or None) for a --model value.

    None means the bundled model; a path is used as is (the loader reports a missing file);
    anything else is a model name, fetched from the hub or the cache and verified."""
    if value is None or value == BUNDLED_NAME:
        if not bundled.exists():
            raise RwkvStateError(
                "no model given: pass --model NAME (see `rwkvstate models`) or a .pth/.safetensors file"
            )
        return bundled, None
    if looks_like_path(value):
        return Path(value), None
    from ..model import hub

    entry = hub.resolve(value)
    fetched = hub.fetch(entry, progress=sys.stderr.isatty())
    if fetched.downloaded:
        print(f"downloaded {entry.name} to {fetched.path} (sha256 verified)", file=sys.stderr)
    return fetched.path, entry.tokenizer


def add_parsers(sub) -> None:
    pull = sub.add_parser(
        "pull", help="download an official RWKV-7 model by name and verify it (see `rwkvstate models`)"
    )
    pull.add_argument("name", help="a name from `rwkvstate models`, e.g. rwkv7-g1d-0.1b")
    sub.add_parser("models", help="list the known model names and which ones are cached")


def cmd_pull(args) -> int:
    """Downloads (or re-verifies the cached copy of) a model and checks it is an RWKV-7 checkpoint."""
    from ..model import hub
    from ..model.checkpoint import load_checkpoint

    entry = hub.resolve(args.name)
    fetched = hub.fetch(entry, reverify=True, progress=sys.stderr.isatty())
    _, cfg = load_checkpoint(fetched.path, tokenizer=entry.tokenizer)
    what = "downloaded" if fetched.downloaded else "already cached"
    print(f"{entry.name}: {what}, sha256 {fetched.sha256 or '(not published)'} verified; "
          f"RWKV-7, {cfg.n_layer} layers, n_embd {cfg.n_embd}, vocab {cfg.vocab_size}", file=sys.stderr)  # fmt: skip
    print(fetched.path)
    return 0


def cmd_models(args) -> int:
    """The table of names, with the cached file where there is one."""
    from ..model import hub

    rows = [(BUNDLED_NAME, "bundled", "byte-level code model (docs/model.md)", str(BUNDLED_MODEL))]
    for entry, path in hub.listing():
        where = str(path) if path is not None else f"{entry.repo}/{entry.filename}"
        rows.append((entry.name, "cached" if path is not None else "-", entry.about, where))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    print(f"cache: {hub.cache_dir()} (HF_HOME / HF_HUB_CACHE); hub: {hub.endpoint()} (HF_ENDPOINT)", file=sys.stderr)
    return 0
