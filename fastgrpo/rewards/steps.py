"""Key-step matching (StepRAR's ``k``) and a rule-based key-step extractor.

Soft matching
-------------
:func:`soft_form` maps the step text and every key-step alternative -- both
through the same function, so a text always matches itself -- to a
canonical surface form before the substring test (:func:`normalize_math` is
its readable variant: the same rules, single spaces kept between words):

* Unicode NFKC, lower case, whitespace collapsed, no spaces around operators
  and punctuation (``= + - * / ^ < > ( ) % , :``);
* LaTeX to plain arithmetic: ``$``/``\\(``/``\\[`` dropped,
  ``\\frac{a}{b}``/``\\dfrac``/``\\tfrac`` -> ``(a)/(b)``, ``\\sqrt{x}`` -> ``sqrtx``,
  ``\\cdot``/``\\times``/``×``/``·`` -> ``*``, ``\\div``/``÷`` -> ``/``,
  ``\\le``/``≤`` -> ``<=`` (likewise ``≥``, ``≠``), ``^{\\circ}`` -> ``°``,
  ``\\text{..}``/``\\mathrm{..}``/``\\boxed{..}`` unwrapped, other braces become
  parentheses, parentheses around a single number or letter dropped
  (``(12)/(2)`` and ``( 12 )/(2)`` -> ``12/2``, but ``2(3)`` and ``f(x)``
  are kept);
* number formats: thousands separators dropped (``1,000`` -> ``1000``),
  trailing decimal zeros dropped (``6.0`` -> ``6``, ``2.50`` -> ``2.5``),
  ``.5`` -> ``0.5``; markdown ``**`` dropped.

so ``\\frac{12}{2}=6``, ``12/2 = 6`` and ``12 / 2 = 6.0`` all become ``12/2=6``.
:func:`soft_form` then drops all whitespace, except that a run between two
number characters becomes a separator (``1 2`` is not ``12``).
Soft matching also refuses a match that cuts through a number: the key step
``x=6`` is not found in ``x=63`` (the published substring test finds it).

Strict matching (``soft=False``) is the published test: lower-cased
alternative ``in`` lower-cased step text.  In both modes an empty alternative
never matches (a plain ``"" in text`` would always be true).
"""

from __future__ import annotations

import functools
import json
import operator
import re
import unicodedata
from fractions import Fraction
from typing import Sequence

from ._text import sub_until_stable
from .layout import R1VL_LAYOUT, Layout, parse

__all__ = [
    "normalize_math",
    "soft_form",
    "key_step_fraction",
    "matched_groups",
    "coerce_key_steps",
    "extract_key_steps",
    "surface_forms",
]

# ---------------------------------------------------------------------------
# normalisation

_UNI = str.maketrans(
    {
        "×": "*",
        "·": "*",
        "⋅": "*",
        "∗": "*",
        "÷": "/",
        "−": "-",
        "–": "-",
        "—": "-",
        "≤": "<=",
        "≥": ">=",
        "≠": "!=",
        "π": "pi",
        "√": "sqrt",
        "\u00a0": " ",
        "\u2009": " ",
        "\u202f": " ",
    }
)

_LATEX_WRAP_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|boxed|operatorname|mbox)\s*\{([^{}]*)\}")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT_RE = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")
_SQRT_RE = re.compile(r"\\sqrt\s*\{([^{}]*)\}")
_NROOT_RE = re.compile(r"\\sqrt\s*\[([^\[\]]*)\]\s*\{([^{}]*)\}")
_CMD_NAME_RE = re.compile(r"\\([a-z]+)")
_FRAC_NAMES = ("frac", "dfrac", "tfrac")
# a command that may be a wrapper (\text{..}, \mathrm{..}, ...)
_WRAP_WORDS_RE = re.compile(r"\\(?:text|math|boxed|operatorname|mbox)")
# every remaining backslash command, handled by one callback
_CMD_RE = re.compile(r"\\([a-z]+|.)", re.S)
_CMD_MAP = {
    "left": "",
    "right": "",
    "displaystyle": "",
    "cdots": "...",
    "ldots": "...",
    "dots": "...",
    "cdot": "*",
    "times": "*",
    "ast": "*",
    "div": "/",
    "leq": "<=",
    "le": "<=",
    "geq": ">=",
    "ge": ">=",
    "neq": "!=",
    "ne": "!=",
    "approx": "≈",
    "circ": "°",
    "degree": "°",
    "quad": " ",
    "qquad": " ",
    "!": "",
    ",": " ",
    ";": " ",
    ":": " ",
    " ": " ",
    "\n": " ",
    "%": "%",
    "(": " ",
    ")": " ",
    "[": " ",
    "]": " ",
    "{": "(",
    "}": ")",
    "$": "$",
    "\\": " ",
}


