"""Soft key-step normalisation, matching and the rule-based key-step extractor."""


import pytest

import fastgrpo.rewards as R

from fastgrpo.rewards import TAG_LAYOUT

# surface forms that must normalise to the same string
SAME = [
    ["\\frac{12}{2}=6", "12/2 = 6", "12 / 2 = 6.0", "$\\dfrac{12}{2} = 6$", "12 ÷ 2 = 6", "\\tfrac{12}{2}=6.00", "12\\div 2=6"],
    ["4 \\times 3 = 12", "4*3=12", "4 × 3 = 12", "4 \\cdot 3 = 12", "4·3 = 12"],
    ["\\sqrt{9} = 3", "√9 = 3", "sqrt(9)=3"],
    ["x^{2}", "x^2", "X^2", "x ^ 2"],
    ["1,000 + 2.50", "1000+2.5", "1{,}000 + 2.5".replace("{,}", ",")],
    ["\\angle ABC = 45^{\\circ}", "angle ABC = 45°", "\\angle abc=45^\\circ"],
    ["(a+b)/2", "\\frac{a+b}{2}"],
    ["AREA  =\n 6", "area=6", "**Area** = 6"],
    ["x \\leq 3", "x ≤ 3", "x<=3"],
    ["0.5", ".5", "0.50"],
    ["\\text{speed} = 5", "speed = 5"],
    ["(1, 2)", "( 1,2 )"],
]


@pytest.mark.parametrize("forms", SAME)
def test_normalize_math_equivalent_forms(forms):
    norm = {R.normalize_math(f) for f in forms}
    assert len(norm) == 1, norm


@pytest.mark.parametrize(
    "s,expected",
    [
        ("\\frac{12}{2} = 6", "12/2=6"),
        ("12 / 2 = 6.0", "12/2=6"),
        ("2(3)", "2(3)"),  # implicit product keeps its parentheses
        ("f(x) = 2", "f(x)=2"),  # so does a function call
        ("\\frac{\\frac{1}{2}}{3}", "(1/2)/3"),  # nested fractions
        ("", ""),
        ("１２／２＝６", "12/2=6"),  # full-width (NFKC)
        ("1 2", "1 2"),  # numbers separated by a space stay separate
    ],
)
def test_normalize_math_values(s, expected):
    assert R.normalize_math(s) == expected


DIFFERENT = [
    ("12/2=6", "12/3=4"),
    ("1 2", "12"),
    ("2(3)", "23"),
    ("x=6", "x=-6"),
]


@pytest.mark.parametrize("a,b", DIFFERENT)
def test_normalize_math_keeps_differences(a, b):
    assert R.normalize_math(a) != R.normalize_math(b)


@pytest.mark.parametrize(
    "text,groups,soft,expected",
    [
        # "\frac{12}{2}=6", "12/2 = 6" and "12 / 2 = 6.0" match each other when soft
        ("so $\\frac{12}{2}=6$.", [["12 / 2 = 6.0"]], True, 1.0),
        ("so 12/2 = 6.", [["\\frac{12}{2}=6"]], True, 1.0),
        ("so 12 / 2 = 6.0 cm", [["12/2 = 6"]], True, 1.0),
        # strict = published substring test: only the literal form
        ("so 12 / 2 = 6.0 cm", [["12/2 = 6"]], False, 0.0),
        ("so 12/2 = 6 cm", [["12/2 = 6"]], False, 1.0),
        ("So 12/2 = 6 CM", [["12/2 = 6 cm"]], False, 1.0),  # strict is case-insensitive
        # 2 of 4 groups, any alternative of a group suffices
        ("A = 4 × 3 = 12; half is 6", [["nope", "4*3=12"], ["half is 6"], ["area"], ["perimeter"]], True, 0.5),
        # no groups -> k = 0
        ("anything", [], True, 0.0),
        # empty text
        ("", [["6"]], True, 0.0),
        # number boundaries (soft only): "6" is not in "16", nor "2" in "2.5"
        ("we have 16 apples", [["6"]], True, 0.0),
        ("we have 16 apples", [["6"]], False, 1.0),
        ("y = 2.5", [["y=2"]], True, 0.0),
        ("y = 2.", [["y=2"]], True, 1.0),  # a full stop is no decimal point
        ("sum is 6", [["6"]], True, 1.0),
        # spaces inside braces and parentheses: the parentheses around a single
        # number still go, in the step text as in the key step
        ("so $\\frac{ 12 }{ 2 } = 6$.", [["12/2=6"]], True, 1.0),
        ("so $\\left( 12 \\right) / 2 = 6$", [["12 / 2 = 6"]], True, 1.0),
        ("so $\\frac{ 12 }{ 2 } = 6$.", [["\\frac{ 12 }{ 2 } = 6"]], True, 1.0),
    ],
)
def test_key_step_fraction(text, groups, soft, expected):
    assert R.key_step_fraction(text, groups, soft=soft) == pytest.approx(expected)


