"""JSONL data files: one JSON object per line; errors name the file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

__all__ = ["DataError", "read_jsonl", "load_jsonl", "write_jsonl"]


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line)."""


def read_jsonl(path: str | os.PathLike, required: Iterable[str] = ("prompt",)
               ) -> list[tuple[str, dict]]:
    """``(where, row)`` for each JSON object of a JSONL file (``where`` = ``FILE:LINE``), with
    the checks every reader shares: the file exists, is UTF-8, each non-blank line is a JSON
    object holding the ``required`` fields and a string ``prompt``, and there is at least one."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {str(p)!r}")
    rows = []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{p}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1}); JSONL files must be UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON line ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise DataError(f"{where}: missing required field(s) {', '.join(map(repr, missing))}")
            if not isinstance(row.get("prompt"), str):
                raise DataError(f"{where}: field 'prompt' must be a string, got "
                                f"{json.dumps(row.get('prompt'))}")
            rows.append((where, row))
    if not rows:
        raise DataError(f"data file is empty: {str(p)!r}")
    return rows


def load_jsonl(path: str | os.PathLike, required: Iterable[str] = ("prompt", "answer")) -> list[dict]:
    """Read rows from a JSONL file; errors name the file, the 1-based line number and the field.

    ``prompt`` must be a string; ``answer`` a string or a number (numbers become strings);
    ``key_steps``, when present and not null, a list whose items are strings or lists of
    strings (a string ``s`` becomes the group ``[s]``).  Other fields are kept as they are."""
    rows = []
    for where, row in read_jsonl(path, required):
        if "answer" in row:
            a = row["answer"]
            if isinstance(a, bool) or not isinstance(a, (str, int, float)):
                raise DataError(f"{where}: field 'answer' must be a string or a number, "
                                f"got {json.dumps(a)}")
            row["answer"] = str(a)
        ks = row.get("key_steps")
        if ks is not None:
            row["key_steps"] = _key_steps(ks, where)
        rows.append(row)
    return rows


def _key_steps(ks, where: str) -> list[list[str]]:
    def bad():
        return DataError(f"{where}: field 'key_steps' must be a list of strings or of lists of "
                         f"strings (alternative forms of one step), got {json.dumps(ks)}")
    if not isinstance(ks, list):
        raise bad()
    out = []
    for g in ks:
        group = [g] if isinstance(g, str) else g
        if not isinstance(group, list) or not all(isinstance(x, str) for x in group):
            raise bad()
        out.append(list(group))
    return out


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
