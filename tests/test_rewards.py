"""StepGRPO rewards on hand-written completions: parser, StepRAR, StepRVR,
accuracy, reward sets.  Every expected value is worked out in a comment."""

import math

import pytest

import fastgrpo.rewards as R

from fastgrpo.rewards import R1VL_LAYOUT, R1VL_MULTIMODAL_LAYOUT, TAG_LAYOUT, RewardError, RewardSet

BACKENDS = list(R.available_backends())
ALPHA = 0.1


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# ---------------------------------------------------------------------------
# completions

CORRECT = """### Image Description:
The image shows a rectangle with sides 4 cm and 3 cm and one diagonal drawn.
### Rationales:
The question asks for the area of the triangle cut off by the diagonal.
### Step 1: The rectangle's area is $4 \\times 3 = 12$ square centimeters.
### Step 2: The diagonal cuts it in half, so the triangle's area is $\\frac{12}{2} = 6$.
### The final answer is: 6"""

# the same reasoning, wrong final answer
WRONG = CORRECT.replace("### The final answer is: 6", "### The final answer is: 12")

# the same reasoning, no final-answer section at all
MISSING_ANSWER = CORRECT.rsplit("### The final answer is:", 1)[0]

# the answer header is there but empty
EMPTY_ANSWER = CORRECT.replace("### The final answer is: 6", "### The final answer is:   ")

# key steps in other surface forms: plain arithmetic, spaces, 6.0, unicode ×
OTHER_FORMS = """### Image Description:
A 4 by 3 rectangle with a diagonal.
### Rationales:
Half of the rectangle.
### Step 1: Area of the rectangle: 4 × 3 = 12.
### Step 2: Triangle: 12 / 2 = 6.0
### The final answer is: $\\boxed{6}$"""

KEY_STEPS = [
    ["4 \\times 3 = 12", "4*3=12"],  # group 1: the rectangle's area
    ["\\frac{12}{2}=6", "12/2=6"],  # group 2: halving
    ["pythagorean theorem"],  # group 3: never used by these completions
]

STEPS_OUT_OF_ORDER = """### Image Description:
A rectangle.
### Rationales:
Half of it.
### Step 2: The triangle's area is $12 / 2 = 6$.
### Step 1: The rectangle's area is $4 \\times 3 = 12$.
### The final answer is: 6"""

STEP_SKIPPED = CORRECT.replace("### Step 2:", "### Step 3:")

ANSWER_BEFORE_LAST_STEP = """### Image Description:
A rectangle.
### Rationales:
Half of it.
### Step 1: The rectangle's area is $4 \\times 3 = 12$.
### The final answer is: 6
### Step 2: The triangle's area is $12/2 = 6$."""

RATIONALES_AFTER_STEPS = """### Image Description:
A rectangle.
### Step 1: The rectangle's area is $4 \\times 3 = 12$.
### Step 2: The triangle's area is $12/2 = 6$.
### Rationales:
Half of it.
### The final answer is: 6"""

NO_RATIONALES = CORRECT.replace(
    "### Rationales:\nThe question asks for the area of the triangle cut off by the diagonal.\n", ""
)

NO_DESCRIPTION = CORRECT.replace(
    "### Image Description:\nThe image shows a rectangle with sides 4 cm and 3 cm and one diagonal drawn.\n", ""
)

NO_STEPS = """### Image Description:
A rectangle.
### Rationales:
The triangle is half of the 12 square centimetre rectangle, 12/2 = 6.
### The final answer is: 6"""

UNICODE = """### Image Description:
图中是一个长方形，边长为 4 厘米和 3 厘米。
### Rationales:
Найти площадь треугольника — половина прямоугольника.
### Step 1: 长方形面积 = 4 × 3 = 12 cm²。
### Step 2: 三角形面积 = 12 ÷ 2 = 6 cm² ✓
### The final answer is: ６"""

MULTIPLE_CHOICE = """### Image Description:
A bar chart with four bars.
### Rationales:
Find the tallest bar.
### Step 1: The bars are 3, 7, 5 and 2, so the tallest is 7.
### Step 2: The value 7 belongs to option (B).
### The final answer is: (B) 7"""
MC_KEY_STEPS = [["tallest is 7", "max=7"], ["option (b)", "option b"]]


