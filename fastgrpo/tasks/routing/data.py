"""A synthetic multi-hop routing task for R1-Router's Step-GRPO (runs on CPU).

A seeded *world* of facts is split across two knowledge bases
(:mod:`fastgrpo.kb`):

* ``text`` -- one passage per person: ``"Ann Korvel is a baker. Ann Korvel lives in Velmora."``
* ``table`` -- one row per city: ``"city: Velmora; country: Ostria; population: 41200"``

Questions need one or two retrievals, each from the right KB::

    Which city does Ann Korvel live in?                         text
    What is the population of Velmora?                          table
    Which country does Ann Korvel live in?                      text, then table
    What is the population of the city where Ann Korvel lives?  text, then table

The teacher trajectory (:func:`teacher_trajectory`) follows MoRE's step order:
for every hop a retrieval step (sub-question + KB) and an answer step (the
sub-answer from the retrieved passages), then a retrieval step that stops
(``none``/``none``) and the final answer step.  :func:`step_rows` turns it into
the offline step states, one GRPO group per row::

    {"prompt", "step_type": "retrieve" | "answer", "reference_query", "reference_kb",
     "answer", "kbs", "question_id", "step", "reference_doc"}

(fields a step type does not use are ``None``).  A later step's prompt holds the
earlier sub-questions, the passages retrieved for them (a real BM25 search of the
built KB with the teacher's sub-question, top :data:`TOP_K`) and their answers.

Everything is deterministic in the seed; train and eval hold disjoint questions.
``python -m fastgrpo.tasks.routing --out DIR`` writes ``DIR/text.sqlite``,
``DIR/table.sqlite``, ``DIR/train.jsonl`` and ``DIR/eval.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from fastgrpo.kb import Hit, KnowledgeBase, build_kb
from fastgrpo.tasks.arithmetic.tokenizer import build_tokenizer

__all__ = ["KBS", "TOP_K", "Person", "City", "World", "Step", "Question", "make_world", "world_documents", "build_kbs",
           "make_questions", "teacher_trajectory", "step_rows", "make_splits", "write_task", "main",
           "ROUTING_WARMUP_DIR", "ONLINE_INSTRUCTIONS", "retrieve_completion", "answer_completion",
           "teacher_completion", "online_row", "online_splits", "tool_text", "online_teacher_segments",
           "routing_corpus", "build_routing_tokenizer"]

KBS = ("text", "table")
TOP_K = 3
FIRST_NAMES = ("Ann", "Ben", "Cora", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kira", "Lev")
JOBS = ("baker", "pilot", "teacher", "nurse", "painter", "farmer", "chemist", "sailor")
_SYLLABLES = ("ka", "lo", "ve", "mi", "ra", "to", "sen", "dor", "bel", "tar", "quin", "zu", "fen", "gar", "hol", "nir")

RETRIEVE_INSTRUCTIONS = (
    "You route questions across knowledge bases. Knowledge bases: text (passages about people: "
    "their job and the city they live in), table (one row per city: country and population).\n"
    "Write the next single-hop sub-question and the knowledge base to search, in the format "
    "<think>...</think><sub-question>...</sub-question><ret>KB</ret> with KB one of: text, table, none. "
    "When no more information is needed, write none as the sub-question and as the KB."
)
ANSWER_INSTRUCTIONS = "Answer the question from the information above, in the format <think>...</think><answer>...</answer>."
# the online form: one prompt per question; the policy writes every step, the search results
# are appended (tool tokens) after each <ret>KB</ret> with a real KB
ONLINE_INSTRUCTIONS = (
    RETRIEVE_INSTRUCTIONS + " The search results follow in <result>...</result>; then answer the "
    "sub-question as <think>...</think><answer>...</answer> and write the next step. After the "
    "step with none, write the final answer of the origin question the same way."
)
# the warm-up checkpoint of this task (python -m fastgrpo.sft --task routing)
ROUTING_WARMUP_DIR = Path(__file__).resolve().parent / "checkpoint"
THINK_RETRIEVE = "I need one more fact."
THINK_STOP = "I have all I need."
THINK_ANSWER = "It is in the information above."


@dataclass(frozen=True)
class Person:
    name: str
    job: str
    city: str


@dataclass(frozen=True)
class City:
    name: str
    country: str
    population: int


@dataclass(frozen=True)
class World:
    people: tuple[Person, ...]
    cities: tuple[City, ...]

    def city(self, name: str) -> City:
        return next(c for c in self.cities if c.name == name)

    def person(self, name: str) -> Person:
        return next(p for p in self.people if p.name == name)


@dataclass(frozen=True)
class Step:
    """One teacher hop: ``query`` searched in ``kb``; ``doc_id`` holds ``answer``."""

    query: str
    kb: str
    doc_id: str
    answer: str


@dataclass(frozen=True)
class Question:
    id: str
    kind: str
    question: str
    answer: str
    hops: tuple[Step, ...] = field(default=())


# ---------------------------------------------------------------------------
# world and knowledge bases


def _names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """``n`` new capitalised made-up words of 2-3 syllables, none in ``taken`` (updated)."""
    out = []
    while len(out) < n:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def make_world(seed: int = 0, n_people: int = 48, n_cities: int = 12, n_countries: int = 4) -> World:
    """People (unique surnames) living in cities, cities in countries; all names made up
    and distinct across kinds, so every fact has exactly one document."""
    rng = random.Random(f"routing-world-{seed}")
    taken: set[str] = set()
    countries = _names(rng, n_countries, taken)
    cities = tuple(City(name, countries[i % n_countries], rng.randrange(1000, 100000, 100))
                   for i, name in enumerate(_names(rng, n_cities, taken)))  # fmt: skip
    people = tuple(Person(f"{rng.choice(FIRST_NAMES)} {surname}", rng.choice(JOBS), rng.choice(cities).name)
                   for surname in _names(rng, n_people, taken))  # fmt: skip
    return World(people, cities)


def _person_doc(i: int) -> str:
    return f"person-{i}"


def _city_doc(i: int) -> str:
    return f"city-{i}"


def world_documents(world: World) -> dict[str, list[dict]]:
    """The KB input rows: ``{"text": [{id, title, text}], "table": [{id, city, country, population}]}``."""
    text = [{"id": _person_doc(i), "title": p.name, "text": f"{p.name} is a {p.job}. {p.name} lives in {p.city}."}
            for i, p in enumerate(world.people)]  # fmt: skip
    table = [{"id": _city_doc(i), "city": c.name, "country": c.country, "population": c.population}
             for i, c in enumerate(world.cities)]  # fmt: skip
    return {"text": text, "table": table}


def build_kbs(world: World, out_dir: str | Path) -> dict[str, Path]:
    """Build ``out_dir/text.sqlite`` and ``out_dir/table.sqlite``; returns ``{kb name: path}``."""
    out_dir = Path(out_dir)
    paths = {}
    for name, rows in world_documents(world).items():
        paths[name] = out_dir / f"{name}.sqlite"
        build_kb(rows, paths[name], name, source=f"routing:{name}")
    return paths


# ---------------------------------------------------------------------------
# questions and teacher trajectories


def make_questions(world: World) -> list[Question]:
    """Every question of the world, in a fixed order (see the module doc)."""
    city_index = {c.name: i for i, c in enumerate(world.cities)}
    qs: list[Question] = []
    for i, p in enumerate(world.people):
        c = world.city(p.city)
        lives = Step(f"Which city does {p.name} live in?", "text", _person_doc(i), p.city)
        country = Step(f"Which country is {c.name} in?", "table", _city_doc(city_index[c.name]), c.country)
        pop = Step(f"What is the population of {c.name}?", "table", _city_doc(city_index[c.name]), str(c.population))
        qs.append(Question(f"city-of-{i}", "city_of_person", lives.query, p.city, (lives,)))
        qs.append(Question(f"country-of-{i}", "country_of_person", f"Which country does {p.name} live in?", c.country, (lives, country)))
        qs.append(Question(f"population-of-{i}", "population_of_person_city",
                           f"What is the population of the city where {p.name} lives?", str(c.population), (lives, pop)))  # fmt: skip
    for j, c in enumerate(world.cities):
        pop = Step(f"What is the population of {c.name}?", "table", _city_doc(j), str(c.population))
        qs.append(Question(f"population-{j}", "population_of_city", pop.query, str(c.population), (pop,)))
    return qs


def teacher_trajectory(q: Question) -> list[dict]:
    """The teacher's steps for ``q``: per hop ``{"type": "retrieve", "query", "kb", "doc_id"}``
    then ``{"type": "answer", "answer"}``; then the stop step (``none``/``none``) and the
    final answer."""
    steps: list[dict] = []
    for h in q.hops:
        steps.append({"type": "retrieve", "query": h.query, "kb": h.kb, "doc_id": h.doc_id})
        steps.append({"type": "answer", "answer": h.answer})
    steps.append({"type": "retrieve", "query": "none", "kb": "none", "doc_id": None})
    steps.append({"type": "answer", "answer": q.answer})
    return steps


def _passages(hits: list[Hit]) -> str:
    return "\n".join(f"[{n}] {h.text}" for n, h in enumerate(hits, 1))


def step_rows(q: Question, kbs: dict[str, KnowledgeBase], k: int = TOP_K) -> list[dict]:
    """The offline step states of ``q``'s teacher trajectory (one row per step)."""
    history = f"Origin question: {q.question}\n"
    rows: list[dict] = []
    base = {"question_id": q.id, "kbs": list(KBS)}
    for n, h in enumerate(q.hops, 1):
        rows.append(dict(base, step=len(rows), step_type="retrieve", prompt=f"{RETRIEVE_INSTRUCTIONS}\n\n{history}",
                         reference_query=h.query, reference_kb=h.kb, reference_doc=h.doc_id, answer=None))  # fmt: skip
        history += f"Sub-question {n} ({h.kb}): {h.query}\nRetrieved:\n{_passages(kbs[h.kb].search(h.query, k=k))}\n"
        rows.append(dict(base, step=len(rows), step_type="answer",
                         prompt=f"{history}Question: {h.query}\n{ANSWER_INSTRUCTIONS}",
                         reference_query=None, reference_kb=None, reference_doc=None, answer=h.answer))  # fmt: skip
        history += f"Answer {n}: {h.answer}\n"
    rows.append(dict(base, step=len(rows), step_type="retrieve", prompt=f"{RETRIEVE_INSTRUCTIONS}\n\n{history}",
                     reference_query="none", reference_kb="none", reference_doc=None, answer=None))  # fmt: skip
    rows.append(dict(base, step=len(rows), step_type="answer",
                     prompt=f"{history}Now give the final answer of the origin question: {q.question}\n{ANSWER_INSTRUCTIONS}",
                     reference_query=None, reference_kb=None, reference_doc=None, answer=q.answer))  # fmt: skip
    return rows


