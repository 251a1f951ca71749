"""JSONL data files: one JSON object per line; errors name the file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

__all__ = ["DataError", "load_jsonl", "write_jsonl"]


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line)."""


def load_jsonl(path: str | os.PathLike, required: Iterable[str] = ("prompt", "answer")) -> list[dict]:
    """Read rows from a JSONL file; errors name the file and the 1-based line number."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {str(p)!r}")
    rows = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise DataError(f"{p}:{lineno}: missing required field(s) {', '.join(map(repr, missing))}")
            if not isinstance(row["prompt"], str):
                raise DataError(f"{p}:{lineno}: field 'prompt' must be a string")
            row["answer"] = str(row["answer"])
            ks = row.get("key_steps")
            if ks is not None:
                if not isinstance(ks, list):
                    raise DataError(f"{p}:{lineno}: field 'key_steps' must be a list of lists of strings")
                row["key_steps"] = [[g] if isinstance(g, str) else list(g) for g in ks]
            rows.append(row)
    if not rows:
        raise DataError(f"data file is empty: {str(p)!r}")
    return rows


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