def rar(completion, answer, key_steps, form="paper", soft=True, layout=R1VL_LAYOUT, backend=None):
    return R.step_rar_reward(
        None, [completion], [answer], [key_steps], alpha=ALPHA, form=form, soft=soft, layout=layout, backend=backend
    )[0]


def rvr(completion, layout=R1VL_LAYOUT):
    return R.step_rvr_reward(None, [completion], layout=layout)[0]


def acc(completion, answer, layout=R1VL_LAYOUT, backend=None):
    return R.accuracy_reward(None, [completion], [answer], layout=layout, backend=backend)[0]


# ---------------------------------------------------------------------------
# parser


def test_parse_r1vl_sections():
    p = R.parse(CORRECT)
    assert p.description == "The image shows a rectangle with sides 4 cm and 3 cm and one diagonal drawn."
    assert p.rationales == "The question asks for the area of the triangle cut off by the diagonal."
    assert [n for n, _ in p.steps] == [1, 2]
    assert p.steps[0][1] == "The rectangle's area is $4 \\times 3 = 12$ square centimeters."
    assert p.answer == "6"
    assert list(p.section_order) == ["description", "rationales", "step", "step", "answer"]


def test_parse_other_header_ends_a_step():
    text = "### Rationales:\nr\n### Step 1: a = 1\n### Note: unrelated\n### Step 2: b = 2\n### The final answer is: 2"
    p = R.parse(text)
    # "### Note:" is no section of the layout: it ends Step 1 and is dropped
    assert p.steps == ((1, "a = 1"), (2, "b = 2"))


def test_parse_header_variants():
    # no space before the number, upper case, inline headers, trailing text after the answer line
    text = "### RATIONALES: r ### Step1: x ### step 2: y ### The Final Answer Is 7\nbecause of y."
    p = R.parse(text)
    assert p.rationales == "r"
    assert p.steps == ((1, "x"), (2, "y"))
    assert R.extract_answer(p.answer) == "7"


def test_parse_tag_layout():
    text = (
        "<think>We need the triangle's area.\nStep 1: 4 × 3 = 12\n**Step 2:** 12 / 2 = 6\n</think>\n"
        "<answer>6\n1. not a step</answer>"
    )
    p = R.parse(text, TAG_LAYOUT)
    assert p.rationales == "We need the triangle's area."
    assert p.steps == ((1, "4 × 3 = 12"), (2, "12 / 2 = 6"))
    assert p.answer == "6\n1. not a step"  # numbered lines inside <answer> are not steps
    assert R.extract_answer(p.answer) == "6"


def test_parse_tag_layout_numbered_lines():
    text = "<think>\n1. Area 4*3 = 12.\n2. Half: 12/2=6.\nThe answer is 6. So 3.5 is not a step.\n</think><answer>6</answer>"
    p = R.parse(text, TAG_LAYOUT)
    assert [n for n, _ in p.steps] == [1, 2]
    assert p.steps[1][1].startswith("Half: 12/2=6.")


def test_parse_tag_layout_unclosed_think():
    text = "<think>Step 1: 4*3=12\nStep 2: 12/2=6\n<answer>6</answer>"
    p = R.parse(text, TAG_LAYOUT)
    assert [n for n, _ in p.steps] == [1, 2]
    assert p.steps[1] == (2, "12/2=6")
    assert p.answer == "6"


@pytest.mark.parametrize("text", ["", None, "no headers at all", "###", "### Step x: nothing"])
def test_parse_degenerate(text):
    p = R.parse(text)
    assert p.steps == () and p.answer is None and p.rationales is None


def test_custom_layout():
    layout = R.Layout(
        name="md",
        rationales=r"^## Plan",
        step=r"^## (\d+)\)",
        answer=r"^## Answer",
        terminator=r"^## ",
        flags=__import__("re").MULTILINE,
    )
    text = "## Plan\nhalve it\n## 1) 4*3=12\n## 2) 12/2=6\n## Answer\n6"
    p = R.parse(text, layout)
    assert p.steps == ((1, "4*3=12"), (2, "12/2=6"))
    assert rvr(text, layout) == 1.0
    # k = 2/2 = 1 -> 1 + 0.1 * 1 = 1.1
    assert rar(text, "6", KEY_STEPS[:2], layout=layout) == pytest.approx(1.1)


