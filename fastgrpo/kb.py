"""Knowledge bases as real search engines: SQLite FTS5 with BM25 ranking.

A knowledge base is one ``.sqlite`` file (Python's stdlib :mod:`sqlite3`, whose
SQLite must have FTS5) holding an FTS5 table of documents ``(doc_id, title,
text)`` tokenised by ``unicode61`` (case- and diacritic-insensitive) and a
``meta`` table with its kind:

* ``text`` -- passages, JSONL rows ``{"id": ..., "text": ..., "title": ...}``
  (``title`` optional; it is searched too);
* ``table`` -- the rows of a table, JSONL rows ``{column: value, ...}``; each row
  is one document rendered ``"col: value; col: value"`` (:func:`render_row`),
  its id the ``id`` column when present (not rendered), else its line number.

:meth:`KnowledgeBase.search` ranks by FTS5's ``bm25()`` (``k1=1.2, b=0.75``; the
hit's ``score`` is ``-bm25``, higher is better).  Any query text is safe: the
query is split into words here (:func:`match_expression`) and every word is sent
as a quoted FTS5 string, OR-ed together, so FTS5 syntax in the query (quotes,
``AND``/``OR``/``NOT``/``NEAR``, ``*``, ``:``, parentheses, ``-``) is plain text.

CLI::

    python -m fastgrpo.kb build --kind text|table INPUT.jsonl OUT.sqlite
    python -m fastgrpo.kb search OUT.sqlite "query" -k 3 [--json]

Bad input (missing file, bad JSON line -- named ``file:line`` --, unknown kind, a
file that is not a knowledge base) prints ``error: ...`` on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

__all__ = ["KINDS", "Hit", "KBError", "KnowledgeBase", "build_kb", "build_kb_from_jsonl", "main", "match_expression", "read_jsonl", "render_row"]

KINDS = ("text", "table")
_SCHEMA_VERSION = "1"
_WORD = re.compile(r"[^\W_]+")


class KBError(ValueError):
    """Bad knowledge-base input: a row, a file or a query option."""


class Hit(NamedTuple):
    """One search result; ``score`` is ``-bm25`` (higher is better)."""

    id: str
    text: str
    score: float
    title: str = ""


def match_expression(query: str) -> str | None:
    """The FTS5 MATCH expression for free text ``query``: its distinct words
    (runs of Unicode letters/digits), each a quoted FTS5 string, joined by ``OR``;
    ``None`` when the query has no word."""
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))
    if not words:
        return None
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


def render_row(row: dict[str, Any]) -> str:
    """A table row as one document: ``"col: value; col: value"`` (the ``id`` column left out)."""
    return "; ".join(f"{col}: {'' if v is None else v}" for col, v in row.items() if col != "id")


# ---------------------------------------------------------------------------
# reading and building


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line_number, value)`` for every non-blank line; :class:`KBError` naming
    ``file:line`` for a line that is not JSON, ``FileNotFoundError`` for a missing file."""
    path = Path(path)
    with path.open(encoding="utf-8-sig") as f:  # a BOM is dropped; \r\n read as \n
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise KBError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def _document(kind: str, row: Any, where: str, lineno: int) -> tuple[str, str, str]:
    """``(doc_id, title, text)`` of one input row."""
    if not isinstance(row, dict):
        raise KBError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if kind == "text":
        for field in ("id", "text"):
            if field not in row or row[field] is None:
                raise KBError(f"{where}: text row needs {field!r}")
        if not isinstance(row["text"], str):
            raise KBError(f"{where}: 'text' must be a string")
        title = row.get("title") or ""
        if not isinstance(title, str):
            raise KBError(f"{where}: 'title' must be a string")
        return str(row["id"]), title, row["text"]
    for col, v in row.items():
        if isinstance(v, (dict, list)):
            raise KBError(f"{where}: table cell {col!r} must be a scalar, got {type(v).__name__}")
    doc_id = str(row["id"]) if row.get("id") is not None else str(lineno)
    return doc_id, "", render_row(row)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise KBError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")


