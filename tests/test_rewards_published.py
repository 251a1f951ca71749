"""The published-code rewards (fastgrpo.rewards.published) against R1-VL's own code.

The peer is ``accuracy_reward`` and ``validity_reward`` (with their helpers
``key_step_single``, ``check_reasoning_completeness``, ``check_reasoning_logic``)
of ``src/r1-vl/src/open_r1/grpo.py`` in github.com/jingyi0000/R1-VL, read at commit
3c6b392bfd3d1b54080fe4be5dfd764ab7fa711c (8723d29c0efeca11bf2c58b131aefe31091be00e
has the same functions).  That file is a training script, not a package (it imports
its own trainer and runs TRL on import of ``main``), so it cannot be pip-installed;
the ``_ref_*`` functions below are a line-by-line transcription of those functions,
with only the debug logging left out.

The differential test scores several thousand generated completions -- the built-in
task's reference solutions with an image-description section, randomly mutated --
with both and requires 100% agreement.  The seed is fresh each run and is printed
with any disagreement; rerun one with FASTGRPO_PUBLISHED_SEED=<seed>.
"""

import os
import random
import re
import threading

import pytest

import fastgrpo.rewards as R
from fastgrpo.tasks.arithmetic import make_splits

math_verify = pytest.importorskip("math_verify")
from math_verify import parse, verify  # noqa: E402

# ---------------------------------------------------------------------------
# transcription of the published code (R1-VL grpo.py)


def _ref_check_reasoning_completeness(text):
    required_sections = [
        "### Image Description:",
        "### Rationales:",
        "### Step 1:",
        "### The final answer is:",
    ]
    missing_sections = [section for section in required_sections if section not in text]
    return not missing_sections


def _ref_check_reasoning_logic(text):
    if not text.strip().endswith("### The final answer is:"):
        final_answer_match = re.search(r"### The final answer is:.*?$", text, re.DOTALL)
        if not final_answer_match or final_answer_match.start() < max(
            re.finditer(r"### Step \d+:", text), key=lambda x: x.end()
        ).end():
            return False
    step_matches = re.findall(r"### Step (\d+):", text)
    if not step_matches:
        return False
    step_numbers = list(map(int, step_matches))
    return step_numbers == list(range(1, len(step_numbers) + 1))


def _ref_validity_reward(completions, **kwargs):
    completion_contents = [completion[0]["content"] for completion in completions]
    return [
        1.0 if (_ref_check_reasoning_completeness(content) and _ref_check_reasoning_logic(content)) else 0.0
        for content in completion_contents
    ]


def _ref_key_step_single(content, key_step):
    step_texts = re.findall(r"### Step \d+:\s*(.*?)(?=\n###|\Z)", content, re.DOTALL)
    step_text_combined = " ".join(step_texts).lower()
    steps_keywords = key_step.get("Steps", [])
    total_keywords = len(steps_keywords)
    matched_keywords = 0
    for group in steps_keywords:
        if isinstance(group, str):
            group = [group]
        if any(alt.lower() in step_text_combined for alt in group):
            matched_keywords += 1
    reward = matched_keywords / total_keywords if total_keywords > 0 else 0.0
    return reward


def _ref_accuracy_reward(completions, solution, key_steps, **kwargs):
    contents = [completion[0]["content"] for completion in completions]
    rewards = []
    for content, sol, key_step in zip(contents, solution, key_steps):
        reward = 0.0
        try:
            answer = parse(content)
            if float(verify(answer, parse(sol))) > 0:
                reward = 1.0
        except Exception:
            pass
        if reward == 0.0:
            try:
                sol_match = re.search(r"### The final answer is:\s*\n?(.*)", sol)
                ground_truth = sol_match.group(1).strip() if sol_match else sol.strip()
                content_match = re.search(r"### The final answer is:\s*\n?(.*)", content)
                student_answer = content_match.group(1).strip() if content_match else content.strip()
                if student_answer == ground_truth:
                    reward = 1.0
            except Exception:
                pass
        if key_steps is not None:
            step_r = _ref_key_step_single(content, key_step)
            reward += step_r * 0.1
        rewards.append(reward)
    return rewards


