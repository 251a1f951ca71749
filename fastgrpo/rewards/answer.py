"""Final-answer extraction and equivalence.

:func:`answers_match` decides whether a predicted final answer equals the
reference.  It runs in three tiers, cheapest first:

1. **Pure-Python fast path** (always, no imports): normalised text equality;
   multiple-choice letters (``"B"``, ``"(B)"``, ``"B."``, ``"B) 12 cm"``,
   ``"Option B"``); numbers compared exactly as :class:`fractions.Fraction`
   -- integers, decimals (``6`` = ``6.0``), thousands separators
   (``1,000`` = ``1000`` = ``1{,}000``), fractions (``3/4``, ``\\frac{3}{4}``,
   ``\\dfrac``, ``\\tfrac``, ``\\frac34``), percentages (``50%`` equals both
   ``50`` and ``0.5``), scientific notation, a leading ``x =`` and a trailing
   unit word (``6 cm``; two different units never match).  A decimal with at
   least two fractional digits also matches a fraction that rounds to it
   (``0.33`` = ``1/3``).  When both sides are numbers (or the reference is a
   choice letter) the fast path's verdict is final, so the common numeric
   case never touches sympy.
2. **Symbolic backend** for the rest, when both sides look mathematical:
   ``math_verify`` if importable (what the published StepGRPO code uses),
   else ``sympy`` (a small LaTeX-to-sympy converter with a whitelist -- no
   arbitrary names reach ``eval`` -- and guards against huge powers), else
   nothing.  Choose with :func:`set_backend` or ``answers_match(...,
   backend=...)``: ``"auto"``, ``"math_verify"``, ``"sympy"``, ``"python"``.
3. Otherwise the answers differ.

Results are memoised on ``(pred, ref, backend)``.
"""

from __future__ import annotations

import functools
import re
import threading
import unicodedata
from dataclasses import dataclass
from fractions import Fraction

from ._text import sub_until_stable

__all__ = [
    "answers_match",
    "extract_answer",
    "gold_answer",
    "normalize_answer",
    "parse_number",
    "set_backend",
    "get_backend",
    "available_backends",
    "BACKENDS",
]

BACKENDS = ("auto", "math_verify", "sympy", "python")
_backend_setting = "auto"


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def available_backends() -> tuple[str, ...]:
    """Backends usable in this environment, best first (``"python"`` always)."""
    out = []
    if _importable("math_verify"):
        out.append("math_verify")
    if _importable("sympy"):
        out.append("sympy")
    out.append("python")
    return tuple(out)


def set_backend(name: str) -> None:
    """Select the symbolic backend for :func:`answers_match` globally."""
    global _backend_setting
    if name not in BACKENDS:
        raise ValueError(f"unknown answer backend {name!r}; choose one of {BACKENDS}")
    if name != "auto" and name not in available_backends():
        raise ValueError(f"answer backend {name!r} is not installed (available: {available_backends()})")
    _backend_setting = name


def get_backend() -> str:
    """The backend actually used: the setting, with ``"auto"`` resolved."""
    if _backend_setting == "auto":
        return available_backends()[0]
    return _backend_setting


# ---------------------------------------------------------------------------
# extraction

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S | re.I)
_FINAL_HDR_RE = re.compile(r"(?:###\s*)?the\s+final\s+answer\s+is\s*:?", re.I)
_GSM8K_RE = re.compile(r"(?:^|\n|[^#])####(?!#)\s*")  # GSM8K's "#### 42" (not R1-VL's "###")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (brace-matched), or ``None``."""
    ms = list(_BOXED_RE.finditer(text))
    for m in reversed(ms):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                ch = text[j]
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
            # unbalanced: take the rest
            return text[i + 1 :]
        # \boxed 5
        tok = re.match(r"[^\s$]+", text[i:])
        if tok:
            return tok.group(0)
    return None


_WRAP_FIRST = frozenset("$\\*`")
_WRAP_LAST = frozenset(".。")


def _strip_wrappers(s: str) -> str:
    s = s.strip()
    if not s or (s[0] not in _WRAP_FIRST and s[-1] not in _WRAP_LAST):
        return s
    changed = True
    while changed and s:
        changed = False
        for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"), ("`", "`")):
            if len(s) >= len(a) + len(b) and s.startswith(a) and s.endswith(b):
                s = s[len(a) : len(s) - len(b)].strip()
                changed = True
        if s.endswith(".") or s.endswith("。"):
            s = s[:-1].rstrip()
            changed = True
    return s