def build_kb(rows: Iterable[Any], out: str | Path, kind: str, *, source: str = "<rows>") -> int:
    """Write the knowledge base of ``rows`` (dicts as in the module doc, or
    ``(line_number, dict)`` pairs) to ``out``, replacing it atomically; returns the
    number of documents.  Duplicate ids raise :class:`KBError`."""
    _check_kind(kind)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    con = sqlite3.connect(tmp)
    try:
        con.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)")
        con.executemany("INSERT INTO meta VALUES (?, ?)", [("kind", kind), ("schema", _SCHEMA_VERSION)])
        con.execute("CREATE VIRTUAL TABLE docs USING fts5(doc_id UNINDEXED, title, text, tokenize='unicode61 remove_diacritics 2')")
        seen: dict[str, str] = {}
        for n, item in enumerate(rows, 1):
            lineno, row = item if isinstance(item, tuple) else (n, item)
            where = f"{source}:{lineno}"
            doc = _document(kind, row, where, lineno)
            if doc[0] in seen:
                raise KBError(f"{where}: duplicate id {doc[0]!r} (first at {seen[doc[0]]})")
            seen[doc[0]] = where
            con.execute("INSERT INTO docs(doc_id, title, text) VALUES (?, ?, ?)", doc)
        con.commit()
    except BaseException:
        con.close()
        os.unlink(tmp)
        raise
    con.close()
    os.replace(tmp, out)
    return len(seen)


def build_kb_from_jsonl(src: str | Path, out: str | Path, kind: str) -> int:
    """:func:`build_kb` of the JSONL file ``src`` (errors name ``src:line``)."""
    _check_kind(kind)
    return build_kb(read_jsonl(src), out, kind, source=str(src))


# ---------------------------------------------------------------------------
# searching


class KnowledgeBase:
    """A built knowledge base, opened read-only.

    >>> kb = KnowledgeBase("people.sqlite")          # doctest: +SKIP
    >>> kb.search("Where does Ann Smith live?", k=3)  # doctest: +SKIP
    [Hit(id='p3', text='Ann Smith lives in Velmora.', score=2.1, title='Ann Smith'), ...]
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"knowledge base {str(self.path)!r} does not exist")
        self._con = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            meta = dict(self._con.execute("SELECT key, value FROM meta"))
            self._con.execute("SELECT doc_id FROM docs LIMIT 0")
        except sqlite3.DatabaseError:
            self._con.close()
            raise KBError(f"{str(self.path)!r} is not a knowledge base") from None
        self.kind = meta.get("kind", "")

    def __len__(self) -> int:
        return self._con.execute("SELECT count(*) FROM docs").fetchone()[0]

    def search(self, query: str, k: int = 3) -> list[Hit]:
        """The ``k`` best documents for ``query`` by BM25 (ties by insertion order);
        ``[]`` when the query has no word or nothing matches."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise KBError(f"k must be a positive integer, got {k!r}")
        expr = match_expression(str(query))
        if expr is None:
            return []
        rows = self._con.execute(
            "SELECT doc_id, text, bm25(docs), title FROM docs WHERE docs MATCH ? ORDER BY bm25(docs), rowid LIMIT ?",
            (expr, k),
        )
        return [Hit(doc_id, text, -score, title) for doc_id, text, score, title in rows]

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "KnowledgeBase":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KnowledgeBase({str(self.path)!r}, kind={self.kind!r})"


# ---------------------------------------------------------------------------
# CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # "error: ..." first, exit 2 (argparse's code)
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m fastgrpo.kb", description="Build and search SQLite FTS5 (BM25) knowledge bases.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    b = sub.add_parser("build", help="build a knowledge base from JSONL")
    b.add_argument("--kind", required=True, help="text (rows with id, text, optional title) or table (one row per line)")
    b.add_argument("input", help="input JSONL file")
    b.add_argument("output", help="output .sqlite file (replaced)")
    s = sub.add_parser("search", help="search a knowledge base")
    s.add_argument("kb", help="a .sqlite knowledge base")
    s.add_argument("query")
    s.add_argument("-k", type=int, default=3, help="number of hits (default 3)")
    s.add_argument("--json", action="store_true", help="one JSON object per hit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            n = build_kb_from_jsonl(args.input, args.output, args.kind)
            print(f"built {args.output}: {n} {args.kind} documents")
        else:
            with KnowledgeBase(args.kb) as kb:
                for h in kb.search(args.query, k=args.k):
                    if args.json:
                        print(json.dumps(h._asdict(), ensure_ascii=False))
                    else:
                        print(f"{h.score:.4f}\t{h.id}\t{' '.join(h.text.split())}")
    except (OSError, KBError, sqlite3.Error) as e:
        msg = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror and e.filename else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
