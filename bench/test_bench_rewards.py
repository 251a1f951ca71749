"""Speed of the rule-based rewards: 10,000 completions of ~500 tokens.

Target (issue "Rewards"): well under a second per reward on one core.  Nothing
here asserts a time; pytest-benchmark reports it.  Caches are cleared before
every round so that each round parses every completion afresh.  The key steps
differ from completion to completion (the worst case for the key-step cache),
except in the ``groups_of_8`` benchmark, which has GRPO's shape.

    python -m pytest bench/test_bench_rewards.py -q
"""

import random

import pytest

import fastgrpo.rewards as R

N = 10_000

_WORDS = (
    "the of and to in is that for it as with was on be by this are from at which we have an or not "
    "area length width triangle rectangle angle side total value number sum half twice each since "
    "therefore so then thus given shown figure chart bar height point line equal"
).split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + "."


def _make_sample(i: int, problem: int | None = None):
    """One deterministic completion (~500 tokens, ~2,000 characters), its answer and key steps.

    ``problem`` (default ``i``) picks the numbers of the problem: completions
    with the same ``problem`` share the answer and the key steps, as the G
    completions of one prompt do in GRPO.
    """
    rng = random.Random(i)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    if problem is not None:
        prng = random.Random(-1 - problem)
        a, b = prng.randint(2, 99), prng.randint(2, 99)
    prod = a * b
    half = prod / 2
    steps = [
        f"The rectangle has sides {a} and {b}, so its area is ${a} \\times {b} = {prod}$. " + _sentence(rng, 30),
        f"The diagonal halves it: $\\frac{{{prod}}}{{2}} = {half:g}$. " + _sentence(rng, 30),
    ]
    for _ in range(rng.randint(4, 6)):
        c, d = rng.randint(1, 500), rng.randint(1, 500)
        steps.append(f"{_sentence(rng, 25)} We also compute {c} + {d} = {c + d}. {_sentence(rng, 15)}")
    kind = rng.random()
    if kind < 0.1:  # shuffled steps (StepRVR 0)
        order = list(range(1, len(steps) + 1))
        rng.shuffle(order)
    else:
        order = list(range(1, len(steps) + 1))
    text = "### Image Description:\n" + _sentence(rng, 40) + "\n### Rationales:\n" + _sentence(rng, 40) + "\n"
    text += "".join(f"### Step {n}: {s}\n" for n, s in zip(order, steps))
    if kind < 0.6:
        text += f"### The final answer is: {half:g}"
    elif kind < 0.9:
        text += f"### The final answer is: \\boxed{{{half + rng.randint(1, 9):g}}}"
    # else: no answer
    key_steps = [
        [f"{a} \\times {b} = {prod}", f"{a}*{b}={prod}"],
        [f"\\frac{{{prod}}}{{2}}={half:g}", f"{prod}/2={half:g}"],
        ["pythagorean theorem"],
    ]
    return text, f"{half:g}", key_steps


def _batch(data):
    completions = [d[0] for d in data]
    answers = [d[1] for d in data]
    key_steps = [d[2] for d in data]
    chars = sum(len(c) for c in completions)
    # ~4 characters per token -> ~500 tokens per completion
    assert 400 < chars / N / 4 < 700, chars / N / 4
    return completions, answers, key_steps


@pytest.fixture(scope="module")
def batch():
    """Every completion its own problem: no key step is shared (the worst case)."""
    return _batch([_make_sample(i) for i in range(N)])


@pytest.fixture(scope="module")
def grouped_batch():
    """GRPO's shape: 1,250 prompts x 8 completions sharing answer and key steps."""
    return _batch([_make_sample(i, problem=i // 8) for i in range(N)])


def _run(benchmark, fn):
    return benchmark.pedantic(fn, setup=R.clear_caches, rounds=3, iterations=1, warmup_rounds=0)


def test_bench_accuracy(benchmark, batch):
    comps, answers, _ = batch
    out = _run(benchmark, lambda: R.accuracy_reward(None, comps, answers))
    assert len(out) == N and 0.4 < sum(out) / N < 0.8


def test_bench_step_rar_soft(benchmark, batch):
    comps, answers, ks = batch
    out = _run(benchmark, lambda: R.step_rar_reward(None, comps, answers, ks))
    assert len(out) == N and max(out) == pytest.approx(1 + 0.1 * 2 / 3)


def test_bench_step_rar_soft_groups_of_8(benchmark, grouped_batch):
    comps, answers, ks = grouped_batch
    out = _run(benchmark, lambda: R.step_rar_reward(None, comps, answers, ks))
    assert len(out) == N and max(out) == pytest.approx(1 + 0.1 * 2 / 3)


def test_bench_step_rar_strict(benchmark, batch):
    comps, answers, ks = batch
    out = _run(benchmark, lambda: R.step_rar_reward(None, comps, answers, ks, soft=False))
    assert len(out) == N


def test_bench_step_rar_code_form(benchmark, batch):
    comps, answers, ks = batch
    out = _run(benchmark, lambda: R.step_rar_reward(None, comps, answers, ks, form="code"))
    assert len(out) == N


def test_bench_step_rvr(benchmark, batch):
    comps, _, _ = batch
    out = _run(benchmark, lambda: R.step_rvr_reward(None, comps))
    assert len(out) == N and 0.5 < sum(out) / N < 0.95


def test_bench_default_reward_set(benchmark, batch):
    comps, answers, ks = batch
    rs = R.default_reward_set()
    res = _run(benchmark, lambda: rs(None, comps, answer=answers, key_steps=ks))
    assert len(res.total) == N


def test_bench_extract_key_steps(benchmark, batch):
    comps, _, _ = batch
    sols = comps[:1000]
    out = _run(benchmark, lambda: [R.extract_key_steps(s) for s in sols])
    assert len(out) == 1000