def extract_answer(text: str | None) -> str | None:
    """The final answer in ``text``.

    Order: the last ``\\boxed{...}``; else what follows GSM8K's last ``#### ``; else the inside of ``<answer>...</answer>``;
    else what follows "The final answer is:"; else the text itself.  Of that,
    the first non-empty line, without surrounding ``$``/``\\(``/``**`` and a
    trailing full stop.  ``None`` when nothing is left.
    """
    if text is None:
        return None
    if not isinstance(text, str):
        text = str(text)
    if not text.strip():
        return None
    boxed = _last_boxed(text) if "\\" in text else None
    gsm = list(_GSM8K_RE.finditer(text)) if "####" in text else []
    if boxed is not None:
        s = boxed
    elif gsm:  # GSM8K: the answer follows the last "####"
        s = text[gsm[-1].end():].strip()
        if "\n" in s:
            s = s.split("\n", 1)[0]
    else:
        s = text
        if "<" in s:
            m = _ANSWER_TAG_RE.search(s)
            if m:
                s = m.group(1)
        ms = list(_FINAL_HDR_RE.finditer(s)) if "nswer" in s else []
        if ms:
            s = s[ms[-1].end() :]
        s = s.strip()
        if "\n" in s:
            s = next((ln for ln in s.split("\n") if ln.strip()), "")
    s = _strip_wrappers(s)
    if not s:
        return None
    return s


# ---------------------------------------------------------------------------
# normalisation

_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING = ("\\!", "\\,", "\\;", "\\:", "\\ ", "\\quad", "\\qquad", "\\displaystyle", "\\left", "\\right")
_WS_RE = re.compile(r"\s+")


def normalize_answer(s: str, lower: bool = True) -> str:
    """Normalised answer text used for comparisons."""
    s = unicodedata.normalize("NFKC", s)
    if "\\" in s:
        if "boxed" in s or "fbox" in s:
            b = _last_boxed(s)
            if b is not None:
                s = b
        s = sub_until_stable(_TEXT_CMD_RE, r"\1", s, 3)
        for tok in _SPACING:
            if tok in s:
                s = s.replace(tok, " " if tok in ("\\ ", "\\quad", "\\qquad") else "")
        s = s.replace("\\%", "%").replace("\\$", "")
        s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("−", "-").replace("–", "-").replace("{,}", ",")
    s = _WS_RE.sub(" ", s)
    s = _strip_wrappers(s)
    s = s.strip(" \"'")
    if lower:
        s = s.lower()
    return s


# ---------------------------------------------------------------------------
# numbers


@dataclass(frozen=True)
class Number:
    value: Fraction
    decimals: int | None  # fractional digits when written as a decimal
    is_fraction: bool  # written as a/b or \frac
    percent: bool
    unit: str | None


_PLAIN_NUM = r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:e[+-]?\d{1,3})?"
_PLAIN_NUM_RE = re.compile(rf"^{_PLAIN_NUM}$")
_FRAC_RE = re.compile(r"^([+-]?)\\frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}$")
_FRAC_SHORT_RE = re.compile(r"^([+-]?)\\frac\s*(\d)\s*(\d)$")
_SLASH_RE = re.compile(r"^([+-]?[\d.,]+)\s*/\s*([\d.,]+)$")
_DEGREE_RE = re.compile(r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree)\s*$")
_UNIT_RE = re.compile(
    r"^(.*?[\d}])\s*((?:[a-z]{2,}|[mgslhvw])(?:\^?\{?[23]\}?)?\.?(?:\s+[a-z]{2,}\.?)?)$"
)
_NOT_UNITS = {"pi", "sqrt", "ln", "log", "sin", "cos", "tan", "exp", "infty", "inf", "frac", "e", "i"}


def _plain_to_fraction(s: str) -> tuple[Fraction, int | None] | None:
    s = s.strip()
    if not s or not _PLAIN_NUM_RE.match(s) or not any(ch.isdigit() for ch in s):
        return None
    body = s.replace(",", "")
    mant = body.split("e")[0]
    decimals = len(mant.split(".")[1]) if "." in mant else None
    try:
        return Fraction(body), decimals
    except (ValueError, ZeroDivisionError):
        return None


@functools.lru_cache(maxsize=65536)
def parse_number(s: str) -> Number | None:
    """Parse a normalised answer as a number, ``None`` when it is not one."""
    if not s or len(s) > 64 or not any(ch.isdigit() for ch in s):
        return None
    s = s.strip()
    pct = False
    if s.endswith("%"):
        pct, s = True, s[:-1].rstrip()
    elif s.endswith(" percent"):
        pct, s = True, s[: -len(" percent")].rstrip()
    unit = None
    m = _DEGREE_RE.search(s)
    if m:
        s, unit = s[: m.start()], "°"
    else:
        m = _UNIT_RE.match(s)
        if m and m.group(2).split()[0].rstrip(".") not in _NOT_UNITS:
            s, unit = m.group(1), m.group(2).rstrip(".")
            if unit.startswith("degree"):
                unit = "°"
    s = s.strip()
    if s.startswith("$") and not pct:  # currency
        s = s[1:].strip()
    plain = _plain_to_fraction(s)
    if plain is not None:
        return Number(plain[0], plain[1], False, pct, unit)
    m = _FRAC_RE.match(s) or _FRAC_SHORT_RE.match(s) or None
    if m is not None:
        sign, a, b = m.groups()
    else:
        m = _SLASH_RE.match(s)
        if m is None:
            return None
        a, b = m.groups()
        sign = ""
    pa, pb = _plain_to_fraction(a), _plain_to_fraction(b)
    if pa is None or pb is None or pb[0] == 0:
        return None
    v = pa[0] / pb[0]
    if sign == "-":
        v = -v
    return Number(v, None, True, pct, unit)


