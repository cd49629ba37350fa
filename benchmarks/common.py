"""What every benchmark script shares: writing OUT.json and OUT.md."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: Path | None, result: dict, text: str) -> None:
    """Prints the markdown; with out, writes OUT.json (every raw number) and OUT.md."""
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(text)