def _cmd(m: re.Match) -> str:
    w = m.group(1)
    r = _CMD_MAP.get(w)
    if r is not None:
        return r
    return w if w.isalpha() else " "


# literal-first patterns (the regex engine then jumps between candidates)
_THOUSANDS_RE = re.compile(r",(?<=\d,)(?=\d{3}(?!\d))")
# decimal points, in one scan: after a digit, trailing zeros go ("6.0" -> "6",
# "2.50" -> "2.5"; group 1 is the kept digits); not after a digit or a dot, a
# leading zero comes in (".5" -> "0.5"; group 1 does not take part).  The two
# cases exclude each other and neither creates the other's context, so one
# pass equals the two passes one after the other.
_DECIMAL_RE = re.compile(r"\.(?:(?<=\d\.)(\d*?)0+(?!\d)|(?<![\d.]\.)(?=\d))")
_SPACE_OP_RE = re.compile(r" (?=[=+\-*/^<>%,:≈!])")
_OP_SPACE_RE = re.compile(r"(?<=[=+\-*/^<>%,:≈!]) ")
# substring tests for two-character needles: a compiled literal's search
# is faster than ``in`` on long text (8.8 vs 16.3 ms per 10k step texts)
_STARS_RE = re.compile(r"\*\*")
_NESTED_RE = re.compile(r"\(\(")
# "(12)" / "(x)" not preceded by a letter, digit, "_", "." or ")" ("2(3)" and
# "f(x)" are kept); the lookbehind sits after the literal "(" so that the
# engine still scans for "(" first; spaces inside are allowed ("( 12 )")
_ATOM_PAREN_RE = re.compile(r"\((?<![a-z0-9_.)]\()\s*(-?\d+(?:\.\d+)?|[a-z])\s*\)")
_SQRT_PAREN_RE = re.compile(r"sqrt\(\s*(\d+(?:\.\d+)?|[a-z])\s*\)")


# ``repl`` that returns group 1, called from C (a template such as r"\1" or a
# Python function costs a Python call per match on Python 3.11)
_GROUP1 = operator.itemgetter(1)


def _decimal(m: re.Match) -> str:
    kept = m.group(1)
    if kept is None:  # leading dot
        return "0."
    return "." + kept if kept else ""


def _frac(m: re.Match) -> str:
    # r"(\1)/(\2)" without the template expansion (a Python call per match)
    return "(" + m.group(1) + ")/(" + m.group(2) + ")"


def _latex_to_plain(s: str) -> str:
    """LaTeX -> plain arithmetic (``s`` already lower-cased)."""
    if "\\" in s:
        # the names of all \commands, from one scan: the gates below test this
        # list instead of scanning the text for "frac", "sqrt", ... each time
        names = _CMD_NAME_RE.findall(s)
        if "{" in s and _WRAP_WORDS_RE.search(s):
            for _ in range(4):
                s, n = _LATEX_WRAP_RE.subn(r"\1", s)
                if not n or not _WRAP_WORDS_RE.search(s):
                    break
            names = _CMD_NAME_RE.findall(s)  # unwrapping can join text into new commands
        nfrac = sum(map(_FRAC_NAMES.__contains__, names))
        if nfrac:
            # each match removes exactly one \frac and creates none, so the
            # count says when no match is left (no rescan for "frac")
            for _ in range(8):
                s, n = _FRAC_RE.subn(_frac, s)
                nfrac -= n
                if not n or not nfrac:
                    break
            if nfrac:
                s = _FRAC_SHORT_RE.sub(r"\1/\2", s)
        if "sqrt" in names:
            if "\\sqrt[" in s:
                s = _NROOT_RE.sub(r"root(\1)(\2)", s)
            for _ in range(4):
                s, n = _SQRT_RE.subn(r"sqrt(\1)", s)
                if not n or "\\sqrt" not in s:
                    break
        s = _CMD_RE.sub(_cmd, s)
    if "$" in s:
        s = s.replace("$", " ")
    if "{" in s:
        s = s.replace("{", "(").replace("}", ")")
    if "°" in s:
        s = s.replace("^(°)", "°").replace("^°", "°")
    return s