# a layout of R1-VL's kind with another anchor, a step number that may be
# missing (such a header is left to the general path) and no description
_HASH2_LAYOUT = R.Layout(
    name="hash2",
    rationales=r"##[ \t]*Plan:",
    step=r"##[ \t]*Step[ \t]*(\d*):",
    answer=r"##[ \t]*Answer:?",
    terminator=r"##",
    anchor="##",
)


@pytest.mark.parametrize("layout", [R.R1VL_LAYOUT, R.R1VL_MULTIMODAL_LAYOUT, _HASH2_LAYOUT], ids=lambda l: l.name)
def test_parse_one_scan_equals_general(layout):
    # layouts of R1-VL's kind are parsed by one regex scan (_parse_sections);
    # it must give exactly what the general header-by-header parser gives, on
    # random mixes of headers, near-headers, overlapping anchors and text
    import random

    from fastgrpo.rewards import layout as L

    c = layout.compiled()
    assert c.sections is not None  # the fast path is taken
    tokens = [
        "### Step 1:", "### Step 2:", "###Step 3 :", "### step 10:", "### Step :", "### Rationales:",
        "### Image Description:", "### The final answer is:", "### The final answer is 7", "###", "####",
        "## Step 1:", "## Step :", "## Plan:", "## Answer:", "##", "#", "# ", "\n", " ", "  ", "\t",
        "text", "12 / 2 = 6", "Step 1:", "é", "###  Step 4:", "###\nStep 5:",
    ]
    rng = random.Random(0)
    used_fallback = 0
    for _ in range(4000):
        text = "".join(rng.choice(tokens) for _ in range(rng.randint(1, 25)))
        general = L._parse_general(text, layout, c)
        fast = L._parse_sections(text, c.sections, layout.anchor)
        used_fallback += fast is None
        assert fast in (None, general), repr(text)
        assert R.parse(text, layout) == general, repr(text)
    # only the layout whose step number may be missing leaves texts to the general path
    assert (used_fallback > 0) == (layout is _HASH2_LAYOUT)


def test_parse_one_scan_only_for_its_kind_of_layout():
    assert R.TAG_LAYOUT.compiled().sections is None  # no anchor
    # a header with an alternative, or a terminator other than the anchor
    alt = R.Layout(name="alt", step=r"###\s*(?:Step|Part)\s*(\d+):", answer=r"### Answer", terminator="###", anchor="###")
    assert alt.compiled().sections is None
    other_term = R.Layout(name="t", step=r"###\s*Step\s*(\d+):", answer=r"### Answer", terminator="###|---", anchor="###")
    assert other_term.compiled().sections is None
    text = "### Part 1: a\n### Step 2: b\n--- c\n### Answer 3"
    assert R.parse(text, alt).steps == ((1, "a"), (2, "b\n--- c"))
    # (headers and terminators are tried only where the anchor occurs)
    assert R.parse(text, other_term).steps == ((2, "b\n--- c"),)


# ---------------------------------------------------------------------------
# StepRAR

# Soft matching of KEY_STEPS against CORRECT's step text
#   "the rectangle's area is 4*3=12 square centimeters. ... area is 12/2=6 ."
#   group 1 "4*3=12" found, group 2 "12/2=6" found, group 3 not -> k = 2/3.
K_SOFT = 2 / 3