# ---------------------------------------------------------------------------
# generated completions

DESCRIPTIONS = [
    "The image shows a table with boxes of items.",
    "A drawing of a shelf; each box is labelled with a number.",
    "",
]
EXTRA = [
    "Let me check: 3 + 4 = 7.",
    "The answer is 5",
    "So the result is $\\boxed{9}$.",
    "### Note: double-check the numbers.",
    "#### Step 2: 1 + 1 = 2",
    "###",
    "= 11",
    "x = 4",
    "Wait, 2 PLUS 6 IS 8.",
    "### The final answer is: 3",
    "### Step 1: again",
    "\\frac{12}{2} = 6",
]
HEADER_VARIANTS = [
    str.upper,
    str.lower,
    lambda h: h.replace("### ", "###", 1),
    lambda h: h.replace("### ", "#### ", 1),
    lambda h: h.replace("### ", "  ### ", 1),
    lambda h: h.replace(":", " :"),
    lambda h: h.rstrip(":"),
    lambda h: h.replace(" ", "  "),
    lambda h: h.replace("Rationales", "Rationale"),
    lambda h: h.replace("Step ", "step "),
    lambda h: h.replace("The final", "the final"),
]


WORDS = ["yes", "no", "Yes", "blue", "the red box"]  # answers math-verify cannot parse


def _wrong(ans: str, rng: random.Random) -> str:
    if ans in WORDS:
        return rng.choice([w for w in WORDS if w != ans])
    return str(int(ans) + rng.choice([-2, -1, 1, 3, 10]))


def _answer_variant(ans: str, rng: random.Random) -> str:
    a = _wrong(ans, rng) if rng.random() < 0.4 else ans
    return rng.choice(
        [a, a, f"${a}$", f"\\boxed{{{a}}}", f"{a}.", f"{a} apples", f"{a}.0", f"x = {a}", "", "   ",
         f"\n{a}", f"\n\n  {a}  ", f"{a}\nso that is it", f"The answer is {a}", "A"]
    )


def _body_variant(body: str, rng: random.Random) -> str:
    v = rng.random()
    if v < 0.15:
        return body.replace("*", "×").replace("-", "−")
    if v < 0.25:
        return body.replace(" * ", " TIMES ").replace(" + ", " Plus ").replace(" = ", " IS ")
    if v < 0.35:
        return body.replace(" ", "")
    if v < 0.42:
        return "\n" + body
    if v < 0.5:
        return body + "  \n"
    if v < 0.55:
        return ""
    return body