def make_splits(seed: int = 0, n_eval: int = 30, kb_dir: str | Path | None = None, **world_kw) -> tuple[list[dict], list[dict]]:
    """``(train_rows, eval_rows)``: the questions of ``make_world(seed, **world_kw)``
    shuffled by ``seed``, the first ``n_eval`` for eval, and their step rows.  The
    prompts' passages come from a search of the KBs, built into ``kb_dir`` (a
    temporary directory when ``None``)."""
    world = make_world(seed, **world_kw)
    qs = make_questions(world)
    if not 0 <= n_eval < len(qs):
        raise ValueError(f"n_eval must be in [0, {len(qs)}), got {n_eval}")
    random.Random(f"routing-split-{seed}").shuffle(qs)
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_kbs(world, kb_dir if kb_dir is not None else tmp)
        kbs = {name: KnowledgeBase(p) for name, p in paths.items()}
        try:
            rows = [step_rows(q, kbs) for q in qs]
        finally:
            for kb in kbs.values():
                kb.close()
    flat = lambda groups: [r for g in groups for r in g]  # noqa: E731
    return flat(rows[n_eval:]), flat(rows[:n_eval])


def _write_jsonl(rows: Iterable[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------
# teacher completions (the warm-up targets), the online form, the tokenizer


def retrieve_completion(query: str, kb: str) -> str:
    """A retrieval step as the teacher writes it."""
    think = THINK_STOP if kb == "none" else THINK_RETRIEVE
    return f"<think>{think}</think><sub-question>{query}</sub-question><ret>{kb}</ret>"


def answer_completion(answer: str) -> str:
    """An answer step as the teacher writes it."""
    return f"<think>{THINK_ANSWER}</think><answer>{answer}</answer>"


def _noisy_kb(kb: str, rng: random.Random | None, kb_noise: float) -> str:
    """The warm-up data's habit: a table lookup sent to the text KB with probability ``kb_noise``."""
    return "text" if kb == "table" and rng is not None and rng.random() < kb_noise else kb


def teacher_completion(row: dict, rng: random.Random | None = None, kb_noise: float = 0.0) -> str:
    """The warm-up target of an offline step row; with probability ``kb_noise`` a ``table``
    step names ``text`` instead (imperfect warm-up data that Step-GRPO's KB term corrects)."""
    if row["step_type"] == "retrieve":
        return retrieve_completion(row["reference_query"], _noisy_kb(row["reference_kb"], rng, kb_noise))
    return answer_completion(row["answer"])


def online_row(q: Question) -> dict:
    """The online form's row of ``q``: the prompt and the teacher's hops (for the step rewards)."""
    return {"prompt": f"{ONLINE_INSTRUCTIONS}\n\nOrigin question: {q.question}\n", "question_id": q.id,
            "question": q.question, "answer": q.answer, "kbs": list(KBS),
            "hops": [{"query": h.query, "kb": h.kb, "doc_id": h.doc_id, "answer": h.answer} for h in q.hops]}


def online_splits(seed: int = 0, n_eval: int = 30, **world_kw) -> tuple[list[dict], list[dict]]:
    """``(train, eval)`` online rows: the same questions and split as :func:`make_splits`."""
    world = make_world(seed, **world_kw)
    qs = make_questions(world)
    if not 0 <= n_eval < len(qs):
        raise ValueError(f"n_eval must be in [0, {len(qs)}), got {n_eval}")
    random.Random(f"routing-split-{seed}").shuffle(qs)
    rows = [online_row(q) for q in qs]
    return rows[n_eval:], rows[:n_eval]


def tool_text(hits: list[Hit] | None, kb: str) -> str:
    """The tool output appended after a ``<ret>KB</ret>`` call (``hits`` None: unknown KB)."""
    if hits is None:
        body = f"no knowledge base named {kb}"
    else:
        body = _passages(hits) if hits else "nothing found"
    return f"\n<result>\n{body}\n</result>\n"


def online_teacher_segments(row: dict, kbs: dict[str, KnowledgeBase], k: int = TOP_K,
                            rng: random.Random | None = None, kb_noise: float = 0.0) -> list[tuple[str, str]]:
    """The teacher's online trajectory as ``[(\"policy\" | \"tool\", text), ...]``.  With
    probability ``kb_noise`` a table hop first asks the text KB, reads its (useless) results,
    answers ``unknown`` and then asks the table KB: the detour Step-GRPO learns to skip."""
    segs: list[tuple[str, str]] = []

    def hop(query: str, kb: str, answer: str) -> None:
        segs.append(("policy", retrieve_completion(query, kb)))
        segs.append(("tool", tool_text(kbs[kb].search(query, k=k), kb)))
        segs.append(("policy", answer_completion(answer)))

    for h in row["hops"]:
        if _noisy_kb(h["kb"], rng, kb_noise) != h["kb"]:
            hop(h["query"], "text", "unknown")
        hop(h["query"], h["kb"], h["answer"])
    segs.append(("policy", retrieve_completion("none", "none")))
    segs.append(("policy", answer_completion(row["answer"])))
    return segs


def routing_corpus(seed: int = 0) -> list[str]:
    """Texts whose words make the routing task's tokenizer vocabulary (prompts, KB documents,
    teacher steps, tool outputs)."""
    world = make_world(seed)
    train, eval_ = make_splits(seed)
    docs = world_documents(world)
    texts = [r["prompt"] for r in train + eval_] + [ONLINE_INSTRUCTIONS, tool_text([], "x"), tool_text(None, "x")]
    texts += [teacher_completion(r) for r in train + eval_] + [retrieve_completion("q", kb) for kb in KBS + ("none",)]
    texts += [d["text"] for d in docs["text"]] + [f"city: {d['city']}; country: {d['country']}; population: {d['population']}" for d in docs["table"]]
    texts += [answer_completion("unknown"), " unknown", " ".join(KBS), "none", " none"]
    return texts


def build_routing_tokenizer(seed: int = 0):
    """The arithmetic task's word-level tokenizer (``tasks.arithmetic.tokenizer``) extended to
    the routing world's words."""
    return build_tokenizer(routing_corpus(seed))


def write_task(out_dir: str | Path, seed: int = 0, n_eval: int = 30) -> dict[str, Path]:
    """Write the KBs and the splits into ``out_dir``; returns the four paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, eval_ = make_splits(seed, n_eval, kb_dir=out_dir)
    paths = {"text": out_dir / "text.sqlite", "table": out_dir / "table.sqlite",
             "train": out_dir / "train.jsonl", "eval": out_dir / "eval.jsonl"}  # fmt: skip
    _write_jsonl(train, paths["train"])
    _write_jsonl(eval_, paths["eval"])
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastgrpo.tasks.routing", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-eval", type=int, default=30, help="questions in the eval split")
    args = p.parse_args(argv)
    for name, path in write_task(args.out, args.seed, args.n_eval).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
