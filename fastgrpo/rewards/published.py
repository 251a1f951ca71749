"""StepRAR and StepRVR exactly as R1-VL's published training code computes them.

The rest of :mod:`fastgrpo.rewards` implements the paper (a layout-aware parser,
case-insensitive headers, soft key-step matching, the answer section only).  The
two functions here re-implement, rule for rule, ``accuracy_reward`` (StepRAR in its
code form) and ``validity_reward`` (StepRVR) of ``src/r1-vl/src/open_r1/grpo.py`` in
github.com/jingyi0000/R1-VL (read at commit 3c6b392bfd3d1b54080fe4be5dfd764ab7fa711c;
8723d29c0efeca11bf2c58b131aefe31091be00e has the same functions), for runs that
must score completions as the published run did:

* :func:`published_step_rar_reward` -- ``1[correct] + 0.1*k``;
* :func:`published_step_rvr_reward` -- ``1`` if complete and logical, else ``0``.

They are also what ``step_rar_reward(form="code", soft=False)`` and
``step_rvr_reward(form="code")`` compute (:mod:`.functions`).

Every header is the literal R1-VL spelling, case-sensitive, with single spaces:
``### Image Description:``, ``### Rationales:``, ``### Step N:``,
``### The final answer is:``.  The rules are listed in each function's docstring;
``tests/test_rewards_published.py`` checks them against a transcription of the
published functions on thousands of generated completions.

Inputs follow fastgrpo's conventions: the reference answer is the ``answer``
column (the published code calls it ``solution``), a completion is anything
:func:`~fastgrpo.rewards.functions.completion_text` reads (the published code reads
``completion[0]["content"]``).  Where the published code raises instead of
scoring -- a sample without key steps, a non-string alternative -- these functions
score ``k = 0`` / use ``str(alternative)``; a sample without a reference answer
gives ``None`` (not applicable) as everywhere in fastgrpo.

Answer correctness needs ``math-verify`` (as the published code does); its results
depend on the installed math-verify version (the published run used an earlier
one).
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Any, Sequence

from .completions import _col, completion_text
from .steps import coerce_key_steps

__all__ = [
    "published_step_rar_reward",
    "published_step_rvr_reward",
    "published_valid",
    "published_correct",
    "published_answer_text",
    "published_step_text",
    "published_key_step_fraction",
]

ALPHA = 0.1  # fixed in the published code

DESCRIPTION = "### Image Description:"
RATIONALES = "### Rationales:"
STEP_1 = "### Step 1:"
ANSWER = "### The final answer is:"
REQUIRED = (DESCRIPTION, RATIONALES, STEP_1, ANSWER)

_STEP_HEADER_RE = re.compile(r"### Step (\d+):")
# a step's body: after the header and any whitespace, lazily up to the next
# "\n###" or the end of the text (re.S: the body spans lines)
_STEP_BODY_RE = re.compile(r"### Step \d+:\s*(.*?)(?=\n###|\Z)", re.S)
# the answer of a text: after the first header and any whitespace, to the end of that line
_ANSWER_LINE_RE = re.compile(re.escape(ANSWER) + r"\s*(.*)")


# ---------------------------------------------------------------------------
# StepRVR


def published_valid(text: str) -> bool:
    """The published StepRVR test (``validity_reward``) on one completion text.

    1. Complete: each of ``### Image Description:``, ``### Rationales:``,
       ``### Step 1:`` and ``### The final answer is:`` occurs in the text as a
       plain, case-sensitive substring -- anywhere: mid-line, or inside
       ``#### Step 1:``; ``### Step 10:`` is not ``### Step 1:``.
    2. Step headers are all matches of ``### Step (\\d+):`` (``\\d`` any Unicode
       digit, ``01`` is 1), wherever they are.
    3. Unless the stripped text *ends* with ``### The final answer is:`` (an empty
       answer at the very end skips this rule), the *first* answer header must
       start at or after the end of the last step header.
    4. The step numbers, in order of appearance, are exactly ``1, 2, ..., n``.

    Nothing else is checked: not the order of description, rationales and steps,
    not text between or around the sections, not whether the answer is empty.
    """
    if not all(h in text for h in REQUIRED):
        return False
    steps = list(_STEP_HEADER_RE.finditer(text))  # not empty: "### Step 1:" is there
    if not text.strip().endswith(ANSWER) and text.find(ANSWER) < steps[-1].end():
        return False
    return [int(m.group(1)) for m in steps] == list(range(1, len(steps) + 1))


def published_step_rvr_reward(prompts: Sequence | None, completions: Sequence, **kwargs: Any) -> list[float | None]:
    """StepRVR as published: 1.0 when :func:`published_valid`, else 0.0."""
    return [1.0 if published_valid(completion_text(c)) else 0.0 for c in completions]


# ---------------------------------------------------------------------------
# StepRAR


def published_step_text(text: str) -> str:
    """The text the published code matches key steps in, lower-cased.

    Scanning left to right, each ``### Step \\d+:`` header starts a body that
    skips leading whitespace (newlines too) and runs lazily to the next ``\\n###``
    (any ``###`` header at a line start, ``####`` too) or the end of the text.  A
    header that does not start a line ends no step, and a step header inside a
    body is part of that body, not a step of its own; an empty step right before
    a header on the next line takes that header (its newline was skipped as
    leading whitespace) and what follows as its body.  Bodies are joined with
    one space (trailing whitespace kept), then lower-cased.
    """
    return " ".join(_STEP_BODY_RE.findall(text)).lower()


def _groups(key_steps: Any) -> list[list[str]]:
    """Key-step groups from fastgrpo's list of groups or the published ``{"Steps": [...]}``."""
    if isinstance(key_steps, dict):
        key_steps = key_steps.get("Steps", [])
    return coerce_key_steps(key_steps) or []


def published_key_step_fraction(text: str, key_steps: Any) -> float:
    """The published ``k``: the fraction of groups with an alternative ``alt`` for
    which ``alt.lower()`` is a substring of :func:`published_step_text` -- a plain
    substring test, so an empty alternative always matches (even without steps)
    and an empty group never does.  0.0 without groups.
    """
    groups = _groups(key_steps)
    if not groups:
        return 0.0
    hay = published_step_text(text)
    matched = sum(1 for g in groups if any(alt.lower() in hay for alt in g))
    return matched / len(groups)


def published_answer_text(text: str) -> str:
    """The answer the published exact-match test reads: what follows the *first*
    ``### The final answer is:`` (case-sensitive), after any whitespace including
    newlines, to the end of that line, stripped; the whole text stripped when the
    header is absent.  The same rule is applied to the reference."""
    m = _ANSWER_LINE_RE.search(text)
    return m.group(1).strip() if m else text.strip()


@functools.lru_cache(maxsize=16384)
def published_correct(text: str, reference: str) -> bool:
    """The published answer test, two tries:

    1. ``math_verify.verify(parse(text), parse(reference))`` is true -- ``parse``
       reads the *whole* completion, not its answer section (with no answer
       header, a last ``= 2`` in a step can be the answer); math-verify's default
       extraction, and the completion's parse passed as ``gold``, as published.
       Any exception means "not shown correct" (the published code swallows it).
       Timeouts are math-verify's defaults on the main thread and off on others
       (math-verify's signal-based timeout raises there; TRL scores on the main
       thread, so the published run never hit that).
    2. Else exact, case-sensitive equality of :func:`published_answer_text` of
       the completion and of the reference.
    """
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise ImportError(
            "the published-code StepRAR checks answers with math-verify: pip install 'math-verify>=0.9'"
        ) from e
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    if timeout is None:  # silence math-verify's one-time "timeout disabled" warning
        import math_verify.grader as _g
        import math_verify.parser as _p

        _p.TIMEOUT_WARNING_SHOWN = _g.TIMEOUT_WARNING_SHOWN = True
    try:
        if verify(parse(text, parsing_timeout=timeout), parse(reference, parsing_timeout=timeout), timeout_seconds=timeout):
            return True
    except Exception:
        pass
    return published_answer_text(text) == published_answer_text(reference)


def published_step_rar_reward(
    prompts: Sequence | None,
    completions: Sequence,
    answer: Sequence | None = None,
    key_steps: Sequence | None = None,
    *,
    alpha: float = ALPHA,
    **kwargs: Any,
) -> list[float | None]:
    """StepRAR as published: ``1[correct] + 0.1*k`` (the bonus whatever the answer;
    ``alpha`` replaces the published 0.1 when given).

    ``correct`` is :func:`published_correct` against the sample's ``answer``;
    ``k`` is :func:`published_key_step_fraction` of its ``key_steps`` (0 when the
    column or the sample's value is missing).  ``None`` for a sample without a
    reference answer.
    """
    n = len(completions)
    out: list[float | None] = []
    for i in range(n):
        ref = _col(answer, i, n, "answer")
        ks = _col(key_steps, i, n, "key_steps")
        if ref is None:
            out.append(None)
            continue
        text = completion_text(completions[i])
        r = 1.0 if published_correct(text, str(ref)) else 0.0
        if ks is not None:
            r += published_key_step_fraction(text, ks) * alpha
        out.append(r)
    return out


def clear_cache() -> None:
    published_correct.cache_clear()