def mutate(row: dict, rng: random.Random) -> str:
    """A completion: the row's reference solution with a description, randomly mutated."""
    sections = []  # [header, body]
    desc = rng.choice(DESCRIPTIONS)
    sections.append(["### Image Description:", desc])
    for line in row["solution"].split("\n"):
        head, _, body = line.partition(": ")
        sections.append([head + ":", body])
    if rng.random() < 0.25:  # a wrong final answer
        sections[-1][1] = _wrong(row["answer"], rng)
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3, 4])):
        op = rng.randrange(11)
        i = rng.randrange(len(sections)) if sections else 0
        if not sections:
            break
        if op == 0:  # drop a section
            del sections[i]
        elif op == 1:  # the answer: wrong, missing, other forms
            for s in sections:
                if s[0].startswith("### The final answer"):
                    s[1] = _answer_variant(row["answer"], rng)
        elif op == 2:  # bad numbering
            steps = [s for s in sections if s[0].startswith("### Step")]
            if steps:
                rng.choice(steps)[0] = f"### Step {rng.choice(['0', '1', '2', '3', '4', '01', '١'])}:"
        elif op == 3:  # swap two sections (steps, or any)
            j = rng.randrange(len(sections))
            sections[i], sections[j] = sections[j], sections[i]
        elif op == 4:  # header spelling: case, spacing, '####', no colon
            sections[i][0] = rng.choice(HEADER_VARIANTS)(sections[i][0])
        elif op == 5:  # extra text: a section of its own or inside a body
            extra = rng.choice(EXTRA)
            if rng.random() < 0.5:
                sections.insert(rng.randrange(len(sections) + 1), ["", extra])
            else:
                sections[i][1] = sections[i][1] + rng.choice([" ", "\n"]) + extra
        elif op == 6:  # step bodies in other surface forms
            for s in sections:
                if s[0].startswith("### Step") and rng.random() < 0.5:
                    s[1] = _body_variant(s[1], rng)
        elif op == 7:  # no answer section; the last step's result is the last number
            sections = [s for s in sections if not s[0].startswith("### The final answer")]
        elif op == 8:  # the answer header last and empty
            sections = [s for s in sections if not s[0].startswith("### The final answer")]
            sections.append(["### The final answer is:", rng.choice(["", " ", "\n"])])
        elif op == 9:  # a second answer section somewhere
            sections.insert(rng.randrange(len(sections) + 1), ["### The final answer is:", _answer_variant(row["answer"], rng)])
        else:  # the answer before the last step
            ans = [s for s in sections if s[0].startswith("### The final answer")]
            if ans:
                sections.remove(ans[0])
                sections.insert(max(0, len(sections) - 1), ans[0])
    sep = rng.choice(["\n", "\n", "\n", "\n\n", " ", "\r\n", "\n  "])
    text = sep.join(f"{h} {b}".strip() if h else b for h, b in sections)
    if rng.random() < 0.1:
        text = rng.choice(["Sure.\n", "  ", "\n"]) + text
    if rng.random() < 0.1:
        text = text + rng.choice(["\n", "  ", "\nHope this helps.", "\n= 2"])
    return text


def key_steps_variant(row: dict, rng: random.Random):
    ks = [list(g) for g in row["key_steps"]]
    v = rng.random()
    if v < 0.1:
        ks.append(["", "zzz"])  # an empty alternative matches anything
    elif v < 0.2:
        ks.append("PYTHAGORAS")  # a group given as a plain string
    elif v < 0.3:
        ks = [[a.upper() for a in g] for g in ks]
    elif v < 0.35:
        ks = []
    elif v < 0.4:
        ks.append([])  # an empty group never matches
    elif v < 0.5:
        ks.append(["Step 2:"])  # spans a header only inside a body
    elif v < 0.6 and len(ks) > 1:  # spans the end of step 1 and the start of step 2: "8 8"
        ks.append([ks[0][0].split()[-1] + rng.choice([" ", "  ", "   "]) + ks[1][0].split()[0]])
    return ks


def reference_variant(row: dict, rng: random.Random) -> str:
    a = row["answer"]
    return rng.choice([a] * 8 + [f"### The final answer is: {a}", f" {a} ", f"{a}.0"])


def _seed() -> int:
    s = os.environ.get("FASTGRPO_PUBLISHED_SEED")
    return int(s) if s else random.SystemRandom().randrange(2**32)


N_RAR = 2500  # math-verify parses every completion twice per implementation: ~25 s
N_RVR = 6000


def _cases(seed: int, n: int):
    rng = random.Random(seed)
    rows, _ = make_splits(seed=seed % 1000, n_train=300, n_eval=0)
    for _ in range(n):
        row = rng.choice(rows)
        if rng.random() < 0.15:  # a word answer, compared by the exact-line test only
            word = rng.choice(WORDS)
            row = dict(row, answer=word, solution=row["solution"].rsplit(": ", 1)[0] + ": " + word)
        yield mutate(row, rng), reference_variant(row, rng), key_steps_variant(row, rng), rng.random() < 0.5


