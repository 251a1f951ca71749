"""The built-in multimodal task ``charts``: bar charts drawn with Pillow, multi-step questions.

Each image holds three bars A, B, C (left to right) of heights 1..9 on a white 84 x 84 canvas
(8 pixels per unit, a grey baseline).  The heights are *only* in the image: the prompt names the
bars, never their values.  The question combines them in two steps::

    <image> The chart shows bars A, B and C from left to right. What is A plus B minus C?

and the reference solution is in R1-VL's multimodal layout::

    ### Image Description: A is 3 , B is 7 , C is 5 .
    ### Rationales: Read each bar's height, then combine them one operation per step.
    ### Step 1: 3 + 7 = 10
    ### Step 2: 10 - 5 = 5
    ### The final answer is: 5

``key_steps``: the two equations (with the arithmetic task's surface forms).  Splits are
deterministic and held out by chart: no eval chart (height triple) appears in train.

``python -m fastgrpo.sft --task charts --out DIR`` warms up a tiny Qwen2-VL on it
(``fastgrpo.tasks.charts.warmup``).  The shipped checkpoint ``fastgrpo/tasks/charts/checkpoint`` (what
``python -m fastgrpo.train --task charts`` starts from) was built with exactly::

    python -m fastgrpo.sft --task charts --out fastgrpo/tasks/charts/checkpoint

(the defaults: seed 0, 2000 train rows, 1000 steps of 32 sequences, lr 3e-3 cosine to 0.1x,
text 128 wide x 4 layers, vision 64 wide x 2 blocks, 0.86M parameters; 888 s of SFT on one
CPU thread, shared machine).  Held-out (100 charts, greedy): bar reading 0.00 -> 1.00, final
answer 0.00 -> 0.81 (the misses are arithmetic slips).  The bar reading stays at chance
(teacher-forced 0.11-0.15) for the first ~250 steps, then jumps (0.47 at step 300, 0.99 at
400): a run stopped at 300 steps looks like a model that cannot read the images.
"""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

from fastgrpo.tasks.arithmetic.data import _step_forms
from fastgrpo.tasks.tiny_vl import tiny_vl_tokenizer

__all__ = ["draw_chart", "make_problem", "make_splits", "RATIONALE", "chart_tokenizer",
           "description_accuracy", "CHARTS_WARMUP_DIR", "CHARTS_TRAIN_DEFAULTS"]

RATIONALE = "Read each bar's height, then combine them one operation per step."
BARS = "ABC"
SIZE = 84
UNIT = 8
CHARTS_WARMUP_DIR = Path(__file__).resolve().parent / "checkpoint"
# ``python -m fastgrpo.train --task charts`` (on the shipped warm-up) uses these unless given
# explicitly: the warm-up is sharp (entropy ~0.01/token) and at the general default lr 3e-4 the
# held-out accuracy dips (0.81 -> 0.71 at step 20, 0.80 after 60 steps, measured)
CHARTS_TRAIN_DEFAULTS = {"steps": 150, "lr": 1e-4, "eval_every": 25, "max_new_tokens": 72}
_OPS = {"plus": "+", "minus": "-"}


def draw_chart(heights) -> "object":
    """A PIL image of the bars ``heights`` (A, B, C left to right)."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (SIZE, SIZE), "white")
    d = ImageDraw.Draw(im)
    w = SIZE // len(heights)
    base = SIZE - 4
    d.line([(0, base), (SIZE, base)], fill=(128, 128, 128))
    colors = [(200, 60, 60), (60, 140, 60), (60, 80, 200)]
    for k, h in enumerate(heights):
        d.rectangle([k * w + 5, base - UNIT * h, k * w + w - 6, base - 1], fill=colors[k % 3])
    return im


def _forms(a, op, b, r):
    return _step_forms(a, op, b, r)


def make_problem(heights, rng: random.Random) -> dict:
    """One row for the chart of ``heights``: prompt (with ``<image>``), image (PIL), answer,
    key_steps, solution."""
    vals = dict(zip(BARS, heights))
    while True:
        x, y, z = rng.sample(BARS, 3)
        o1, o2 = rng.choice(list(_OPS)), rng.choice(list(_OPS))
        r1 = vals[x] + vals[y] if o1 == "plus" else vals[x] - vals[y]
        r2 = r1 + vals[z] if o2 == "plus" else r1 - vals[z]
        if r1 >= 0 and r2 >= 0:
            break
    s1, s2 = (vals[x], _OPS[o1], vals[y], r1), (r1, _OPS[o2], vals[z], r2)
    desc = " , ".join(f"{b} is {vals[b]}" for b in BARS)
    solution = "\n".join([f"### Image Description: {desc} .", f"### Rationales: {RATIONALE}",
                          f"### Step 1: {s1[0]} {s1[1]} {s1[2]} = {s1[3]}",
                          f"### Step 2: {s2[0]} {s2[1]} {s2[2]} = {s2[3]}",
                          f"### The final answer is: {r2}"])
    return {"prompt": (f"<image> The chart shows bars A, B and C from left to right. What is "
                       f"{x} {o1} {y} {o2} {z}?"),
            "image": draw_chart(heights), "heights": list(heights), "answer": str(r2),
            "key_steps": [_forms(*s1), _forms(*s2)], "solution": solution}


def make_splits(seed: int = 0, n_train: int = 2000, n_eval: int = 100) -> tuple[list[dict], list[dict]]:
    """Deterministic train / eval rows; eval charts (height triples) never appear in train."""
    rng = random.Random(seed)
    triples = list(itertools.product(range(1, 10), repeat=3))
    rng.shuffle(triples)
    held, rest = triples[:n_eval], triples[n_eval:]
    evals = [make_problem(t, rng) for t in held]
    train = [make_problem(rest[i % len(rest)], rng) for i in range(n_train)]
    return train, evals


def chart_tokenizer(family: str = "qwen2_vl"):
    """The tiny word-level tokenizer, its vocabulary covering the chart task's texts."""
    rng = random.Random(1)
    texts = []
    for t in itertools.islice(itertools.product(range(1, 10), repeat=3), 0, None, 7):
        r = make_problem(t, rng)
        texts += [r["prompt"], r["solution"]]
    texts += [" ### Image Description:", "Description", " is", " A", " B", " C", " ,", "'s"]
    return tiny_vl_tokenizer(family, extra_texts=texts)


def description_accuracy(text: str, heights) -> float:
    """Fraction of the three bars whose height the completion's Image Description states right."""
    m = re.search(r"Image Description:(.*)", text)
    if not m:
        return 0.0
    line = m.group(1)
    got = dict(re.findall(r"\b([ABC]) is (\d+)", line))
    return sum(got.get(b) == str(h) for b, h in zip(BARS, heights)) / len(BARS)