def _normalize_tokens(s: str) -> str:
    """Everything of :func:`normalize_math` except the whitespace rules."""
    if not s.isascii():
        s = unicodedata.normalize("NFKC", s).translate(_UNI)
    s = s.lower()
    if "\\" in s or "$" in s or "{" in s:
        s = _latex_to_plain(s)
    if _STARS_RE.search(s):
        s = s.replace("**", "")
    if "," in s:
        s = _THOUSANDS_RE.sub("", s)
    if "." in s:
        s = _DECIMAL_RE.sub(_decimal, s)
    if "(" in s:
        s = _drop_atom_parens(s)
    return s


def _drop_atom_parens(s: str) -> str:
    if "sqrt" in s:
        s = _SQRT_PAREN_RE.sub(r"sqrt\1", s)
    for _ in range(3):
        nested = _NESTED_RE.search(s) is not None
        s, n = _ATOM_PAREN_RE.subn(_GROUP1, s)
        if not n or not nested:
            break
    return s


def normalize_math(s: str) -> str:
    """Canonical surface form, readable: the rules of soft matching with single
    spaces kept between words (matching itself compares :func:`soft_form`)."""
    if not s:
        return ""
    s = _normalize_tokens(s)
    s = " ".join(s.split())
    s = _SPACE_OP_RE.sub("", s)
    s = _OP_SPACE_RE.sub("", s)
    if "(" in s:
        s = s.replace("( ", "(").replace(" )", ")")
        s = _drop_atom_parens(s)
    return s




# Soft matching ignores whitespace, except that two numbers separated by
# whitespace stay apart: a space between two number characters becomes a
# separator, so that "1 2" does not turn into "12" (the pattern starts with a
# literal: fast scan).
_DIGIT_SPACE_RE = re.compile(r" (?=[\d.])(?<=[\d.] )")
_SEP = "\x1f"


# byte classes for the ASCII fast path of _squash: b"d" a number character
# ([0-9.], what ``[\d.]`` matches in ASCII), b" " a space or newline, b"w" a
# tab, CR, VT or FF, b"x" anything else
_SQ_CLASS = bytes(
    ord("d") if (48 <= i <= 57 or i == 46)
    else 32 if i in (32, 10)
    else ord("w") if i in (9, 13, 11, 12)
    else ord("x")
    for i in range(256)
)
# on the class map: a run of spaces/newlines between two number characters
_SQ_KEEP_RE = re.compile(rb"d +(?=d)")


def _squash_slow(s: str) -> str:
    if "\n" in s:
        s = s.replace("\n", " ")
    if "\t" in s or "\r" in s or "\x0b" in s or "\x0c" in s:
        s = " ".join(s.split())
    while "  " in s:
        s = s.replace("  ", " ")
    s = _DIGIT_SPACE_RE.sub(_SEP, s)
    return s.replace(" ", "")


def _squash(s: str) -> str:
    r"""Drop whitespace; a whitespace run between two number characters
    (``[\d.]``) becomes one ``_SEP``.

    Same result as :func:`_squash_slow`; ASCII text (the usual case) is done
    on bytes: the runs to keep are found by one regex scan of a class map of
    the text, every other space and newline is deleted by one
    ``bytes.translate``.
    """
    if not s.isascii():
        return _squash_slow(s)
    b = s.encode("ascii")
    cls = b.translate(_SQ_CLASS)
    if b"w" in cls:  # rare: other whitespace, every run becomes one space
        b = " ".join(s.split()).encode("ascii")
        cls = b.translate(_SQ_CLASS)
    parts = []
    last = 0
    for m in _SQ_KEEP_RE.finditer(cls):
        parts.append(b[last : m.start() + 1])
        last = m.end()
    if parts:
        parts.append(b[last:])
        b = b"\x1f".join(parts)
    return b.translate(None, b" \n").decode("ascii")


