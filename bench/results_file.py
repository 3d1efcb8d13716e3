"""What every bench script does last: write its results as JSON (a path given by --out)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console


def write_results(out: Path | None, result: Any, console: Console) -> None:
    """Write `result` as indented JSON to `out` (parents created); nothing when `out` is None."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {out}")
