"""Data files in any of the formats a user brings: records of one file, each with where it came from.

================  =====================================================================
format            read as
================  =====================================================================
``.jsonl``        one JSON object per line (``fastgrpo.tasks.data.read_jsonl``)
``.json``         a JSON array of objects (or ``{"data": [...]}``, or JSON lines)
``.parquet``      through the ``datasets`` library (``Dataset.from_parquet``)
``.csv``          through ``datasets`` (``Dataset.from_csv``); every value a string
a directory       a ``datasets`` ``save_to_disk`` directory (``load_from_disk``); of a
                  ``DatasetDict``, give the split's folder (``DIR/train``)
================  =====================================================================

``read_records(path)`` -> ``[(where, record)]`` with ``where`` = ``FILE:ROW`` (1-based: the line of
a JSONL or CSV file, the element of a JSON array, the row of a table), so every error message
names the file and row the same way.  ``datasets`` is an optional dependency (``pip install 'fastgrpo[data]'``):
only parquet, CSV and dataset directories need it, and a clean ``DataError`` says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["read_records", "file_format", "DataError", "DATASETS_INSTALL"]

DATASETS_INSTALL = "pip install 'fastgrpo[data]'  (or: pip install 'datasets>=5.2,<6')"
_TABLES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".arrow": "arrow"}


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line)."""


def _error(msg: str):
    return DataError(msg)


def file_format(path: str | os.PathLike) -> str:
    """``jsonl`` | ``json`` | ``parquet`` | ``csv`` | ``arrow`` | ``dataset`` (a directory)."""
    p = Path(path)
    if p.is_dir():
        return "dataset"
    suffix = p.suffix.lower()
    if suffix == ".json":
        return "json"
    return _TABLES.get(suffix, "jsonl")  # .jsonl and anything else: JSON lines, as before


def _datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise _error(f"{what} needs the datasets library; install it with: {DATASETS_INSTALL}") from None
    datasets.disable_progress_bars()
    return datasets


def _plain(v):
    """A record's value as plain Python: a ``datasets`` image struct (``{"bytes", "path"}``)
    becomes a PIL image, numpy scalars/arrays become numbers/lists."""
    if isinstance(v, dict) and set(v) == {"bytes", "path"} and v.get("bytes") is not None:
        import io

        from PIL import Image
        return Image.open(io.BytesIO(v["bytes"]))
    if hasattr(v, "tolist") and not hasattr(v, "convert"):  # numpy, not PIL
        return v.tolist()
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def _table_records(p: Path, fmt: str) -> list[tuple[str, dict]]:
    ds_lib = _datasets(f"{p}: reading a {fmt} {'directory' if fmt == 'dataset' else 'file'}")
    try:
        if fmt == "dataset":
            ds = ds_lib.load_from_disk(str(p))
            if isinstance(ds, ds_lib.DatasetDict):
                splits = list(ds)
                raise _error(f"{p}: a DatasetDict with splits {', '.join(splits)}; give one "
                             f"split's folder, e.g. {p / splits[0]}")
        elif fmt == "parquet":
            ds = ds_lib.Dataset.from_parquet(str(p))
        elif fmt == "csv":
            # every column a string: a CSV has no types, and an answer "007" must stay "007"
            import csv
            with p.open(newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), None)
            if not header:
                raise _error(f"data file is empty: {str(p)!r}")
            feats = ds_lib.Features({c: ds_lib.Value("string") for c in header})
            ds = ds_lib.Dataset.from_csv(str(p), features=feats, keep_default_na=False)
        else:
            ds = ds_lib.Dataset.from_file(str(p))
    except UnicodeDecodeError as e:
        raise _error(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except FileNotFoundError as e:
        raise _error(f"{p}: not a datasets directory ({e})") from None
    except Exception as e:  # pyarrow / pandas / datasets errors on a malformed file
        if type(e).__name__ == "DataError":
            raise
        raise _error(f"{p}: cannot read it as {fmt} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    # a CSV row's line is its row + 1 (the header); tables are numbered by row
    first = 2 if fmt == "csv" else 1
    return [(f"{p}:{i + first}", {k: _plain(v) for k, v in rec.items()}) for i, rec in enumerate(ds)]


def _json_records(p: Path) -> list[tuple[str, dict]] | None:
    """A JSON array of objects (``{"data": [...]}`` too); ``None`` when the file is JSON lines."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _error(f"{p}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                     f"JSON files must be UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and e.msg == "Extra data":
            return None  # one object per line under a .json name: read as JSON lines
        raise _error(f"{p}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise _error(f"{p}: expected a JSON array of objects (or JSON lines), got {type(data).__name__}")
    out = []
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise _error(f"{p}:{i}: expected a JSON object, got {type(row).__name__}")
        out.append((f"{p}:{i}", row))
    return out


def read_records(path: str | os.PathLike) -> list[tuple[str, dict]] | None:
    """``(where, record)`` of every record of a JSON, parquet, CSV, arrow file or ``datasets``
    directory; ``None`` for a JSONL file (the caller reads it line by line)."""
    p = Path(path)
    fmt = file_format(p)
    if fmt == "jsonl":
        return None
    if fmt == "json":
        return _json_records(p)
    return _table_records(p, fmt)