@pytest.mark.parametrize(
    "completion,answer,expected_paper,expected_code",
    [
        # correct: paper 1 + 0.1*2/3 = 1.0667; code 1 + 0.0667
        (CORRECT, "6", 1 + ALPHA * K_SOFT, 1 + ALPHA * K_SOFT),
        # wrong answer: paper 0.1*2/3 = 0.0667; code 0 + 0.0667
        (WRONG, "6", ALPHA * K_SOFT, ALPHA * K_SOFT),
        # no answer: paper 0; code keeps the bonus 0.0667
        (MISSING_ANSWER, "6", 0.0, ALPHA * K_SOFT),
        # empty answer section = no answer
        (EMPTY_ANSWER, "6", 0.0, ALPHA * K_SOFT),
        # other surface forms: "4 × 3 = 12" -> "4*3=12", "12 / 2 = 6.0" -> "12/2=6"; k = 2/3; \boxed{6} correct
        (OTHER_FORMS, "6", 1 + ALPHA * K_SOFT, 1 + ALPHA * K_SOFT),
        # unicode: "4 × 3 = 12 cm²" -> "4*3=12 cm2" (NFKC), "12 ÷ 2 = 6" -> "12/2=6"; k = 2/3; "６" == "6"
        (UNICODE, "6", 1 + ALPHA * K_SOFT, 1 + ALPHA * K_SOFT),
        # steps out of order do not matter to StepRAR: both groups found, k = 2/3
        (STEPS_OUT_OF_ORDER, "6", 1 + ALPHA * K_SOFT, 1 + ALPHA * K_SOFT),
        # no steps: k = 0 (the rationales' "12/2 = 6" does not count); correct -> 1
        (NO_STEPS, "6", 1.0, 1.0),
        # empty completion: no answer, k = 0
        ("", "6", 0.0, 0.0),
    ],
)
def test_step_rar(completion, answer, expected_paper, expected_code, backend):
    assert rar(completion, answer, KEY_STEPS, "paper", backend=backend) == pytest.approx(expected_paper)
    assert rar(completion, answer, KEY_STEPS, "code", backend=backend) == pytest.approx(expected_code)


def test_step_rar_strict_is_the_published_substring_test():
    # strict: lower-cased alternative in lower-cased step text
    # CORRECT steps contain "4 \times 3 = 12" (group 1 alt 1: found)
    # and "\frac{12}{2} = 6" (neither "\frac{12}{2}=6" nor "12/2=6": not found) -> k = 1/3
    assert rar(CORRECT, "6", KEY_STEPS, soft=False) == pytest.approx(1 + ALPHA / 3)
    # OTHER_FORMS: "4 × 3 = 12" and "12 / 2 = 6.0" match no alternative literally -> k = 0
    assert rar(OTHER_FORMS, "6", KEY_STEPS, soft=False) == pytest.approx(1.0)
    # soft finds both -> k = 2/3
    assert rar(OTHER_FORMS, "6", KEY_STEPS, soft=True) == pytest.approx(1 + ALPHA * 2 / 3)


def test_step_rar_multiple_choice(backend):
    # soft: "tallest is 7" found; "option (b)" found (both sides normalise to "option b": parentheses
    # around a single letter are dropped) -> k = 1; "(B) 7" against "B" is correct -> 1 + 0.1 * 1
    assert rar(MULTIPLE_CHOICE, "B", MC_KEY_STEPS, backend=backend) == pytest.approx(1.1)
    # wrong letter: 0.1 * 1
    assert rar(MULTIPLE_CHOICE, "C", MC_KEY_STEPS, backend=backend) == pytest.approx(0.1)


def test_step_rar_no_groups_and_absent_column():
    # empty key-step list: k = 0 -> correct answer gives exactly 1
    assert rar(CORRECT, "6", []) == 1.0
    # key steps absent for one sample -> no groups, k = 0: plain accuracy 1; the other sample 1 + 0.1*2/3
    out = R.step_rar_reward(None, [CORRECT, CORRECT], ["6", "6"], [None, KEY_STEPS])
    assert out == [1.0, pytest.approx(1 + ALPHA * K_SOFT)]
    # key-step column absent -> k = 0 everywhere: correct 1, wrong answer 0.1*0 = 0
    assert R.step_rar_reward(None, [CORRECT, WRONG], ["6", "6"]) == [1.0, 0.0]
    # reference answer absent for a sample -> None (not applicable)
    assert R.step_rar_reward(None, [CORRECT, CORRECT], [None, "6"], [KEY_STEPS, KEY_STEPS]) == [
        None,
        pytest.approx(1 + ALPHA * K_SOFT),
    ]
    # answer column absent -> all None
    assert R.step_rar_reward(None, [CORRECT], key_steps=[KEY_STEPS]) == [None]