def test_step_rvr_agrees_with_published_code():
    seed = _seed()
    bad = []
    valid = 0
    for i, (text, _, _, _) in enumerate(_cases(seed, N_RVR)):
        ref = _ref_validity_reward([[{"role": "assistant", "content": text}]])[0]
        got = R.published_step_rvr_reward(None, [text])[0]
        # the code form of step_rvr_reward is the published rule too, with either R1-VL layout
        layout = R.R1VL_MULTIMODAL_LAYOUT if i % 2 else R.R1VL_LAYOUT
        code_form = R.step_rvr_reward(None, [text], form="code", layout=layout)[0]
        valid += ref == 1.0
        if got != ref or code_form != ref:
            bad.append((text, ref, got, code_form))
    assert not bad, f"seed {seed}: {len(bad)}/{N_RVR} disagree; first: {bad[0]!r}"
    # the mutations reach both outcomes
    assert 0.1 * N_RVR < valid < 0.9 * N_RVR, (seed, valid)


def test_step_rar_agrees_with_published_code():
    seed = _seed()
    R.clear_caches()
    bad = []
    values = set()
    for text, ref_answer, ks, as_dict in _cases(seed, N_RAR):
        expected = _ref_accuracy_reward([[{"role": "assistant", "content": text}]], [ref_answer], [{"Steps": ks}])[0]
        mine_ks = {"Steps": ks} if as_dict else ks
        comp = [{"role": "assistant", "content": text}] if as_dict else text
        got = R.published_step_rar_reward(None, [comp], [ref_answer], [mine_ks])[0]
        # fastgrpo's code form without soft matching is the published function
        code_form = R.step_rar_reward(None, [comp], [ref_answer], [mine_ks], form="code", soft=False)[0]
        values.add(expected)
        if got != expected or code_form != expected:  # exact float equality: the same operations in the same order
            bad.append((text, ref_answer, ks, expected, got, code_form))
    assert not bad, f"seed {seed}: {len(bad)}/{N_RAR} disagree; first: {bad[0]!r}"
    # correct and wrong answers, with and without the key-step bonus
    assert {0.0, 1.0, 1.1} <= values and any(0 < v < 0.1 for v in values) and any(1 < v < 1.1 for v in values), (seed, values)


def test_generated_cases_are_where_fastgrpo_defaults_differ():
    # sanity of the generator: on these completions the paper-form defaults and the
    # published code disagree often, so agreement above is not agreement by default
    seed = _seed()
    rar = rvr = 0
    layout = R.R1VL_MULTIMODAL_LAYOUT
    n = 300
    for text, ref_answer, ks, _ in _cases(seed, n):
        pub = R.published_step_rar_reward(None, [text], [ref_answer], [ks])[0]
        # the code form on fastgrpo's parser, soft matching (the default)
        ours = R.step_rar_reward(None, [text], [ref_answer], [ks], form="code", layout=layout)[0]
        rar += pub != pytest.approx(ours)
        rvr += R.published_step_rvr_reward(None, [text])[0] != R.step_rvr_reward(None, [text], layout=layout)[0]
    # measured: ~30% of StepRAR values and ~5% of StepRVR values differ
    assert rar > 0.1 * n and rvr > 0.01 * n, (seed, rar, rvr)


def test_published_form_needs_an_r1vl_layout():
    with pytest.raises(ValueError, match="not an R1-VL layout"):
        R.step_rar_reward(None, ["x"], ["1"], [[["a"]]], form="code", soft=False, layout=R.TAG_LAYOUT)
    with pytest.raises(ValueError, match="not an R1-VL layout"):
        R.step_rvr_reward(None, ["x"], form="code", layout=R.TAG_LAYOUT)
    with pytest.raises(ValueError, match="form"):
        R.step_rvr_reward(None, ["x"], form="nope")
    # the published reward set: both functions in their published form
    rs = R.default_reward_set(R.R1VL_MULTIMODAL_LAYOUT, form="code", soft=False)
    text = FULL.rsplit("\n### The final answer is:", 1)[0]  # no answer header
    res = rs(None, [text], answer=["17"], key_steps=[KS])
    assert res.per_function["step_rar"] == [pytest.approx(pub_rar(text))]
    assert res.per_function["step_rvr"] == [pub_rvr(text)] == [0.0]


# ---------------------------------------------------------------------------
# hand-worked cases