def soft_form(s: str) -> str:
    """The form soft matching compares, for the step text and for every
    key-step alternative alike: :func:`normalize_math`'s token rules, then
    all whitespace removed (a run between two number characters becomes the
    separator ``"\\x1f"``).  One function for both sides, so a text always
    matches itself."""
    return _squash(_normalize_tokens(s))


# the step texts (long, one per completion: room for a batch of 16k, as the
# parse cache) and the alternatives (short, the same for the G completions
# of a prompt) are memoised apart
_hay = functools.lru_cache(maxsize=16384)(soft_form)
_needle = functools.lru_cache(maxsize=65536)(soft_form)


def _soft_contains(hay: str, needle: str) -> bool:
    """``needle in hay`` (both squashed) without cutting through a number."""
    if not needle:
        return False
    start_digit = needle[0].isdigit()
    end_digit = needle[-1].isdigit()
    if not (start_digit or end_digit):
        return needle in hay
    n = len(hay)
    i = hay.find(needle)
    while i != -1:
        ok = True
        if start_digit and i > 0:
            c = hay[i - 1]
            if c.isdigit() or (c == "." and i > 1 and hay[i - 2].isdigit()):
                ok = False
        if ok and end_digit:
            j = i + len(needle)
            if j < n:
                c = hay[j]
                if c.isdigit() or (c == "." and j + 1 < n and hay[j + 1].isdigit()):
                    ok = False
        if ok:
            return True
        i = hay.find(needle, i + 1)
    return False


def coerce_key_steps(key_steps) -> list[list[str]] | None:
    """Accept the dataset's ``key_steps`` in the usual shapes.

    ``None`` -> ``None``; a JSON string is decoded; a group given as a plain
    string becomes a one-alternative group; non-string alternatives are
    converted with ``str``.
    """
    if key_steps is None:
        return None
    if isinstance(key_steps, str):
        t = key_steps.strip()
        if not t:
            return []
        try:
            key_steps = json.loads(t)
        except ValueError:
            return [[key_steps]]
        if isinstance(key_steps, str):
            return [[key_steps]]
    out = []
    for g in key_steps:
        if g is None:
            out.append([])
        elif isinstance(g, str):
            out.append([g])
        else:
            out.append([a if isinstance(a, str) else str(a) for a in g if a is not None])
    return out


def matched_groups(step_text: str, key_steps: Sequence, soft: bool = True) -> list[bool]:
    """For each key-step group, whether one of its alternatives is in the text."""
    groups = coerce_key_steps(key_steps) or []
    if not groups:
        return []
    if soft:
        hay = _hay(step_text) if step_text else ""
        res = []
        for g in groups:
            hit = False
            for alt in g:
                if alt and _soft_contains(hay, _needle(alt)):
                    hit = True
                    break
            res.append(hit)
        return res
    hay = (step_text or "").lower()
    return [any(alt and alt.lower() in hay for alt in g) for g in groups]


def key_step_fraction(step_text: str, key_steps: Sequence, soft: bool = True) -> float:
    """``k`` = matched groups / groups (0.0 when there are no groups)."""
    m = matched_groups(step_text, key_steps, soft=soft)
    if not m:
        return 0.0
    return sum(m) / len(m)


# ---------------------------------------------------------------------------
# rule-based key-step extraction

_UNWRAP_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")
_MATH_RUN_RE = re.compile(
    r"(?:(?<![A-Za-z\\])[A-Za-z]{2,}[ \t]*(?=[=≈]))?"  # a variable word right before '='
    r"(?:\\[A-Za-z]+|\d+(?:[.,]\d+)*|(?<![A-Za-z\\])[A-Za-z](?![A-Za-z])"
    r"|[=+\-*/^(){}\[\]×÷·√π%°<>≤≥≈_|!]|[ \t])+"
)
_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?![\w])")
_TRIM_CHARS = " \t+-*/^=×÷·<>≤≥≈,:;|!_"
_FINAL_LINE_RE = re.compile(r"(?:###\s*)?the\s+final\s+answer\s+is|<answer>|\\boxed", re.I)
_SENT_SPLIT_RE = re.compile(r"\n+|(?<=[.!?])\s+(?=[A-Z])")