def test_step_rar_key_steps_shapes():
    # a JSON string column and plain-string groups are accepted: 2 groups, both found -> k = 1
    js = '[["4*3=12"], "12/2=6"]'
    assert rar(CORRECT, "6", js) == pytest.approx(1.1)
    # an empty alternative never matches: groups ["", "zzz"] and ["12/2=6"] -> k = 1/2
    assert rar(CORRECT, "6", [["", "zzz"], ["12/2=6"]]) == pytest.approx(1.05)
    # tuples / numbers as alternatives: "12" found -> k = 1
    assert rar(CORRECT, "6", ((12,),)) == pytest.approx(1.1)


def test_step_rar_alpha_and_form_validation():
    # alpha = 0.5, k = 2/3 -> 1 + 1/3
    out = R.step_rar_reward(None, [CORRECT], ["6"], [KEY_STEPS], alpha=0.5)
    assert out[0] == pytest.approx(1 + 0.5 * 2 / 3)
    with pytest.raises(ValueError, match="form"):
        R.step_rar_reward(None, [CORRECT], ["6"], [KEY_STEPS], form="other")


def test_soft_matching_respects_number_boundaries():
    text = "### Rationales: r\n### Step 1: we get x = 63 and y=2.5\n### The final answer is: 63"
    # group ["x=6"]: soft refuses "x=6" inside "x=63"; strict finds it
    # group ["y=2"]: soft refuses "y=2" inside "y=2.5"
    groups = [["x=6"], ["y=2"], ["x = 63"]]
    # soft: k = 1/3 (only "x=63"); strict: "x=6" in "x = 63"? no (space) ... "x = 63" yes -> k = 1/3,
    # and with the compact spelling strict finds "y=2" in "y=2.5" -> 2/3
    assert R.step_k(None, [text], [groups])[0] == pytest.approx(1 / 3)
    assert R.step_k(None, [text], [groups], soft=False)[0] == pytest.approx(2 / 3)


def test_step_k_logging_function():
    # raw k: CORRECT 2/3, MISSING_ANSWER 2/3 (k ignores the answer), "" 0, None -> None
    assert R.step_k(None, [CORRECT, MISSING_ANSWER, "", CORRECT], [KEY_STEPS, KEY_STEPS, KEY_STEPS, None]) == [
        pytest.approx(2 / 3),
        pytest.approx(2 / 3),
        0.0,
        None,
    ]


def test_tag_layout_rewards(backend):
    text = (
        "<think>The triangle is half the rectangle.\nStep 1: 4 \\times 3 = 12\nStep 2: \\frac{12}{2} = 6\n</think>"
        "<answer>\\boxed{6}</answer>"
    )
    # k = 2/3, correct -> 1.0667; complete (think, step 1, answer) and ordered -> 1
    assert rar(text, "6", KEY_STEPS, layout=TAG_LAYOUT, backend=backend) == pytest.approx(1 + ALPHA * 2 / 3)
    assert rvr(text, TAG_LAYOUT) == 1.0
    assert acc(text, "6", TAG_LAYOUT, backend=backend) == 1.0
    # no <answer>: incomplete, and paper StepRAR 0
    no_answer = text.split("<answer>")[0]
    assert rvr(no_answer, TAG_LAYOUT) == 0.0
    assert rar(no_answer, "6", KEY_STEPS, layout=TAG_LAYOUT) == 0.0
    # no <think>: incomplete (and the numbered lines outside <think> are no steps)
    assert rvr("Step 1: 4*3=12\n<answer>6</answer>", TAG_LAYOUT) == 0.0


# ---------------------------------------------------------------------------
# StepRVR