def _round_half_up(x: Fraction, d: int) -> Fraction:
    q = Fraction(10) ** d
    n = x * q
    r = (abs(n) + Fraction(1, 2)).__floor__()
    return Fraction(r if n >= 0 else -r) / q


def _numbers_equal(a: Number, b: Number) -> bool:
    if a.unit and b.unit and a.unit != b.unit:
        return False
    avals = [(a.value, a)] + ([(a.value / 100, None)] if a.percent else [])
    bvals = [(b.value, b)] + ([(b.value / 100, None)] if b.percent else [])
    for x, xa in avals:
        for y, yb in bvals:
            if x == y:
                return True
            if xa is not None and yb is not None:
                if xa.decimals is not None and xa.decimals >= 2 and yb.is_fraction:
                    if _round_half_up(y, xa.decimals) == x:
                        return True
                if yb.decimals is not None and yb.decimals >= 2 and xa.is_fraction:
                    if _round_half_up(x, yb.decimals) == y:
                        return True
    return False


# ---------------------------------------------------------------------------
# multiple choice

_REF_CHOICE_RE = re.compile(r"^\(?([A-Z])\)?[.:)]?$")
_PRED_CHOICE_RE = re.compile(
    r"^(?i:(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)(?:\s+is)?\s*:?\s*)?"
    r"(?:\(([A-Za-z])\)|([A-Z])(?:[.:)]|\s|$))"
)
_BARE_LOWER_RE = re.compile(r"^\(?([a-z])\)?[.:)]?$")


def _choice_letter(raw: str) -> str | None:
    s = raw.strip()
    m = _BARE_LOWER_RE.match(s)
    if m:
        return m.group(1).upper()
    m = _PRED_CHOICE_RE.match(s)
    if m:
        return (m.group(1) or m.group(2)).upper()
    return None


def _strip_choice_prefix(s: str) -> str:
    m = re.match(r"^(?:\(([a-z])\)|([a-z])[.:)])\s+(.+)$", s)
    return m.group(3) if m else s


_ASSIGN_RE = re.compile(r"^[a-z][a-z0-9_]{0,2}\s*=\s*([^=]+)$")
_MATHY_RE = re.compile(r"[\d\\^{}()+\-*/=]")


# ---------------------------------------------------------------------------
# symbolic backends


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _mv_match(pred: str, ref: str) -> bool:
    import math_verify  # noqa: F401
    from math_verify import parse, verify

    timeout = 5 if _in_main_thread() else None
    if timeout is None:  # silence the one-time "timeout disabled" warning
        try:
            import math_verify.grader as _g
            import math_verify.parser as _p

            _p.TIMEOUT_WARNING_SHOWN = True
            _g.TIMEOUT_WARNING_SHOWN = True
        except Exception:
            pass

    def wrap(s: str) -> str:
        return s if ("$" in s or "\\boxed" in s) else f"${s}$"

    gold = parse(wrap(ref), parsing_timeout=timeout)
    target = parse(wrap(pred), parsing_timeout=timeout)
    if not gold or not target:
        return False
    return bool(verify(gold, target, timeout_seconds=timeout))


