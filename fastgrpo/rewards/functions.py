"""StepGRPO reward functions with the TRL signature.

Every function here is ``f(prompts, completions, **columns) -> list[float | None]``:
dataset columns arrive as keyword arguments (one value per completion), and
``None`` means "not applicable to this sample" (excluded from the function's
statistics, counted as 0 in a weighted total).  They move unchanged between
fastgrpo's :class:`~fastgrpo.rewards.rewardset.RewardSet` and TRL's
``GRPOTrainer(reward_funcs=[...])``.

Completions may be plain strings or TRL conversational completions
(``[{"role": "assistant", "content": "..."}]``, content possibly a list of
``{"type": "text", "text": ...}`` parts).

StepGRPO's reward is ``r = r_acc + r_val`` where ``r_acc`` (StepRAR) already
contains the answer accuracy:

* :func:`step_rar_reward` -- paper form (default): ``1 + alpha*k`` if the final
  answer is correct, ``alpha*k`` if an answer is present but wrong, ``0``
  without an answer; code form (``form="code"``): ``1[correct] + alpha*k``.
  The paper form and the soft code form read fastgrpo's parser; ``form="code",
  soft=False`` is StepRAR exactly as R1-VL's published code computes it
  (:mod:`.published`, every rule documented there; builtin ``step_rar_code``).
* :func:`step_rvr_reward` -- ``1`` if complete and logical, else ``0``;
  ``form="code"``: exactly R1-VL's published ``validity_reward`` (builtin
  ``step_rvr_code``).
* :func:`accuracy_reward` -- ``1[correct]`` (for logging; already in StepRAR).
* :func:`step_k` -- the matched key-step fraction ``k`` (for logging).

Use the ``make_*`` factories for non-default options: they return named
functions (TRL logs ``__name__``; a :func:`functools.partial` has none).
"""

from __future__ import annotations

from typing import Any, Sequence

from .answer import answers_match, extract_answer
from .completions import _col, completion_text
from .layout import R1VL_LAYOUT, R1VL_MULTIMODAL_LAYOUT, SECTION_RANK, Layout, ParsedSolution, parse
from .published import published_step_rar_reward, published_step_rvr_reward
from .steps import key_step_fraction

__all__ = [
    "completion_text",
    "accuracy_reward",
    "step_rar_reward",
    "step_rvr_reward",
    "step_k",
    "step_validity",
    "final_answer",
    "make_accuracy_reward",
    "make_step_rar_reward",
    "make_step_rvr_reward",
    "make_step_k",
    "FORMS",
]

FORMS = ("paper", "code")


def final_answer(parsed: ParsedSolution) -> str | None:
    """The final answer of a parsed completion, ``None`` when missing/empty."""
    if parsed.answer is None:
        return None
    return extract_answer(parsed.answer)


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"unknown StepRAR form {form!r}; choose one of {FORMS}")


def _check_published_layout(layout: Layout) -> None:
    """The published code reads R1-VL's literal ``###`` headers, whatever the layout says."""
    if layout not in (R1VL_LAYOUT, R1VL_MULTIMODAL_LAYOUT):
        raise ValueError(f"the published-code form reads R1-VL's '###' headers only; layout "
                         f"{layout.name!r} is not an R1-VL layout (use the paper form, or soft=True)")


# ---------------------------------------------------------------------------
# accuracy