@pytest.mark.parametrize(
    "completion,layout,expected",
    [
        (CORRECT, R1VL_LAYOUT, 1.0),  # all four sections, steps 1,2, in order
        (WRONG, R1VL_LAYOUT, 1.0),  # validity ignores correctness
        (OTHER_FORMS, R1VL_LAYOUT, 1.0),
        (UNICODE, R1VL_LAYOUT, 1.0),
        (MULTIPLE_CHOICE, R1VL_LAYOUT, 1.0),
        (EMPTY_ANSWER, R1VL_LAYOUT, 1.0),  # the spec checks the header, which is present
        (MISSING_ANSWER, R1VL_LAYOUT, 0.0),  # incomplete: no final-answer header
        (STEPS_OUT_OF_ORDER, R1VL_LAYOUT, 0.0),  # numbered 2,1: not 1..n
        (STEP_SKIPPED, R1VL_LAYOUT, 0.0),  # numbered 1,3: not 1..n
        (ANSWER_BEFORE_LAST_STEP, R1VL_LAYOUT, 0.0),  # answer before Step 2
        (RATIONALES_AFTER_STEPS, R1VL_LAYOUT, 0.0),  # rationales after the steps
        (NO_RATIONALES, R1VL_LAYOUT, 0.0),  # rationales required
        (NO_STEPS, R1VL_LAYOUT, 0.0),  # no Step 1
        (NO_DESCRIPTION, R1VL_LAYOUT, 1.0),  # text-only layout: description optional
        (NO_DESCRIPTION, R1VL_MULTIMODAL_LAYOUT, 0.0),  # multimodal layout: description required
        (CORRECT, R1VL_MULTIMODAL_LAYOUT, 1.0),
        ("", R1VL_LAYOUT, 0.0),
        ("The answer is 6.", R1VL_LAYOUT, 0.0),
    ],
)
def test_step_rvr(completion, layout, expected):
    assert rvr(completion, layout) == expected


def test_step_validity_parts():
    assert R.step_validity(CORRECT) == (True, True)
    assert R.step_validity(MISSING_ANSWER) == (False, True)  # incomplete, but what is there is ordered
    assert R.step_validity(STEPS_OUT_OF_ORDER) == (True, False)
    assert R.step_validity(NO_STEPS) == (False, False)  # no steps: no Step 1, and not numbered 1..n


# ---------------------------------------------------------------------------
# accuracy


@pytest.mark.parametrize(
    "completion,answer,expected",
    [
        (CORRECT, "6", 1.0),
        (CORRECT, "6.0", 1.0),
        (CORRECT, "\\frac{12}{2}", 1.0),
        (WRONG, "6", 0.0),
        (MISSING_ANSWER, "6", 0.0),
        (EMPTY_ANSWER, "6", 0.0),
        (OTHER_FORMS, "6", 1.0),  # \boxed{6}
        (UNICODE, "6", 1.0),  # full-width ６
        (MULTIPLE_CHOICE, "B", 1.0),
        (MULTIPLE_CHOICE, "(B)", 1.0),
        (MULTIPLE_CHOICE, "A", 0.0),
        ("", "6", 0.0),
    ],
)
def test_accuracy(completion, answer, expected, backend):
    assert acc(completion, answer, backend=backend) == expected


def test_accuracy_absent_answer():
    assert R.accuracy_reward(None, [CORRECT, CORRECT], [None, "6"]) == [None, 1.0]
    assert R.accuracy_reward(None, [CORRECT]) == [None]


def test_conversational_completions():
    conv = [{"role": "assistant", "content": CORRECT}]
    parts = [{"role": "assistant", "content": [{"type": "text", "text": CORRECT[:50]}, {"type": "text", "text": CORRECT[50:]}]}]
    for c in (conv, parts):
        assert R.accuracy_reward(None, [c], ["6"]) == [1.0]
        assert R.step_rvr_reward(None, [c]) == [1.0]
        assert R.step_rar_reward(None, [c], ["6"], [KEY_STEPS])[0] == pytest.approx(1 + ALPHA * K_SOFT)
    assert R.completion_text(conv) == CORRECT
    assert R.completion_text(None) == ""


def test_column_length_mismatch_is_clear():
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        R.accuracy_reward(None, [CORRECT, CORRECT], ["6"])


def test_very_long_inputs():
    # 300 numbered steps, the key steps in steps 150 and 299, correct answer
    body = "".join(f"### Step {i}: We note that quantity q{i} = {i} + 0 = {i}.\n" for i in range(1, 301))
    body = body.replace("### Step 150: ", "### Step 150: 4 × 3 = 12. ").replace("### Step 299: ", "### Step 299: 12/2=6. ")
    text = "### Rationales:\nLong.\n" + body + "### The final answer is: 6"
    assert rvr(text) == 1.0  # 1..300 in order, answer last
    # k = 2/3 (groups 1 and 2 found) -> 1.0667
    assert rar(text, "6", KEY_STEPS) == pytest.approx(1 + ALPHA * 2 / 3)
    # 2 MB of text without any header: no steps, no answer
    junk = "lorem ipsum 12/2=6 " * 100_000
    assert rar(junk, "6", KEY_STEPS) == 0.0
    assert rvr(junk) == 0.0
    assert acc(junk, "6") == 0.0


