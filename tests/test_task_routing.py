"""The synthetic routing task (fastgrpo.tasks.routing): determinism, KB facts, step rows."""

import json
import time
from collections import Counter, defaultdict

import pytest

import fastgrpo.rewards as R
from fastgrpo.kb import KnowledgeBase
from fastgrpo.rewards.retrieval import answer_recall
from fastgrpo.tasks import routing as T


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("routing")
    t0 = time.perf_counter()
    paths = T.write_task(d, seed=0)
    elapsed = time.perf_counter() - t0
    kbs = {name: KnowledgeBase(paths[name]) for name in T.KBS}
    yield paths, kbs, elapsed
    for kb in kbs.values():
        kb.close()


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_builds_fast(built):
    assert built[2] < 2.0


def test_tasks_root_imports_nothing():
    """``fastgrpo.tasks`` itself stays import-free: the trainer's config lists the built-in
    task packages under it without importing any of them."""
    import ast
    from pathlib import Path

    import fastgrpo.tasks
    tree = ast.parse((Path(fastgrpo.tasks.__file__)).read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert Path(T.__file__).parent.name == "routing" and (Path(T.__file__).parent / "task.py").is_file()


def test_deterministic_in_the_seed(built, tmp_path):
    paths, _, _ = built
    train, eval_ = T.make_splits(0)
    assert read(paths["train"]) == train and read(paths["eval"]) == eval_
    assert T.make_splits(0) == (train, eval_)
    assert T.make_world(0) == T.make_world(0)
    other_train, other_eval = T.make_splits(1)
    assert other_train != train and T.make_world(1) != T.make_world(0)


def test_world_names_are_unique():
    w = T.make_world(0)
    surnames = [p.name.split()[1] for p in w.people]
    cities = [c.name for c in w.cities]
    countries = {c.country for c in w.cities}
    everything = surnames + cities + sorted(countries)
    assert len(set(everything)) == len(everything)
    assert len(countries) == 4 and {p.city for p in w.people} <= set(cities)


def test_splits_are_disjoint_and_complete(built):
    paths, _, _ = built
    train, eval_ = read(paths["train"]), read(paths["eval"])
    tq, eq = {r["question_id"] for r in train}, {r["question_id"] for r in eval_}
    assert not tq & eq and len(eq) == 30
    assert len(tq | eq) == len(T.make_questions(T.make_world(0)))
    kinds = Counter(q.split("-")[0] for q in tq | eq)
    assert kinds == {"city": 48, "country": 48, "population": 48 + 12}


def test_every_teacher_step_finds_its_fact(built):
    """Every hop's reference KB returns the document holding the hop's answer in the top k."""
    _, kbs, _ = built
    world = T.make_world(0)
    n_hops = 0
    for q in T.make_questions(world):
        for h in q.hops:
            hits = kbs[h.kb].search(h.query, k=T.TOP_K)
            assert h.doc_id in [x.id for x in hits], (q.id, h)
            doc = next(x for x in hits if x.id == h.doc_id)
            assert answer_recall(doc.text, [h.answer]) == 1.0
            assert hits[0].id == h.doc_id  # the fact is the best hit, not just in the top k
            n_hops += 1
    assert n_hops == 48 * 5 + 12


def test_teacher_trajectory_shape():
    world = T.make_world(0)
    q = next(q for q in T.make_questions(world) if q.kind == "country_of_person")
    steps = T.teacher_trajectory(q)
    assert [s["type"] for s in steps] == ["retrieve", "answer", "retrieve", "answer", "retrieve", "answer"]
    assert [s.get("kb") for s in steps[::2]] == ["text", "table", "none"]
    person = world.person(q.question.removeprefix("Which country does ").removesuffix(" live in?"))
    assert steps[1]["answer"] == person.city
    assert steps[3]["answer"] == steps[5]["answer"] == q.answer == world.city(person.city).country
    assert steps[4] == {"type": "retrieve", "query": "none", "kb": "none", "doc_id": None}


def test_step_rows(built):
    paths, _, _ = built
    groups = defaultdict(list)
    for r in read(paths["train"]) + read(paths["eval"]):
        groups[r["question_id"]].append(r)
    keys = {"prompt", "step_type", "reference_query", "reference_kb", "answer", "kbs", "question_id", "step", "reference_doc"}
    for qid, rows in groups.items():
        assert [r["step"] for r in rows] == list(range(len(rows)))
        for r in rows:
            assert set(r) == keys and r["kbs"] == ["text", "table"]
            if r["step_type"] == "retrieve":
                assert r["reference_query"] and r["reference_kb"] in ("text", "table", "none") and r["answer"] is None
            else:
                assert r["step_type"] == "answer" and r["answer"] and r["reference_query"] is None
        # a later step's prompt holds the earlier sub-questions, retrieved passages and answers
        for i, r in enumerate(rows):
            for earlier in rows[:i]:
                if earlier["step_type"] == "retrieve" and earlier["reference_kb"] != "none":
                    assert earlier["reference_query"] in r["prompt"]
                if earlier["step_type"] == "answer":
                    assert f": {earlier['answer']}\n" in r["prompt"]
            if r["step_type"] == "answer" and i + 1 < len(rows):  # an intermediate answer: its passages are shown
                assert "Retrieved:\n[1] " in r["prompt"] and r["answer"] in r["prompt"].split("Retrieved:")[-1]
        assert rows[-2]["reference_kb"] == "none" and rows[-1]["step_type"] == "answer"


def test_teacher_scores_full_reward(built):
    """The teacher's own step outputs score 1 under the Step-GRPO rewards."""
    paths, _, _ = built
    rows = read(paths["eval"])
    comps = []
    for r in rows:
        if r["step_type"] == "retrieve":
            comps.append(f"<think>t</think><sub-question>{r['reference_query']}</sub-question><ret>{r['reference_kb']}</ret>")
        else:
            comps.append(f"<think>t</think><answer>{r['answer']}</answer>")
    cols = {k: [r[k] for r in rows] for k in ("step_type", "reference_query", "reference_kb", "answer", "kbs")}
    assert R.step_type_reward([r["prompt"] for r in rows], comps, **cols) == [1.0] * len(rows)
    # routing to the other KB halves a retrieval step's reward
    swap = {"text": "table", "table": "text", "none": "text"}
    wrong = [c.replace(f"<ret>{r['reference_kb']}</ret>", f"<ret>{swap[r['reference_kb']]}</ret>") if r["step_type"] == "retrieve" else c
             for c, r in zip(comps, rows)]  # fmt: skip
    got = R.step_type_reward(None, wrong, **cols)
    assert got == [0.5 if r["step_type"] == "retrieve" else 1.0 for r in rows]