_SYMPY_FUNCS = {"sqrt", "pi", "sin", "cos", "tan", "log", "ln", "exp"}
_SYMPY_OK_RE = re.compile(r"^[0-9a-z+\-*/().\s]*$")
_INNER_FRAC_RE = re.compile(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_INNER_SQRT_RE = re.compile(r"\\sqrt\s*\{([^{}]*)\}")
_NROOT_RE = re.compile(r"\\sqrt\s*\[([^\[\]{}]*)\]\s*\{([^{}]*)\}")


def _latex_to_sympy_str(s: str) -> str | None:
    if len(s) > 200:
        return None
    s = s.replace("π", "\\pi").replace("×", "*").replace("·", "*").replace("÷", "/").replace("√", "\\sqrt")
    for _ in range(10):
        s2 = _NROOT_RE.sub(r"((\2)**(1/(\1)))", s)
        s2 = _INNER_FRAC_RE.sub(r"((\1)/(\2))", s2)
        s2 = _INNER_SQRT_RE.sub(r"sqrt(\1)", s2)
        if s2 == s:
            break
        s = s2
    s = re.sub(r"\\sqrt\s*(\d)", r"sqrt(\1)", s)
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/").replace("\\pi", " pi ")
    for fn in ("sin", "cos", "tan", "log", "ln", "exp"):
        s = s.replace("\\" + fn, " " + fn)
    s = s.replace("^", "**").replace("{", "(").replace("}", ")")
    if "\\" in s or "," in s or "=" in s:
        return None
    s = s.lower()
    if not _SYMPY_OK_RE.match(s):
        return None
    for word in re.findall(r"[a-z]+", s):
        if len(word) > 1 and word not in _SYMPY_FUNCS:
            return None
    # guards against astronomically large exact powers
    if s.count("**") > 2 or re.search(r"\*\*\s*\(?\s*[\d.]{4,}", s) or re.search(r"\*\*\s*\([^)]*\*\*", s):
        return None
    if re.search(r"\*\*\s*[\w.]+\s*\*\*", s):
        return None
    return s


def _sympy_match(pred: str, ref: str) -> bool:
    a_s, b_s = _latex_to_sympy_str(pred), _latex_to_sympy_str(ref)
    if a_s is None or b_s is None:
        return False
    import sympy
    from sympy.parsing.sympy_parser import (
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    tr = standard_transformations + (implicit_multiplication_application,)
    names = {n: getattr(sympy, n) for n in ("sqrt", "pi", "sin", "cos", "tan", "log", "exp")}
    names["ln"] = sympy.log
    a = parse_expr(a_s, local_dict=dict(names), transformations=tr)
    b = parse_expr(b_s, local_dict=dict(names), transformations=tr)
    d = sympy.simplify(a - b)
    return bool(d == 0)


# ---------------------------------------------------------------------------
# main entry


def gold_answer(ref: str) -> str:
    """The reference answer a data set's answer field holds: after GSM8K's last ``####``
    (``"... 48 + 24 = 72 clips.\\n#### 72"`` -> ``"72"``), inside a LaTeX solution's last
    ``\\boxed{}`` (MATH), else the field as it is."""
    if "####" not in ref and "boxed" not in ref:
        return ref
    return extract_answer(ref) or ref


def answers_match(pred: str | None, ref: str | None, *, backend: str | None = None) -> bool:
    """Whether ``pred`` (a final answer, possibly ``\\boxed``) equals ``ref``.

    ``backend`` overrides the global setting (see :func:`set_backend`).
    Never raises on malformed answers; ``None`` or empty answers never match.
    """
    if pred is None or ref is None:
        return False
    if not isinstance(pred, str):
        pred = str(pred)
    if not isinstance(ref, str):
        ref = str(ref)
    if backend is None or backend == "auto":
        backend = get_backend()
    elif backend not in BACKENDS:
        raise ValueError(f"unknown answer backend {backend!r}; choose one of {BACKENDS}")
    return _match_cached(pred, ref, backend)


@functools.lru_cache(maxsize=65536)
def _match_cached(pred: str, ref: str, backend: str) -> bool:
    p_raw = extract_answer(pred)
    ref = gold_answer(ref)
    r_raw = normalize_answer(ref, lower=False) if ref.strip() else ""
    if not p_raw or not r_raw:
        return False
    p = normalize_answer(p_raw)
    r = r_raw.lower()
    if p == r:
        return True

    # multiple choice: the reference is a single capital letter
    m = _REF_CHOICE_RE.match(r_raw)
    if m:
        return _choice_letter(normalize_answer(p_raw, lower=False)) == m.group(1)

    # "x = 6" against "6"
    if "=" in p and "=" not in r:
        ma = _ASSIGN_RE.match(p)
        if ma:
            p = ma.group(1).strip()
    elif "=" in r and "=" not in p:
        ma = _ASSIGN_RE.match(r)
        if ma:
            r = ma.group(1).strip()
    p = _strip_choice_prefix(p)
    if p == r:
        return True

    pn, rn = parse_number(p), parse_number(r)
    if pn is not None and rn is not None:
        return _numbers_equal(pn, rn)

    if backend == "python":
        return False
    if not (_MATHY_RE.search(p) and _MATHY_RE.search(r)):
        return False
    p_cased = normalize_answer(p_raw, lower=False)
    try:
        if backend == "math_verify":
            return _mv_match(p_cased, r_raw)
        if backend == "sympy":
            return _sympy_match(p_cased, r_raw)
    except Exception:  # backends fail on many strings: that is "no match"
        return False
    return False


def clear_cache() -> None:
    _match_cached.cache_clear()
    parse_number.cache_clear()