FULL = """### Image Description:
Two boxes of apples.
### Rationales:
Multiply, then add.
### Step 1: 3 * 4 = 12
### Step 2: 12 + 5 = 17
### The final answer is: 17"""
KS = [["3 * 4 = 12", "3*4=12"], ["12 + 5 = 17"], ["12 - 5 = 7"]]


def pub_rar(text, answer="17", ks=KS):
    return R.published_step_rar_reward(None, [text], [answer], [ks])[0]


def pub_rvr(text):
    return R.published_step_rvr_reward(None, [text])[0]


def test_hand_worked_full_solution():
    # correct (math-verify and the exact line agree), groups 1 and 2 found, 3 not: 1 + 0.1 * 2/3
    assert pub_rar(FULL) == pytest.approx(1 + 0.1 * 2 / 3)
    assert pub_rvr(FULL) == 1.0
    # wrong answer: only the bonus, as in the code form
    assert pub_rar(FULL.replace("is: 17", "is: 18")) == pytest.approx(0.1 * 2 / 3)


def test_hand_worked_no_answer_header():
    # no header: math-verify reads the whole completion, whose last expression "12 + 5 = 17" gives 17
    text = FULL.rsplit("\n### The final answer is:", 1)[0]
    assert pub_rar(text) == pytest.approx(1 + 0.1 * 2 / 3)
    # fastgrpo's code form on its parser: no answer -> only the bonus; the published form (soft=False) agrees
    assert R.step_rar_reward(None, [text], ["17"], [KS], form="code") == [pytest.approx(0.1 * 2 / 3)]
    assert R.step_rar_reward(None, [text], ["17"], [KS], form="code", soft=False) == [pytest.approx(1 + 0.1 * 2 / 3)]
    assert pub_rvr(text) == 0.0  # incomplete


def test_hand_worked_case_sensitive_headers():
    # "### step 2:" is no step header, and step 1's body ends at the "\n###" before it, so
    # "12 + 5 = 17" is in no step: k = 1/3.  The answer header is upper case, so the exact-line
    # test would compare the whole text; math-verify still finds 17 -> correct: 1 + 0.1/3
    text = FULL.replace("### Step 2:", "### step 2:").replace("The final answer is:", "THE FINAL ANSWER IS:")
    assert pub_rar(text) == pytest.approx(1 + 0.1 / 3)
    # fastgrpo's code form on its case-insensitive parser finds both steps: 1 + 0.1 * 2/3
    assert R.step_rar_reward(None, [text], ["17"], [KS], form="code") == [pytest.approx(1 + 0.1 * 2 / 3)]
    assert R.step_rar_reward(None, [text], ["17"], [KS], form="code", soft=False) == [pytest.approx(1 + 0.1 / 3)]
    # complete? "### The final answer is:" is missing -> 0
    assert pub_rvr(text) == 0.0
    # fastgrpo's default reads both headers: 2 steps, an answer
    assert R.step_rvr_reward(None, [text], layout=R.R1VL_MULTIMODAL_LAYOUT) == [1.0]


def test_hand_worked_exact_line_fallback():
    # "B" is no maths for math-verify's verify; the exact test compares "B" with "B"
    text = FULL.replace("is: 17", "is: B")
    assert pub_rar(text, answer="B", ks=[]) == 1.0
    # the first answer header counts for the exact test; a later one does not
    two = FULL.replace("is: 17", "is: C\n### The final answer is: B")
    assert pub_rar(two, answer="B", ks=[]) == 0.0
    # the line after the header, across blank lines: "\n\n  B  " -> "B"
    assert pub_rar(FULL.replace("is: 17", "is:\n\n  B  "), answer="B", ks=[]) == 1.0
    # case-sensitive: "b" is not "B"
    assert pub_rar(FULL.replace("is: 17", "is: b"), answer="B", ks=[]) == 0.0


