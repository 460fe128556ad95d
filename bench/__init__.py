"""Benchmarks: each module measures one part and returns figures keyed as in bench/results.json."""
from __future__ import annotations

import json
from pathlib import Path


def save_report(report: dict, path: Path | None, indent: int = 2) -> str:
    """A benchmark's figures as JSON text, also written to ``path`` (its --json/--out option)
    when one is given."""
    text = json.dumps(report, indent=indent)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return text
