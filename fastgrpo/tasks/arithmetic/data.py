"""The built-in task: synthetic multi-step arithmetic word problems with key steps.

Every problem is a short story whose answer takes 3 or 4 arithmetic steps on small numbers::

    Tom has 3 boxes with 4 apples in each box. Then he buys 5 more apples.
    Then he gives away 7 apples. How many apples does Tom have now?

and its reference solution is written in the R1-VL layout that the StepGRPO rewards read::

    ### Rationales: Work through the story in order, one operation per step.
    ### Step 1: 3 * 4 = 12
    ### Step 2: 12 + 5 = 17
    ### Step 3: 17 - 7 = 10
    ### The final answer is: 10

Why 3 or 4 steps (``STEPS``): a final answer is right only when every step is, so for the
warm-up model a right answer is rare (7% of its samples, 8% greedy) while single steps are
often right (k, the matched key-step fraction, 0.35 on average).  Most groups of G samples
then have no right answer at all -- no signal for an outcome-only reward -- but do differ
in how many steps they got right, which StepRAR rewards: the mechanism R1-VL argues for.
With 2 or 3 steps (the task before 2026-12-06) outcome success was common enough (13% of
samples) that outcome-only GRPO came close to StepGRPO (``python -m fastgrpo.experiments
ablation``; README).

A row (one JSON object per line in the JSONL files) holds ``prompt``, ``answer`` (a string),
``key_steps`` (one group per step, each a list of equivalent surface forms of the step's
equation, e.g. ``["3 * 4 = 12", "3*4=12", "3 × 4 = 12", "3 x 4 = 12", "3 times 4 is 12"]``)
and ``solution``.  Generation is deterministic in the seed; the eval split never repeats a
train prompt.

Write the splits to disk with ``python -m fastgrpo.tasks.arithmetic --out DIR`` (``DIR/train.jsonl``,
``DIR/eval.jsonl``).
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

from fastgrpo.tasks.data import write_jsonl

__all__ = ["make_problem", "make_splits", "RATIONALE", "STEPS", "MAX_NEW_TOKENS", "NAMES", "ITEMS", "extract_final_answer", "answer_correct", "warmup_solution"]

NAMES = [("Tom", "he"), ("Sam", "he"), ("Ben", "he"), ("Leo", "he"),
         ("Ann", "she"), ("Mia", "she"), ("Eva", "she"), ("Zoe", "she")]
ITEMS = ["apples", "pens", "books", "coins", "cards", "eggs", "stamps", "shells"]
RATIONALE = "Work through the story in order, one operation per step."
STEPS = (3, 4)  # arithmetic steps per problem (see the module docstring)
MAX_NEW_TOKENS = 96  # completion budget: the longest reference solution is 78 tokens with EOS

_SYMBOL_WORD = {"*": "times", "+": "plus", "-": "minus"}
_SYMBOL_ALT = {"*": ["×", "x"], "+": [], "-": ["−"]}


def _step_forms(a: int, op: str, b: int, r: int) -> list[str]:
    """Equivalent surface forms of one step's equation (the step's key-step group)."""
    forms = [f"{a} {op} {b} = {r}", f"{a}{op}{b}={r}"]
    forms += [f"{a} {alt} {b} = {r}" for alt in _SYMBOL_ALT[op]]
    forms.append(f"{a} {_SYMBOL_WORD[op]} {b} is {r}")
    return forms


def make_problem(rng: random.Random, lengths: tuple[int, ...] = STEPS) -> dict:
    """One problem row (``prompt``, ``answer``, ``key_steps``, ``solution``) drawn from ``rng``;
    its number of arithmetic steps is drawn from ``lengths``."""
    name, pron = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    steps: list[tuple[int, str, int, int]] = []  # (a, op, b, result)

    a, b = rng.randint(2, 9), rng.randint(2, 9)
    if rng.random() < 0.5:
        story = [f"{name} has {a} boxes with {b} {item} in each box."]
        steps.append((a, "*", b, a * b))
    else:
        story = [f"{name} has {a} {item} and gets {b} more."]
        steps.append((a, "+", b, a + b))

    n_steps = rng.choice(lengths)
    for _ in range(n_steps - 1):
        cur = steps[-1][3]
        kind = rng.choice(("add", "sub", "double")) if cur <= 40 else rng.choice(("add", "sub"))
        if kind == "add":
            c = rng.randint(1, 20)
            story.append(f"Then {pron} buys {c} more {item}.")
            steps.append((cur, "+", c, cur + c))
        elif kind == "sub" and cur > 1:
            c = rng.randint(1, min(cur - 1, 20))
            story.append(f"Then {pron} gives away {c} {item}.")
            steps.append((cur, "-", c, cur - c))
        else:
            story.append(f"Then the number of {item} doubles.")
            steps.append((cur, "*", 2, cur * 2))

    story.append(f"How many {item} does {name} have now?")
    answer = str(steps[-1][3])
    lines = [f"### Rationales: {RATIONALE}"]
    lines += [f"### Step {i}: {x} {op} {y} = {r}" for i, (x, op, y, r) in enumerate(steps, 1)]
    lines.append(f"### The final answer is: {answer}")
    return {
        "prompt": " ".join(story),
        "answer": answer,
        "key_steps": [_step_forms(x, op, y, r) for x, op, y, r in steps],
        "solution": "\n".join(lines),
    }


def make_splits(seed: int = 0, n_train: int = 2000, n_eval: int = 200) -> tuple[list[dict], list[dict]]:
    """Deterministic train / eval splits; no eval prompt appears in train."""
    rng = random.Random(seed)
    train: list[dict] = []
    seen: set[str] = set()
    tries = 0
    while len(train) < n_train:
        row = make_problem(rng)
        tries += 1
        if row["prompt"] in seen and tries < 50 * n_train:
            continue
        seen.add(row["prompt"])
        train.append(row)
    evals: list[dict] = []
    tries = 0
    while len(evals) < n_eval:
        row = make_problem(rng)
        tries += 1
        if row["prompt"] in seen:
            if tries > 50 * (n_eval + n_train):
                raise RuntimeError("could not draw enough distinct eval problems")
            continue
        seen.add(row["prompt"])
        evals.append(row)
    return train, evals


# ----------------------------------------------------------------------------- warm-up data

_STEP_LINE = re.compile(r"^### Step (\d+): (\d+) ([*+-]) (\d+) = (-?\d+)$")


def warmup_solution(row: dict, rng: random.Random, skip_double_prob: float = 0.0) -> str:
    """The SFT target for ``row``: its reference solution, or, with ``skip_double_prob``, the
    same solution with one systematic reasoning slip: the story's "the number of X doubles"
    sentence is ignored (the doubling step is dropped and the later steps carry the
    un-doubled value, so the final answer is wrong).

    Real warm-up data has habits like this; StepGRPO's rewards (the missing key step in
    StepRAR, the wrong final answer in the accuracy term) are what teaches the policy to stop
    skipping the sentence.  The eval split and the RL rewards always use the clean reference.
    """
    lines = row["solution"].split("\n")
    steps = [_STEP_LINE.match(line) for line in lines]
    doubles = [i for i, m in enumerate(steps) if m and int(m.group(1)) > 1
               and m.group(3) == "*" and m.group(4) == "2"]
    if not doubles or rng.random() >= skip_double_prob:
        return row["solution"]
    k = doubles[0]
    cur = int(steps[k].group(2))          # the value before doubling
    out, number = [], 0
    for i, (line, m) in enumerate(zip(lines, steps)):
        if i == k:
            continue
        if m is None:
            if line.startswith("### The final answer is:"):
                line = f"### The final answer is: {cur}"
            out.append(line)
            continue
        number += 1
        a, op, b = int(m.group(2)), m.group(3), int(m.group(4))
        if i > k:
            a = cur
            if op == "-" and b >= a:      # the slip cannot be written with small positive numbers
                return row["solution"]
            cur = a * b if op == "*" else a + b if op == "+" else a - b
        else:
            cur = int(m.group(5))
        out.append(f"### Step {number}: {a} {op} {b} = {cur}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fastgrpo.tasks.arithmetic", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for train.jsonl and eval.jsonl")
    ap.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    ap.add_argument("--n-train", type=int, default=2000, help="train problems (default 2000)")
    ap.add_argument("--n-eval", type=int, default=200, help="eval problems (default 200)")
    args = ap.parse_args(argv)
    train, evals = make_splits(args.seed, args.n_train, args.n_eval)
    write_jsonl(train, Path(args.out) / "train.jsonl")
    write_jsonl(evals, Path(args.out) / "eval.jsonl")
    print(f"wrote {len(train)} train and {len(evals)} eval rows to {args.out}")


# ----------------------------------------------------------------------------- scoring

_FINAL = "### the final answer is:"


def extract_final_answer(text: str) -> str | None:
    """The text after the last ``### The final answer is:`` header (first line, stripped), or None."""
    low = text.lower()
    k = low.rfind(_FINAL)
    if k < 0:
        return None
    ans = text[k + len(_FINAL):].strip().split("\n")[0].strip().rstrip(".")
    return ans or None


def answer_correct(text: str, answer: str) -> bool:
    """Exact (numeric when both parse) match of the final-answer line against ``answer``."""
    got = extract_final_answer(text)
    if got is None:
        return False
    try:
        return float(got.replace(",", "")) == float(str(answer).replace(",", ""))
    except ValueError:
        return got.strip().lower() == str(answer).strip().lower()


if __name__ == "__main__":
    main()