def test_hand_worked_key_step_rules():
    # an empty alternative matches even without any step: k = 1/2 (group 2 "zzz" not found)
    assert pub_rar("no steps at all", answer="B", ks=[[""], ["zzz"]]) == pytest.approx(0.05)
    # a step ends at the next "\n###" of any header: "12 + 5 = 17" sits in a Note, not a step
    note = FULL.replace("### Step 2:", "### Note:")
    assert R.published_key_step_fraction(note, KS) == pytest.approx(1 / 3)
    # steps are joined with one space: "12 12 + 5" spans steps 1 and 2 (bodies "3 * 4 = 12", "12 + 5 = 17")
    assert R.published_key_step_fraction(FULL, [["= 12 12 + 5"]]) == 1.0
    # a body keeps its trailing whitespace: "12  " + " " + "12 + 5"
    spaced = FULL.replace("= 12\n", "= 12  \n")
    assert R.published_key_step_fraction(spaced, [["= 12 12 + 5"]]) == 0.0
    assert R.published_key_step_fraction(spaced, [["= 12   12 + 5"]]) == 1.0
    # an empty step 1 skips the newline as leading whitespace and takes "### Step 2: X" as its body
    assert R.published_step_text("### Step 1:\n### Step 2: X\n### Step 3: y") == "### step 2: x y"
    # the R1-VL dataset's {"Steps": [...]} shape, and a group given as a string
    assert R.published_key_step_fraction(FULL, {"Steps": ["3*4=12", ["nope"]]}) == 0.0
    assert R.published_key_step_fraction(FULL, {"Steps": ["3 * 4 = 12", ["nope"]]}) == 0.5
    # lower-cased on both sides: "3 * 4 = 12" matches "3 * 4 = 12" in any case of the key step
    assert R.published_key_step_fraction(FULL.replace("3 * 4", "3 * 4 APPLES"), [["apples = 12"]]) == 1.0


def test_hand_worked_validity_rules():
    # the description after the steps is not checked
    moved = FULL.replace("### Image Description:\nTwo boxes of apples.\n", "").replace(
        "### The final answer is:", "### Image Description: x\n### The final answer is:"
    )
    assert pub_rvr(moved) == 1.0
    # the first answer header before the end of the last step header -> 0
    assert pub_rvr(FULL.replace("### Rationales:", "### The final answer is: 17\n### Rationales:")) == 0.0
    # ...unless the text ends with an empty answer header
    assert pub_rvr(FULL.replace("### Rationales:", "### The final answer is: 17\n### Rationales:") + "\n### The final answer is:\n") == 1.0
    # "#### Step 1:" contains "### Step 1:"; numbering 1, 2
    assert pub_rvr(FULL.replace("### Step 1:", "#### Step 1:")) == 1.0
    # numbering must be 1..n: 1, 3 -> 0; "01" reads as 1 -> 1
    assert pub_rvr(FULL.replace("Step 2:", "Step 3:")) == 0.0
    assert pub_rvr(FULL.replace("Step 2:", "Step 02:")) == 1.0
    # exact spelling: "###Step 1:" or "### Rationale:" -> incomplete
    assert pub_rvr(FULL.replace("### Step 1:", "###Step 1:")) == 0.0
    assert pub_rvr(FULL.replace("Rationales", "Rationale")) == 0.0


def test_no_reference_and_missing_key_steps():
    # no reference -> None (not applicable); no key-step column or value -> k = 0
    assert R.published_step_rar_reward(None, [FULL, FULL], [None, "17"]) == [None, 1.0]
    assert R.published_step_rar_reward(None, [FULL], ["17"], [None]) == [1.0]


def test_from_a_thread_uses_math_verify_without_timeouts():
    # math-verify's default (signal) timeout raises off the main thread; the reward must still use it
    text = FULL.rsplit("\n### The final answer is:", 1)[0]  # only math-verify finds 17 here
    R.clear_caches()
    out = []
    t = threading.Thread(target=lambda: out.append(pub_rar(text, ks=[])))
    t.start()
    t.join()
    assert out == [1.0]


def test_builtin_names():
    assert R.BUILTIN_REWARDS["step_rar_code"] is R.published_step_rar_reward
    assert R.BUILTIN_REWARDS["step_rvr_code"] is R.published_step_rvr_reward
