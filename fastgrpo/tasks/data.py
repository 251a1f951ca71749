"""Data files: JSONL (one JSON object per line), JSON, parquet, CSV or a ``datasets`` directory
(``fastgrpo.tasks.formats``); errors name the file and row (``FILE:ROW: ...``).

Column names map onto the fields fastgrpo reads (``columns={"prompt": "question"}``: the
file's ``question`` is the row's ``prompt``; ``--prompt-column question`` on the command line).
A prompt is a string or, conversational as TRL takes it, a list of ``{"role", "content"}``
messages (rendered through the model's chat template, ``fastgrpo.trainer.prompting``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

from fastgrpo.tasks.formats import DataError, read_records

__all__ = ["DataError", "read_jsonl", "load_jsonl", "write_jsonl", "check_prompt", "ROLES"]

ROLES = ("system", "user", "assistant", "tool")


def check_prompt(where: str, prompt, chat: bool = True):
    """A prompt is a string, or (``chat``) a non-empty list of ``{"role", "content"}`` messages
    with string content; returns it, or raises ``DataError`` naming ``where``."""
    if isinstance(prompt, str):
        if not prompt.strip():  # e.g. a CSV's empty cell
            raise DataError(f"{where}: field 'prompt' is empty")
        return prompt
    if chat and isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in prompt):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    want = ("a string or a list of {\"role\", \"content\"} messages (role one of "
            f"{', '.join(ROLES)}, content a string)") if chat else "a string"
    raise DataError(f"{where}: field 'prompt' must be {want}, got {json.dumps(prompt, default=str)[:200]}")


def _jsonl_records(p: Path):
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
            yield where, row


def _rename(row: dict, columns: Mapping[str, str]) -> dict:
    """The row with each mapped column under fastgrpo's name (``columns``: field -> column)."""
    for fld, col in columns.items():
        if not col or col == fld:
            continue
        if col in row:
            if fld in row:  # the file's own field of that name steps aside (kept as orig_<field>)
                row[f"orig_{fld}"] = row.pop(fld)
            row[fld] = row.pop(col)
    return row


def read_jsonl(path: str | os.PathLike, required: Iterable[str] = ("prompt",), *,
               columns: Mapping[str, str] | None = None, chat: bool = False
               ) -> list[tuple[str, dict]]:
    """``(where, row)`` for each record of a data file (``where`` = ``FILE:ROW``; any format
    ``fastgrpo.tasks.formats`` reads, JSONL by default), with the checks every reader shares:
    the file exists, is UTF-8, each record is an object holding the ``required`` fields (after
    renaming ``columns``: field -> the file's column) and a ``prompt`` (a string; with ``chat``
    also a list of messages), and there is at least one."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {str(p)!r}")
    columns = dict(columns or {})
    records = read_records(p)
    if records is None:
        if not p.is_file():
            raise DataError(f"data file not found: {str(p)!r}")
        records = _jsonl_records(p)
    rows = []
    for where, row in records:
        row = _rename(row, columns)
        missing = [k for k in required if k not in row]
        if missing:
            named = [f"{columns[k]!r} (--{k.replace('_', '-')}-column)" if columns.get(k, k) != k
                     else repr(k) for k in missing]
            hint = "" if any(columns.get(k, k) != k for k in missing) else (
                f"; the row's fields are {', '.join(map(repr, list(row)[:12]))}: name the one to "
                f"read with --{missing[0].replace('_', '-')}-column")
            raise DataError(f"{where}: missing required field(s) {', '.join(named)}{hint}")
        row["prompt"] = check_prompt(where, row.get("prompt"), chat)
        rows.append((where, row))
    if not rows:
        raise DataError(f"data file is empty: {str(p)!r}")
    return rows


def load_jsonl(path: str | os.PathLike, required: Iterable[str] = ("prompt", "answer"), *,
               columns: Mapping[str, str] | None = None, chat: bool = True) -> list[dict]:
    """Read rows from a data file (``read_jsonl``: any format, ``columns`` renamed); errors name
    the file, the 1-based row and the field.

    ``prompt`` must be a string or a list of messages; ``answer`` a string or a number
    (numbers become strings; a GSM8K solution ``"... #### 42"`` stays whole: the rewards read
    its gold answer); ``key_steps``, when present and not null, a list whose items are strings
    or lists of strings (a string ``s`` becomes the group ``[s]``; a CSV cell may hold that
    list as JSON).  Other fields are kept as they are."""
    rows = []
    for where, row in read_jsonl(path, required, columns=columns, chat=chat):
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
    if isinstance(ks, str) and ks.lstrip().startswith("["):  # a CSV cell holding JSON
        try:
            ks = json.loads(ks)
        except json.JSONDecodeError:
            raise bad() from None
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
