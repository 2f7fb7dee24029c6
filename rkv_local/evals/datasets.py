"""The benchmarks the R-KV paper reports, shipped in ``evals/data`` (its README gives sources and
licences), and reading JSONL files of problems."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"
DATASETS = ("gsm8k", "math500", "aime24")


def data_path(text: str) -> Path:
    """``--data``: a JSONL file, or the name of a shipped benchmark (a file of that name wins)."""
    path = Path(text)
    if text in DATASETS and not path.exists():
        return DATA_DIR / f"{text}.jsonl"
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows
