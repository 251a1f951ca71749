"""SQLite FTS5 knowledge bases (fastgrpo.kb): BM25 order, hostile queries, builders, CLI."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fastgrpo import kb as K

ROOT = Path(__file__).resolve().parents[1]

ANIMALS = [
    {"id": "zebra", "title": "Zebra", "text": "The zebra is a striped horse of Africa."},
    {"id": "camel", "text": "The camel crosses the desert and stores fat in its hump."},
    {"id": "penguin", "text": "The penguin swims in cold seas and cannot fly."},
    {"id": "owl", "text": "The owl hunts mice at night."},
    {"id": "lion", "text": "The lion lives in Africa and hunts zebra and antelope in the grass of the savanna plains."},
    {"id": "eagle", "text": "The eagle has sharp eyes and hunts from the sky."},
    {"id": "city", "text": "Zürich and 東京 are cities, NEAR lakes AND rivers; OR not."},
]


@pytest.fixture(scope="module")
def animals(tmp_path_factory):
    path = tmp_path_factory.mktemp("kb") / "animals.sqlite"
    assert K.build_kb(ANIMALS, path, "text") == len(ANIMALS)
    with K.KnowledgeBase(path) as kb:
        yield kb


def ids(hits):
    return [h.id for h in hits]


# ---------------------------------------------------------------------------
# ranking


def test_bm25_finds_the_right_document(animals):
    hits = animals.search("striped horse", k=3)
    assert ids(hits) == ["zebra"]
    assert hits[0].title == "Zebra" and "striped" in hits[0].text and hits[0].score > 0
    assert ids(animals.search("which animal crosses the desert?", k=1)) == ["camel"]
    assert ids(animals.search("cold seas", k=3))[0] == "penguin"


def test_bm25_order(animals):
    # "zebra" is in zebra (title and text, short) and lion (once, long): zebra first
    hits = animals.search("zebra", k=5)
    assert ids(hits) == ["zebra", "lion"]
    assert hits[0].score > hits[1].score
    # "hunts": owl, lion and eagle; the shortest document first (length normalisation), lion last
    hits = animals.search("hunts", k=5)
    assert ids(hits) == ["owl", "eagle", "lion"]
    assert hits[0].score > hits[1].score > hits[2].score
    # two rare words beat one: lion has both "africa" and "savanna"
    assert ids(animals.search("africa savanna", k=2)) == ["lion", "zebra"]


def test_k_limits_and_validation(animals):
    assert len(animals.search("the", k=2)) == 2
    assert len(animals.search("the", k=100)) == 6
    for k in (0, -1, 1.5, True):
        with pytest.raises(K.KBError, match="positive integer"):
            animals.search("zebra", k=k)
    assert len(animals) == len(ANIMALS) and animals.kind == "text"


HOSTILE = [
    '"',
    '"zebra',
    'zebra"',
    "'zebra'",
    "zebra AND NOT lion",
    "zebra OR",
    "AND",
    "NOT zebra",
    "NEAR(zebra lion, 2)",
    "NEAR",
    "zebra*",
    "*",
    "title:zebra",
    "text : zebra",
    "doc_id:zebra",
    "{title text}: zebra",
    "(zebra",
    "zebra)",
    "-zebra",
    "zebra - lion",
    "+zebra ^lion",
    "zebra; DROP TABLE docs; --",
    "') OR 1=1 --",
    "\x00zebra",
    "",
    "   ",
    "😀",
    "Zürich",
    "zurich",
    "東京",
]


@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_queries_are_plain_words(animals, query):
    hits = animals.search(query, k=10)
    # the same as searching the query's words, lower-cased, with every symbol gone
    words = " ".join(K._WORD.findall(query)).lower()
    assert ids(hits) == ids(animals.search(words, k=10))
    assert len(animals) == len(ANIMALS)  # nothing dropped


def test_hostile_queries_meaning(animals):
    # NOT excludes nothing: it is the word "not" (in "city"), OR-ed with "zebra"
    assert sorted(ids(animals.search("NOT zebra", k=10))) == ["city", "lion", "zebra"]
    assert ids(animals.search("title:zebra", k=1)) == ["zebra"]
    assert animals.search("", k=3) == [] and animals.search("😀 ... ?!", k=3) == []
    assert ids(animals.search("Zürich", k=3)) == ["city"]
    assert ids(animals.search("zurich", k=3)) == ["city"]  # diacritics folded
    assert ids(animals.search("東京", k=3)) == ["city"]
    assert ids(animals.search("near", k=3)) == ["city"]


def test_match_expression():
    assert K.match_expression('Zebra "AND" zebra NEAR(x)') == '"zebra" OR "and" OR "near" OR "x"'
    assert K.match_expression("* : - ( )") is None


# ---------------------------------------------------------------------------
# table KB and building


def test_table_kb(tmp_path):
    rows = [
        {"id": "c1", "city": "Velmora", "country": "Ostria", "population": 41200},
        {"city": "Kalo", "country": "Ostria", "population": 900, "capital": True, "note": None},
    ]
    assert K.render_row(rows[0]) == "city: Velmora; country: Ostria; population: 41200"
    path = tmp_path / "t.sqlite"
    K.build_kb(rows, path, "table")
    with K.KnowledgeBase(path) as kb:
        assert kb.kind == "table"
        top = kb.search("population of Kalo", k=1)[0]
        assert top.id == "2" and top.text == "city: Kalo; country: Ostria; population: 900; capital: True; note: "
        assert ids(kb.search("41200", k=3)) == ["c1"]


@pytest.mark.parametrize(
    "kind, rows, message",
    [
        ("text", [{"id": 1, "text": "a"}, {"id": "1", "text": "b"}], r"<rows>:2: duplicate id '1' \(first at <rows>:1\)"),
        ("text", [{"id": "a"}], r"<rows>:1: text row needs 'text'"),
        ("text", [{"text": "a"}], r"<rows>:1: text row needs 'id'"),
        ("text", [{"id": "a", "text": 3}], "'text' must be a string"),
        ("text", [["a", "b"]], "expected a JSON object, got list"),
        ("table", [{"a": [1, 2]}], "table cell 'a' must be a scalar"),
        ("graph", [], "unknown kind 'graph'"),
    ],
)
def test_build_errors(tmp_path, kind, rows, message):
    out = tmp_path / "kb.sqlite"
    with pytest.raises(K.KBError, match=message):
        K.build_kb(rows, out, kind)
    assert not out.exists() and os.listdir(tmp_path) == []  # no half-built file left


def test_failed_build_keeps_the_old_kb(tmp_path):
    out = tmp_path / "kb.sqlite"
    K.build_kb(ANIMALS, out, "text")
    with pytest.raises(K.KBError):
        K.build_kb([{"id": "x"}], out, "text")
    with K.KnowledgeBase(out) as kb:
        assert len(kb) == len(ANIMALS)
    assert os.listdir(tmp_path) == ["kb.sqlite"]


def test_read_jsonl_names_file_and_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "text": "x"}\n\n{"id": "b", "text": \n', encoding="utf-8")
    with pytest.raises(K.KBError, match=rf"{src}:3: not valid JSON"):
        K.build_kb_from_jsonl(src, tmp_path / "o.sqlite", "text")
    src.write_text('{"id": "a", "text": "x"}\n\n{"id": "a", "text": "y"}\n', encoding="utf-8")
    with pytest.raises(K.KBError, match=rf"{src}:3: duplicate id 'a' \(first at {src}:1\)"):
        K.build_kb_from_jsonl(src, tmp_path / "o.sqlite", "text")


def test_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        K.KnowledgeBase(tmp_path / "missing.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database")
    with pytest.raises(K.KBError, match="not a knowledge base"):
        K.KnowledgeBase(junk)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t(x)").connection.commit()
    with pytest.raises(K.KBError, match="not a knowledge base"):
        K.KnowledgeBase(other)


def test_opened_read_only(animals):
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        animals._con.execute("INSERT INTO docs(doc_id, title, text) VALUES ('x', '', 'y')")


# ---------------------------------------------------------------------------
# CLI


def cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels")]), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fastgrpo.kb", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


@pytest.mark.slow  # each run imports torch (fastgrpo/__init__.py)
def test_cli_build_and_search(tmp_path):
    src = tmp_path / "animals.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ANIMALS), encoding="utf-8")
    r = cli("build", "--kind", "text", src, tmp_path / "a.sqlite", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "7 text documents" in r.stdout
    r = cli("search", tmp_path / "a.sqlite", 'striped "horse" AND (Africa', "-k", "2", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    hits = [json.loads(line) for line in r.stdout.splitlines()]
    assert [h["id"] for h in hits] == ["zebra", "lion"]
    assert set(hits[0]) == {"id", "text", "score", "title"}


def test_cli_in_process(tmp_path, capsys):
    src = tmp_path / "animals.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ANIMALS), encoding="utf-8")
    assert K.main(["build", "--kind", "text", str(src), str(tmp_path / "a.sqlite")]) == 0
    capsys.readouterr()
    assert K.main(["search", str(tmp_path / "a.sqlite"), "--", "-zebra"]) == 0  # "--" lets a query start with "-"
    out = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[1] for line in out] == ["zebra", "lion"]
    for argv, message in [
        (["search", str(tmp_path / "a.sqlite"), "zebra", "-k", "0"], "k must be a positive integer"),
        (["search", str(src), "zebra"], "is not a knowledge base"),
        (["search", str(tmp_path / "none.sqlite"), "zebra"], "does not exist"),
    ]:
        assert K.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "bad_json", "unknown_kind", "no_args"])
def test_cli_bad_input_exits_2(tmp_path, case):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "y",}\n', encoding="utf-8")
    args, message = {
        "missing": (["build", "--kind", "text", tmp_path / "nope.jsonl", tmp_path / "o.sqlite"], "nope.jsonl"),
        "bad_json": (["build", "--kind", "text", src, tmp_path / "o.sqlite"], f"{src}:2: not valid JSON"),
        "unknown_kind": (["build", "--kind", "graph", src, tmp_path / "o.sqlite"], "unknown kind 'graph'"),
        "no_args": (["search"], "required"),
    }[case]
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert "error: " in r.stderr and message in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (tmp_path / "o.sqlite").exists()