def _balanced(s: str) -> bool:
    return s.count("(") == s.count(")") and s.count("{") == s.count("}") and s.count("[") == s.count("]")


def _clean_expr(s: str) -> str:
    s = " ".join(s.split())
    # strip dangling operators, and brackets that do not balance
    prev = None
    while prev != s:
        prev = s
        s = s.strip(_TRIM_CHARS)
        if s.endswith(("(", "{", "[")):
            s = s[:-1]
        if s.startswith((")", "}", "]")):
            s = s[1:]
        if not _balanced(s):
            if s.startswith(("(", "{", "[")) and s.count(s[0]) > s.count({"(": ")", "{": "}", "[": "]"}[s[0]]):
                s = s[1:]
            elif s.endswith((")", "}", "]")):
                close = s[-1]
                opener = {")": "(", "}": "{", "]": "["}[close]
                if s.count(close) > s.count(opener):
                    s = s[:-1]
    return s.strip()


def _fmt_fraction(v: Fraction) -> str:
    if v.denominator == 1:
        return str(v.numerator)
    # terminating decimal?
    d = v.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d == 1:
        s = f"{float(v):.12f}".rstrip("0").rstrip(".")
        return s
    return f"{v.numerator}/{v.denominator}"


def _number_forms(tok: str) -> list[str]:
    try:
        v = Fraction(tok.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return [tok]
    canon = _fmt_fraction(v)
    forms = [tok, canon]
    if v.denominator == 1 and abs(v) >= 1000:
        forms.append(f"{v.numerator:,}")
    return list(dict.fromkeys(forms))


def _to_plain(expr: str) -> str:
    s = sub_until_stable(_UNWRAP_TEXT_RE, r"\1", expr, 4)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")

    def frac(m: re.Match) -> str:
        a, b = m.group(1).strip(), m.group(2).strip()
        a = a if re.fullmatch(r"[\w.]+", a) else f"({a})"
        b = b if re.fullmatch(r"[\w.]+", b) else f"({b})"
        return f"{a}/{b}"

    s = sub_until_stable(_FRAC_RE, frac, s, 6)
    s = sub_until_stable(_SQRT_RE, r"sqrt(\1)", s, 4)
    for a, b in (
        ("\\cdot", "*"),
        ("\\times", "*"),
        ("\\div", "/"),
        ("\\left", ""),
        ("\\right", ""),
        ("^{\\circ}", "°"),
        ("^\\circ", "°"),
        ("\\%", "%"),
        ("\\pi", "pi"),
        ("\\approx", "≈"),
        ("\\leq", "<="),
        ("\\geq", ">="),
        ("×", "*"),
        ("·", "*"),
        ("÷", "/"),
    ):
        s = s.replace(a, b)
    s = re.sub(r"\^\{([^{}]*)\}", lambda m: "^" + (m.group(1) if re.fullmatch(r"[\w.]+", m.group(1)) else f"({m.group(1)})"), s)
    s = s.replace("{", "(").replace("}", ")")
    s = re.sub(r"\\([A-Za-z]+)", r"\1", s)
    return " ".join(s.split())


_OPS_FOR_SPACING = re.compile(r"\s*(<=|>=|[=+\-*/<>≈])\s*")


def surface_forms(expr: str) -> list[str]:
    """Equivalent surface forms of an expression or equation.

    E.g. ``\\frac{12}{2} = 6`` -> ``["\\frac{12}{2} = 6", "12/2=6",
    "12 / 2 = 6", "\\frac{12}{2}=6"]``.  Lower case, duplicates removed,
    original first.
    """
    orig = " ".join(expr.split()).lower()
    if not orig:
        return []
    plain = _to_plain(orig)
    compact = _OPS_FOR_SPACING.sub(r"\1", plain)
    compact = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", compact)
    spaced = _OPS_FOR_SPACING.sub(r" \1 ", compact).strip()
    spaced = " ".join(spaced.split())
    # spaced form glues a leading minus back to its number: "= - 3" -> "= -3"
    spaced = re.sub(r"(^|[=(] )- (\d)", r"\1-\2", spaced)
    forms = [orig, compact, spaced]
    if " * " in spaced:
        forms.append(spaced.replace(" * ", " \\times "))
    # LaTeX form of simple a/b fractions
    latex = re.sub(r"(?<![\w.)])(\d+(?:\.\d+)?|[a-z])/(\d+(?:\.\d+)?|[a-z])(?![\w.(])", r"\\frac{\1}{\2}", compact)
    if latex != compact:
        forms.append(latex)
    return [f for f in dict.fromkeys(forms) if f]


def _equations_in(text: str) -> list[str]:
    t = text.replace("$", " ").replace("\\(", " ").replace("\\)", " ").replace("\\[", " ").replace("\\]", " ")
    t = _UNWRAP_TEXT_RE.sub(r" \1 ", t)
    out = []
    for run in _MATH_RUN_RE.findall(t):
        # most runs are the spaces between words: only runs with a relation
        # are cleaned (cleaning only strips characters, it adds none)
        if "=" not in run and "≈" not in run and "\\approx" not in run:
            continue
        run = _clean_expr(run)
        if not run or ("=" not in run and "≈" not in run and "\\approx" not in run):
            continue
        sides = [x.strip() for x in re.split(r"=|≈|\\approx", run)]
        if len(sides) < 2 or any(not s for s in sides):
            continue
        if not any(ch.isdigit() or ch.isalpha() for ch in sides[-1]):
            continue
        out.append(run)
    return out


def _groups_for_equation(eq: str) -> list[str]:
    sides = [x.strip() for x in re.split(r"(?<![<>!])=(?!=)", eq)]
    cands = [eq]
    if len(sides) > 2:
        cands.append(f"{sides[0]} = {sides[-1]}")
        cands.append(f"{sides[-2]} = {sides[-1]}")
    forms: list[str] = []
    for c in cands:
        forms.extend(surface_forms(c))
    return list(dict.fromkeys(forms))


def _step_texts(solution: str, layout: Layout) -> list[str]:
    p = parse(solution, layout)
    if p.steps:
        return [t for _, t in p.steps]
    body = solution
    if p.answer_position is not None:
        body = solution[: p.answer_position]
    m = _FINAL_LINE_RE.search(body)
    if m:
        body = body[: m.start()]
    return [s for s in _SENT_SPLIT_RE.split(body) if s and s.strip()]


def extract_key_steps(solution: str, layout: Layout = R1VL_LAYOUT, *, max_groups_per_step: int = 4) -> list[list[str]]:
    """Key-step groups from a reference solution, rule-based.

    For each step (the layout's steps; without any, each line / sentence
    before the final answer): every equation (``lhs = rhs``, chains
    ``a = b = c`` also as ``a = c`` and ``b = c``) becomes a group of its
    surface forms (original, plain compact ``12/2=6``, plain spaced
    ``12 / 2 = 6``, LaTeX ``\\frac{12}{2}=6``); a step without an equation
    contributes its last number as an intermediate result (``1,000`` /
    ``1000``).  Groups are de-duplicated across steps; at most
    ``max_groups_per_step`` per step.
    """
    if not solution or not isinstance(solution, str):
        return []
    groups: list[list[str]] = []
    seen: set[str] = set()
    for text in _step_texts(solution, layout):
        step_groups: list[list[str]] = []
        for eq in _equations_in(text):
            g = _groups_for_equation(eq)
            if g:
                step_groups.append(g)
        if not step_groups:
            nums = _NUMBER_RE.findall(text.replace("$", " "))
            if nums:
                step_groups.append(_number_forms(nums[-1]))
        for g in step_groups[:max_groups_per_step]:
            key = normalize_math(g[0])
            if key in seen:
                continue
            seen.add(key)
            groups.append(g)
    return groups


