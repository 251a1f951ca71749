"""The built-in task, its JSONL loader and the task tokenizer."""

import json

import pytest

from fastgrpo.tasks.arithmetic import MAX_NEW_TOKENS, STEPS, answer_correct, extract_final_answer, make_splits
from fastgrpo.tasks.data import DataError, load_jsonl, write_jsonl


@pytest.fixture(scope="module")
def splits():
    return make_splits(seed=0, n_train=300, n_eval=50)


@pytest.fixture(scope="module")
def tok():
    from fastgrpo.tasks.arithmetic import build_tokenizer
    return build_tokenizer()


def test_splits_deterministic_and_disjoint(splits):
    train, evals = splits
    again = make_splits(seed=0, n_train=300, n_eval=50)
    assert (train, evals) == again
    assert make_splits(seed=1, n_train=300, n_eval=50)[0] != train
    assert len(train) == 300 and len(evals) == 50
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert len({r["prompt"] for r in train}) == 300


def test_rows_are_consistent(splits):
    for row in splits[0] + splits[1]:
        assert set(row) == {"prompt", "answer", "key_steps", "solution"}
        lines = row["solution"].split("\n")
        assert lines[0].startswith("### Rationales: ")
        assert lines[-1] == f"### The final answer is: {row['answer']}"
        steps = lines[1:-1]
        assert len(steps) in STEPS == (3, 4)
        assert len(row["key_steps"]) == len(steps)
        for k, (line, group) in enumerate(zip(steps, row["key_steps"]), 1):
            assert line.startswith(f"### Step {k}: ")
            eq = line.split(": ", 1)[1]
            assert group[0] == eq and len(group) >= 3
            lhs, rhs = eq.split(" = ")
            assert eval(lhs) == int(rhs) and int(rhs) >= 0  # noqa: S307 (our own arithmetic)
        assert int(row["answer"]) == int(steps[-1].rsplit("= ", 1)[1])


def test_reference_solutions_get_full_reward(splits):
    from fastgrpo.rewards import default_reward_set
    rows = splits[1][:20]
    res = default_reward_set()([r["prompt"] for r in rows], [r["solution"] for r in rows],
                               answer=[r["answer"] for r in rows], key_steps=[r["key_steps"] for r in rows])
    stats = res.stats()
    assert stats["accuracy"]["mean"] == 1.0
    assert stats["step_rvr"]["mean"] == 1.0
    assert stats["step_k"]["mean"] == 1.0
    assert res.total == pytest.approx([2.1] * len(rows))
    # the alternative surface forms count as key steps too
    alt = [r["solution"].replace(" * ", " x ").replace(" + ", " plus ") for r in rows]
    assert default_reward_set()([r["prompt"] for r in rows], alt, answer=[r["answer"] for r in rows],
                                key_steps=[r["key_steps"] for r in rows]).stats()["step_k"]["mean"] > 0.3


def test_answer_helpers():
    assert extract_final_answer("### Step 1: 1 + 1 = 2\n### The final answer is: 2") == "2"
    assert extract_final_answer("no answer here") is None
    assert answer_correct("### The final answer is: 17.", "17")
    assert not answer_correct("### The final answer is: 18", "17")


def test_load_jsonl_roundtrip_and_errors(tmp_path, splits):
    p = tmp_path / "train.jsonl"
    write_jsonl(splits[0][:5], p)
    assert load_jsonl(p) == splits[0][:5]
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "answer": 1}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON line"):
        load_jsonl(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"prompt": "a", "answer": 1}) + "\n\n" + json.dumps({"prompt": "b"}) + "\n")
    with pytest.raises(DataError, match=r"missing.jsonl:3: missing required field\(s\) 'answer'"):
        load_jsonl(missing)
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"prompt": "a", "answer": 3, "key_steps": ["1+2=3"]}) + "\n")
    assert load_jsonl(ok) == [{"prompt": "a", "answer": "3", "key_steps": [["1+2=3"]]}]


def test_task_cli(tmp_path):
    from fastgrpo.tasks.arithmetic import main
    main(["--out", str(tmp_path), "--n-train", "20", "--n-eval", "5"])
    assert len(load_jsonl(tmp_path / "train.jsonl")) == 20
    assert len(load_jsonl(tmp_path / "eval.jsonl")) == 5


