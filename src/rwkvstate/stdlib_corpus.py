"""The text the bundled model was trained on: the CPython standard library.

Every `*.py` file of the running interpreter's standard library (site-packages
excluded; `pydoc_data/topics.py` carries the bundled documentation text). A file is
held out when crc32 of its path relative to the stdlib root is 0 mod 20, about 5%
of the files; the bundled model never trained on held-out files.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

HELD_OUT_MODULUS = 20
SEPARATOR = "\f\n"  # between files in the training text


def stdlib_files(root: Path | None = None) -> tuple[Path, list[Path]]:
    """(root, files): the running interpreter's stdlib, or a copy of one at `root`."""
    root = Path(root) if root else Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    return root, files


def is_held_out(relative_path: str) -> bool:
    return zlib.crc32(relative_path.encode("utf-8")) % HELD_OUT_MODULUS == 0


def held_out_files(root: Path | None = None) -> list[Path]:
    root, files = stdlib_files(root)
    return [p for p in files if is_held_out(p.relative_to(root).as_posix())]