# ---------------------------------------------------------------------------
# RewardSet


def _const(v):
    def f(prompts, completions, **kw):
        return [v] * len(completions)

    return f


def test_default_reward_set(backend):
    rs = R.default_reward_set(backend=backend)
    assert rs.weights == {"step_rar": 1.0, "step_rvr": 1.0, "accuracy": 0.0, "step_k": 0.0}
    comps = [CORRECT, WRONG, MISSING_ANSWER, STEPS_OUT_OF_ORDER]
    res = rs(["q"] * 4, comps, answer=["6"] * 4, key_steps=[KEY_STEPS] * 4, image=[None] * 4)
    k = ALPHA * 2 / 3
    # r = StepRAR + StepRVR:
    #   CORRECT             (1 + k) + 1
    #   WRONG                     k + 1
    #   MISSING_ANSWER            0 + 0
    #   STEPS_OUT_OF_ORDER  (1 + k) + 0
    assert res.total == pytest.approx([2 + k, k + 1, 0.0, 1 + k])
    assert res.per_function["accuracy"] == [1.0, 0.0, 0.0, 1.0]
    assert res.per_function["step_rvr"] == [1.0, 1.0, 0.0, 0.0]
    assert res.per_function["step_k"] == pytest.approx([2 / 3] * 4)
    st = res.stats()
    assert st["accuracy"]["mean"] == 0.5 and st["accuracy"]["count"] == 4
    # unbiased std of [1, 0, 0, 1]: mean .5, squares sum 1, /3 -> sqrt(1/3)
    assert st["accuracy"]["std"] == pytest.approx(math.sqrt(1 / 3))
    assert "rewards/step_rar/mean" in res.log_dict()


def test_default_reward_set_code_form_and_tag_layout():
    rs = R.default_reward_set(layout=TAG_LAYOUT, form="code")
    text = "<think>Step 1: 4*3=12</think>"  # no answer
    # code form keeps 0.1 * k with k = 1/3; StepRVR 0 (no answer) -> total 1/30
    res = rs(None, [text], answer=["6"], key_steps=[KEY_STEPS])
    assert res.total == pytest.approx([ALPHA / 3])


def test_reward_set_weights_none_and_stats():
    def sometimes(prompts, completions, **kw):
        return [None, 2.0, 4.0]

    rs = RewardSet({"a": _const(1.0), "b": sometimes}, weights={"b": 0.5})
    res = rs(None, ["x", "y", "z"])
    # total = 1*1 + 0.5*[0 (None), 2, 4] = [1, 2, 3]
    assert res.total == [1.0, 2.0, 3.0]
    st = res.stats()
    # b excludes None: mean of [2, 4] = 3, unbiased std sqrt(((2-3)^2+(4-3)^2)/1) = sqrt(2)
    assert st["b"] == {"mean": 3.0, "std": pytest.approx(math.sqrt(2)), "count": 2}
    assert st["a"]["count"] == 3


def test_reward_set_all_none_stats():
    res = RewardSet({"n": _const(None)})(None, ["a", "b"])
    assert res.total == [0.0, 0.0]
    s = res.stats()["n"]
    assert s["count"] == 0 and math.isnan(s["mean"])


def test_reward_set_from_list_and_strings():
    rs = RewardSet([R.accuracy_reward, "step_rvr", "fastgrpo.rewards.functions:step_rar_reward", R.accuracy_reward])
    assert rs.names == ["accuracy_reward", "step_rvr_reward", "step_rar_reward", "accuracy_reward_2"]
    res = rs(None, [CORRECT], answer=["6"], key_steps=[KEY_STEPS])
    # 1 (acc) + 1 (rvr) + 1.0667 (rar) + 1 (acc again)
    assert res.total[0] == pytest.approx(4 + ALPHA * 2 / 3)
    rs2 = RewardSet([_const(1.0), _const(2.0)], weights=[1.0, 3.0])
    assert rs2(None, ["a"]).total == [7.0]