def test_tokenizer_covers_task_and_roundtrips(tok, splits, tmp_path):
    from transformers import AutoTokenizer

    from fastgrpo.tasks.tokenizer import encode_prompt
    unk = tok.unk_token_id
    for row in splits[0][:100] + splits[1]:
        text = row["solution"] + tok.eos_token
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert unk not in ids
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=True) == row["solution"]
        assert unk not in encode_prompt(tok, row["prompt"])
    # digits are separate tokens
    pieces = tok.convert_ids_to_tokens(tok("= 128", add_special_tokens=False)["input_ids"])
    assert pieces == ["=", " 1", "2", "8"]
    ids = encode_prompt(tok, "Tom has 3 pens.")
    assert tok.decode(ids) == "<s><|user|>\nTom has 3 pens.\n<|assistant|>\n"
    assert {tok.bos_token, tok.eos_token, tok.pad_token} == {"<s>", "</s>", "<pad>"}
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert encode_prompt(again, "Tom has 3 pens.") == ids
    assert again.padding_side == "left"


def test_warmup_solution_skips_the_doubling_sentence():
    """Hand-worked: 2 + 6 = 8, 8 - 7 = 1, 1 * 2 = 2 (doubles) -> the slip drops step 3 and
    answers 1; a doubling in the middle carries the un-doubled value into the later steps."""
    import random
    from fastgrpo.tasks.arithmetic import warmup_solution
    row = {"solution": "### Rationales: r\n### Step 1: 2 + 6 = 8\n### Step 2: 8 - 7 = 1\n"
                       "### Step 3: 1 * 2 = 2\n### The final answer is: 2"}
    assert warmup_solution(row, random.Random(0), 1.0) == (
        "### Rationales: r\n### Step 1: 2 + 6 = 8\n### Step 2: 8 - 7 = 1\n"
        "### The final answer is: 1")
    assert warmup_solution(row, random.Random(0), 0.0) == row["solution"]
    middle = {"solution": "### Rationales: r\n### Step 1: 3 * 4 = 12\n### Step 2: 12 * 2 = 24\n"
                          "### Step 3: 24 + 5 = 29\n### The final answer is: 29"}
    assert warmup_solution(middle, random.Random(0), 1.0) == (
        "### Rationales: r\n### Step 1: 3 * 4 = 12\n### Step 2: 12 + 5 = 17\n"
        "### The final answer is: 17")
    # a first-step "a * 2" is the story's first operation, not a doubling sentence
    first = {"solution": "### Rationales: r\n### Step 1: 3 * 2 = 6\n### Step 2: 6 + 1 = 7\n"
                         "### The final answer is: 7"}
    assert warmup_solution(first, random.Random(0), 1.0) == first["solution"]
    # a slip that would need a non-positive subtraction is not written
    sub = {"solution": "### Rationales: r\n### Step 1: 2 + 3 = 5\n### Step 2: 5 * 2 = 10\n"
                       "### Step 3: 10 - 7 = 3\n### The final answer is: 3"}
    assert warmup_solution(sub, random.Random(0), 1.0) == sub["solution"]


def test_shipped_warmup_rarely_answers_right_but_often_gets_steps_right():
    """The regime the built-in task is built for (issue 16): the shipped warm-up's final
    answers are rarely right (0.080 held-out, greedy) while its single steps often are (key
    steps matched 0.43), so step-wise rewards separate samples the outcome reward cannot."""
    from fastgrpo.rewards import step_k, step_rvr_reward
    from fastgrpo.tasks.tokenizer import encode_prompt
    from fastgrpo.trainer.policy import load_model
    from fastgrpo.trainer.rollout import generate

    rows = make_splits(seed=0)[1][:100]  # the held-out split the default run reports
    model, tok = load_model()
    texts = generate(model, tok, [encode_prompt(tok, r["prompt"]) for r in rows], do_sample=False,
                     max_new_tokens=MAX_NEW_TOKENS).texts
    acc = sum(answer_correct(t, r["answer"]) for t, r in zip(texts, rows)) / len(rows)
    k = step_k(None, texts, key_steps=[r["key_steps"] for r in rows])
    assert acc < 0.2, acc
    assert sum(k) / len(k) > 0.3, k
    assert sum(step_rvr_reward(None, texts)) == len(rows)  # the layout is learned
