"""Writing results: log lines, progress bars, JSON files written atomically, Markdown tables, and a
cheap identity of large input files."""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm import tqdm


def progress_bar(total: float, desc: str) -> tqdm:
    """A progress bar on stderr: redrawn on a terminal, a line every 30 s in a log file."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, file=sys.stderr, mininterval=0.2 if tty else 30.0, dynamic_ncols=tty)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_json(path: Path, data: Any) -> None:
    """Write atomically, so an interrupted run never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_results(kind: str, result: dict[str, Any], markdown: str, out: Path, *inputs: Path) -> None:
    """``KIND.json``, ``KIND.md`` and the plots into ``out``; the table and the files written on stdout."""
    from .plots import write_plots

    write_json(out / f"{kind}.json", result)
    (out / f"{kind}.md").write_text(markdown)
    files = [*inputs, out / f"{kind}.json", out / f"{kind}.md", *write_plots(kind, result, out)]
    print(markdown)
    print("wrote " + ", ".join(map(str, files)))


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def file_digest(path: Path, size: int = 1 << 20) -> str:
    """A cheap identity of a (large) file: its size and the hash of its first MiB."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(size))
    return f"{path.stat().st_size}-{h.hexdigest()[:16]}"