def test_reward_set_accepts_numpy_and_bool():
    np = pytest.importorskip("numpy")

    def f(prompts, completions, **kw):
        return np.array([1.0, 0.0])

    def g(prompts, completions, **kw):
        return [True, False]

    res = RewardSet({"f": f, "g": g})(None, ["a", "b"])
    assert res.total == [2.0, 0.0]
    assert all(type(v) is float for v in res.per_function["f"])


def test_reward_error_raising_names_function_and_sample():
    def picky(prompts, completions, answer, **kw):
        return [1.0 / len(a) for a in answer]  # ZeroDivisionError on an empty answer

    rs = RewardSet({"picky": picky, "ok": _const(1.0)})
    with pytest.raises(RewardError, match=r"'picky' raised on sample 2: ZeroDivisionError") as ei:
        rs(None, ["a", "b", "c"], answer=["1", "2", ""])
    assert ei.value.function == "picky" and ei.value.sample == 2
    assert isinstance(ei.value.__cause__, ZeroDivisionError)
    assert isinstance(ei.value, ValueError)


def test_reward_error_wrong_count():
    def short(prompts, completions, **kw):
        return [1.0]

    with pytest.raises(RewardError, match=r"'short' returned 1 values for 3 completions"):
        RewardSet({"short": short})(None, ["a", "b", "c"])


@pytest.mark.parametrize(
    "bad,pattern",
    [
        (float("nan"), r"'bad' returned nan for sample 1"),
        (float("inf"), r"'bad' returned inf for sample 1"),
        ("1.0", r"'bad' returned a non-number for sample 1: '1.0'"),
        ([1.0], r"'bad' returned a non-number for sample 1"),
    ],
)
def test_reward_error_bad_values(bad, pattern):
    def f(prompts, completions, **kw):
        return [0.0, bad]

    with pytest.raises(RewardError, match=pattern) as ei:
        RewardSet({"bad": f})(None, ["a", "b"])
    assert ei.value.sample == 1


@pytest.mark.parametrize("ret", [None, "1.0", 3.0, {"a": 1}])
def test_reward_error_not_a_list(ret):
    def f(prompts, completions, **kw):
        return ret

    with pytest.raises(RewardError, match="'f'"):
        RewardSet({"f": f})(None, ["a"])


def test_reward_set_construction_errors():
    with pytest.raises(ValueError, match="unknown reward functions"):
        RewardSet({"a": _const(1.0)}, weights={"b": 1.0})
    with pytest.raises(ValueError, match="2 weights for 1"):
        RewardSet([_const(1.0)], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        RewardSet({})
    with pytest.raises(TypeError, match="not callable"):
        RewardSet({"a": 3})


def test_load_reward_function():
    assert R.load_reward_function("fastgrpo.rewards:step_rvr_reward") is R.step_rvr_reward
    assert R.load_reward_function("step_rar") is R.step_rar_reward
    assert R.load_reward_function(R.accuracy_reward) is R.accuracy_reward
    with pytest.raises(RewardError, match="cannot import module 'no_such_module_xyz'"):
        R.load_reward_function("no_such_module_xyz:f")
    with pytest.raises(RewardError, match="has no attribute 'nope'"):
        R.load_reward_function("fastgrpo.rewards:nope")
    with pytest.raises(RewardError, match="is not callable"):
        R.load_reward_function("fastgrpo.rewards:BACKENDS")
    with pytest.raises(RewardError, match="not 'module:function'"):
        R.load_reward_function("not_a_builtin")
    with pytest.raises(RewardError, match="must look like"):
        R.load_reward_function("mod:")


def test_factories_have_names_for_trl():
    f = R.make_step_rar_reward(form="code", soft=False)
    assert f.__name__ == "step_rar"
    # code form, strict, CORRECT: k = 1/3 -> 1 + 0.1/3
    assert f(prompts=None, completions=[CORRECT], answer=["6"], key_steps=[KEY_STEPS])[0] == pytest.approx(1 + ALPHA / 3)
    assert R.make_step_rvr_reward().__name__ == "step_rvr"
    assert R.make_accuracy_reward(name="acc").__name__ == "acc"
    with pytest.raises(ValueError, match="form"):
        R.make_step_rar_reward(form="nope")