def test_soft_text_matches_itself():
    # the step text and the key steps go through the same soft_form, so any
    # text is found in itself (once something is left of it); random mixes of
    # LaTeX, numbers, brackets and whitespace
    import random

    tokens = [
        "\\frac{", "}{", "}", "{ ", " }", "( ", " )", "(", ")", "\\left(", "\\right)", "\\sqrt{", "12", "2",
        "6.0", ".5", "1,000", " ", "  ", "\n", "=", " = ", "/", "\\times", "x", "ab", "$", "**", "-", "\\text{cm}",
    ]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(tokens) for _ in range(rng.randint(1, 12)))
        expected = [bool(R.soft_form(text))]
        assert R.matched_groups(text, [[text]]) == expected, repr(text)


def test_matched_groups_and_coercion():
    assert R.matched_groups("4*3=12", [["4 × 3 = 12"], "5"]) == [True, False]
    assert R.coerce_key_steps(None) is None
    assert R.coerce_key_steps("") == []
    assert R.coerce_key_steps('[["a", "b"], "c"]') == [["a", "b"], ["c"]]
    assert R.coerce_key_steps("not json") == [["not json"]]
    assert R.coerce_key_steps([["a", None, 3], None]) == [["a", "3"], []]


# ---------------------------------------------------------------------------
# extractor

REFERENCE = """### Rationales:
Use the area formula.
### Step 1: The rectangle's area is $A = 4 \\times 3 = 12$ square units.
### Step 2: The triangle is half of it: $\\frac{12}{2} = 6$.
### Step 3: The total cost is 1,200 dollars.
### The final answer is: 6"""


def test_extract_key_steps_r1vl():
    groups = R.extract_key_steps(REFERENCE)
    # step 1: the chain "A = 4 \times 3 = 12" -> one group with the chain and its parts
    assert "a=4*3=12" in groups[0] and "4 \\times 3 = 12" in groups[0] and "a=12" in groups[0]
    # step 2: "\frac{12}{2} = 6" with its plain, spaced and LaTeX forms
    assert groups[1] == ["\\frac{12}{2} = 6", "12/2=6", "12 / 2 = 6", "\\frac{12}{2}=6"]
    # step 3 has no equation: its intermediate result, with and without the thousands separator
    assert groups[2] == ["1,200", "1200"]
    assert len(groups) == 3  # the final answer section is not a step


def test_extracted_key_steps_score_other_surface_forms():
    groups = R.extract_key_steps(REFERENCE)
    completion = (
        "### Rationales:\nhalf\n### Step 1: 4 * 3 = 12\n### Step 2: 12 / 2 = 6\n"
        "### Step 3: It costs 1200 dollars.\n### The final answer is: 6"
    )
    # all three groups are matched, even by the literal (strict) test, since the
    # plain spaced forms "4 * 3 = 12", "12 / 2 = 6" and "1200" are alternatives
    for soft in (True, False):
        out = R.step_k(None, [completion], [groups], soft=soft)
        assert out == [pytest.approx(1.0)]
    # a completion that only got the first step right: k = 1/3
    partial = "### Rationales:\nx\n### Step 1: 4 \\times 3 = 12\n### Step 2: 12 / 3 = 4\n### The final answer is: 4"
    assert R.step_k(None, [partial], [groups]) == [pytest.approx(1 / 3)]


def test_extract_key_steps_free_form_and_tag():
    free = "The area is 4 * 3 = 12.\nHalf of it is 12/2 = 6.\nThe final answer is: 6"
    groups = R.extract_key_steps(free)
    # no "### Step" headers: each line before the final answer is a step
    assert len(groups) == 2 and "4*3=12" in groups[0] and "12/2=6" in groups[1]
    tag = "<think>Step 1: 4 × 3 = 12\nStep 2: 12 ÷ 2 = 6</think><answer>6</answer>"
    groups = R.extract_key_steps(tag, TAG_LAYOUT)
    assert [g[1] for g in groups] == ["4*3=12", "12/2=6"]


def test_extract_key_steps_degenerate():
    assert R.extract_key_steps("") == []
    assert R.extract_key_steps(None) == []
    assert R.extract_key_steps("### Step 1: think hard.\n### Step 2: done.") == []
    # duplicates across steps are kept once
    dup = "### Step 1: 2+2=4\n### Step 2: again 2 + 2 = 4"
    assert len(R.extract_key_steps(dup)) == 1


def test_surface_forms():
    assert R.surface_forms("\\frac{12}{2} = 6") == ["\\frac{12}{2} = 6", "12/2=6", "12 / 2 = 6", "\\frac{12}{2}=6"]
    assert R.surface_forms("x = -3") == ["x = -3", "x=-3"]
    assert R.surface_forms("") == []


def test_squash_fast_path_matches_reference():
    # the ASCII fast path of _squash (bytes) must give exactly the result of
    # the plain string version on every mix of whitespace and number chars
    import random

    from fastgrpo.rewards import steps as S

    samples = [
        "", " ", "1 2", "1  2", "1\n2", "1 \n 2", "1\t2", "a 1 . 2 b", ". .", "x = 6 .", "1\x1f 2", "1 \x1c 2",
        "12 / 2 = 6", "  1  ", "1\r\n2", "1\x0b2", "1\x0c 2", "\u00e9 1 2", "1 \u2028 2", "\u0663 1",
    ]
    rng = random.Random(0)
    alphabet = list(" \n\t\r\x0b\x0c\x1c\x1f 0123456789..ab=\u00e9\u0663")
    for _ in range(5000):
        samples.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))))
    for s in samples:
        assert S._squash(s) == S._squash_slow(s), repr(s)