def accuracy_reward(
    prompts: Sequence | None,
    completions: Sequence,
    answer: Sequence | None = None,
    *,
    layout: Layout = R1VL_LAYOUT,
    backend: str | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 when the final answer (layout's answer section) equals ``answer``.

    ``None`` for a sample without a reference answer.
    """
    n = len(completions)
    out: list[float | None] = []
    for i in range(n):
        ref = _col(answer, i, n, "answer")
        if ref is None:
            out.append(None)
            continue
        pred = final_answer(parse(completion_text(completions[i]), layout))
        out.append(1.0 if pred is not None and answers_match(pred, str(ref), backend=backend) else 0.0)
    return out


# ---------------------------------------------------------------------------
# StepRAR


def step_rar_reward(
    prompts: Sequence | None,
    completions: Sequence,
    answer: Sequence | None = None,
    key_steps: Sequence | None = None,
    *,
    alpha: float = 0.1,
    form: str = "paper",
    soft: bool = True,
    layout: Layout = R1VL_LAYOUT,
    backend: str | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """StepRAR, the step-wise reasoning accuracy reward.

    ``k`` = matched key-step groups / groups over the text of all steps;
    0 when the sample has no groups -- ``key_steps`` an empty list, ``None``,
    or the column missing (then StepRAR is the plain accuracy reward).

    * ``form="paper"``: ``1 + alpha*k`` correct, ``alpha*k`` wrong answer,
      ``0`` no answer.
    * ``form="code"``: ``1[correct] + alpha*k`` (bonus even without answer).
    * ``form="code", soft=False``: R1-VL's published ``accuracy_reward`` rule for
      rule (:func:`~fastgrpo.rewards.published.published_step_rar_reward`:
      case-sensitive literal headers, step bodies up to the next ``\n###``, a
      plain substring test, math-verify on the whole completion, then an exact
      match of the first answer line); ``layout`` must be an R1-VL layout.

    ``None`` only for a sample without a reference ``answer`` (the column
    missing, or ``None`` for that sample).
    """
    _check_form(form)
    if form == "code" and not soft:
        _check_published_layout(layout)
        return published_step_rar_reward(prompts, completions, answer, key_steps, alpha=alpha)
    n = len(completions)
    out: list[float | None] = []
    for i in range(n):
        ref = _col(answer, i, n, "answer")
        ks = _col(key_steps, i, n, "key_steps")
        if ref is None:
            out.append(None)
            continue
        parsed = parse(completion_text(completions[i]), layout)
        pred = final_answer(parsed)
        if pred is None and form == "paper":  # no answer: 0, whatever the steps
            out.append(0.0)
            continue
        k = key_step_fraction(parsed.step_text, ks, soft=soft) if (ks is not None and parsed.steps) else 0.0
        correct = pred is not None and answers_match(pred, str(ref), backend=backend)
        if form == "paper":
            r = 1.0 + alpha * k if correct else alpha * k
        else:
            r = (1.0 if correct else 0.0) + alpha * k
        out.append(r)
    return out


def step_k(
    prompts: Sequence | None,
    completions: Sequence,
    key_steps: Sequence | None = None,
    *,
    soft: bool = True,
    layout: Layout = R1VL_LAYOUT,
    **kwargs: Any,
) -> list[float | None]:
    """The raw matched key-step fraction ``k`` in [0, 1] (for logging);
    ``None`` for a sample without ``key_steps`` (so it does not pull the
    logged mean down)."""
    n = len(completions)
    out: list[float | None] = []
    for i in range(n):
        ks = _col(key_steps, i, n, "key_steps")
        if ks is None:
            out.append(None)
            continue
        parsed = parse(completion_text(completions[i]), layout)
        out.append(key_step_fraction(parsed.step_text, ks, soft=soft) if parsed.steps else 0.0)
    return out


# ---------------------------------------------------------------------------
# StepRVR


def step_validity(completion: Any, layout: Layout = R1VL_LAYOUT) -> tuple[bool, bool]:
    """``(complete, logical)`` for one completion.

    complete: the required headers are present -- description (when
    ``layout.require_description``), rationales (when the layout has one and
    ``require_rationales``), ``Step 1`` and the final-answer header.

    logical: steps are numbered 1..n in order, and the sections appear in the
    order description -> rationales -> steps -> answer (hence the final answer
    after the last step).
    """
    p = completion if isinstance(completion, ParsedSolution) else parse(completion_text(completion), layout)
    nums = p.step_numbers
    complete = (
        (not layout.require_description or layout.description is None or p.description is not None)
        and (not layout.require_rationales or layout.rationales is None or p.rationales is not None)
        and (1 in nums)
        and p.answer is not None
    )
    logical = bool(nums) and nums == list(range(1, len(nums) + 1))
    if logical:
        last = -1
        for kind in p.section_order:
            r = SECTION_RANK[kind]
            if r < last:
                logical = False
                break
            last = r
    return complete, logical


def step_rvr_reward(
    prompts: Sequence | None,
    completions: Sequence,
    *,
    layout: Layout = R1VL_LAYOUT,
    form: str = "paper",
    **kwargs: Any,
) -> list[float | None]:
    """StepRVR: 1.0 if the completion is complete and logical, else 0.0.

    ``form="paper"``: completeness and logic on fastgrpo's parser (:func:`step_validity`).
    ``form="code"``: R1-VL's published ``validity_reward`` rule for rule
    (:func:`~fastgrpo.rewards.published.published_valid`: the four literal headers,
    the description included, anywhere in the text; steps numbered 1..n; the first
    answer header after the last step header); ``layout`` must be an R1-VL layout.
    """
    _check_form(form)
    if form == "code":
        _check_published_layout(layout)
        return published_step_rvr_reward(prompts, completions)
    out: list[float | None] = []
    for c in completions:
        complete, logical = step_validity(parse(completion_text(c), layout), layout)
        out.append(1.0 if (complete and logical) else 0.0)
    return out


# ---------------------------------------------------------------------------
# factories


def _named(fn, name: str, like):
    """``fn`` under ``name`` (TRL logs ``__name__``) with ``like``'s docstring."""
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = like.__doc__
    return fn


def make_accuracy_reward(*, layout: Layout = R1VL_LAYOUT, backend: str | None = None, name: str = "accuracy"):
    def accuracy(prompts, completions, answer=None, **kwargs):
        return accuracy_reward(prompts, completions, answer, layout=layout, backend=backend, **kwargs)

    return _named(accuracy, name, accuracy_reward)


def make_step_rar_reward(
    *,
    alpha: float = 0.1,
    form: str = "paper",
    soft: bool = True,
    layout: Layout = R1VL_LAYOUT,
    backend: str | None = None,
    name: str = "step_rar",
):
    _check_form(form)

    def step_rar(prompts, completions, answer=None, key_steps=None, **kwargs):
        return step_rar_reward(
            prompts, completions, answer, key_steps, alpha=alpha, form=form, soft=soft, layout=layout, backend=backend, **kwargs
        )

    return _named(step_rar, name, step_rar_reward)


def make_step_rvr_reward(*, layout: Layout = R1VL_LAYOUT, form: str = "paper", name: str = "step_rvr"):
    _check_form(form)

    def step_rvr(prompts, completions, **kwargs):
        return step_rvr_reward(prompts, completions, layout=layout, form=form, **kwargs)

    return _named(step_rvr, name, step_rvr_reward)


def make_step_k(*, soft: bool = True, layout: Layout = R1VL_LAYOUT, name: str = "step_k"):
    def _step_k(prompts, completions, key_steps=None, **kwargs):
        return step_k(prompts, completions, key_steps, soft=soft, layout=layout, **kwargs)

    return _named(_step_k, name, step_k)
