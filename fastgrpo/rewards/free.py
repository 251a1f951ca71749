"""The free layout: no sections, the final answer read from the common ways of stating it.

A pretrained chat model answers in free text; before any warm-up it writes neither R1-VL's
``### Step k:`` headers nor ``<think>``/``<answer>`` tags.  :func:`free_answer` finds its
final answer, in this order:

1. after GSM8K's last ``#### `` (``... = 72 clips.\n#### 72``);
2. the last ``\\boxed{...}``;
3. after the last "the (final) answer is" / "answer:" (its first number when it has one:
   ``The answer is 42 apples.`` -> ``42``);
4. the last number in the text (``16 - 8 = 8 apples`` -> ``8``).

The free layout has no steps, so StepRAR and StepRVR do not apply: its reward set
(:func:`free_reward_set`) is the accuracy (weight 1) and, logged with weight 0, whether an
answer was found at all (``answer_found``, the run's "validity").
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from .answer import _last_boxed, answers_match
from .functions import completion_text

__all__ = ["FREE", "free_answer", "free_accuracy_reward", "answer_found_reward", "free_reward_set",
           "FREE_BUILTINS"]

FREE = "free"  # the layout's name; the free layout is not a section Layout
_GSM8K_RE = re.compile(r"(?<!#)####(?!#)\s*([^\n]*)")
_PHRASE_RE = re.compile(r"(?:the\s+)?(?:final\s+)?answer\s*(?:is|:|=)\s*:?\s*([^\n]*)", re.I)
_NUMBER_RE = re.compile(r"[-+]?\$?\d(?:[\d,]*\d)?(?:\.\d+)?(?:/\d+)?%?")


def _first_number(s: str) -> str | None:
    m = _NUMBER_RE.search(s)
    return None if m is None else m.group(0).replace("$", "")


def free_answer(text: str | None) -> str | None:
    """The final answer of a free-text completion (see the module doc), ``None`` if none."""
    if not text:
        return None
    ms = list(_GSM8K_RE.finditer(text))
    if ms and ms[-1].group(1).strip():
        return ms[-1].group(1).strip().rstrip(".")
    if "\\" in text:
        boxed = _last_boxed(text)
        if boxed is not None and boxed.strip():
            return boxed.strip()
    ms = list(_PHRASE_RE.finditer(text))
    if ms and ms[-1].group(1).strip():
        tail = ms[-1].group(1).strip()
        return _first_number(tail) or tail.rstrip(".").strip()
    nums = _NUMBER_RE.findall(text)
    return nums[-1].replace("$", "") if nums else None


def free_accuracy_reward(prompts: Sequence | None, completions: Sequence,
                         answer: Sequence | None = None, **kwargs: Any) -> list[float | None]:
    """1.0 when :func:`free_answer` of the completion equals the gold answer (GSM8K's
    ``#### 42`` and ``\\boxed{}`` gold answers read as such); ``None`` without a reference."""
    out: list[float | None] = []
    for i, c in enumerate(completions):
        ref = None if answer is None else answer[i]
        if ref is None:
            out.append(None)
            continue
        pred = free_answer(completion_text(c))
        out.append(1.0 if pred is not None and answers_match(pred, str(ref)) else 0.0)
    return out


def answer_found_reward(prompts: Sequence | None, completions: Sequence, **kwargs: Any) -> list[float]:
    """1.0 when the completion states a final answer :func:`free_answer` can read."""
    return [float(free_answer(completion_text(c)) is not None) for c in completions]


free_accuracy_reward.__name__ = "accuracy"
FREE_BUILTINS = {"accuracy": free_accuracy_reward, "answer_found": answer_found_reward}


def free_reward_set(spec: str = ""):
    """The free layout's reward set: ``accuracy`` (1) + ``answer_found`` (0, logging) by
    default; or ``spec`` (``--rewards``) of ``accuracy``, ``answer_found`` and
    ``module:function`` entries.  Step rewards are refused: the free layout has no steps."""
    from .rewardset import RewardError, RewardSet, _spec_weight, reward_set_from_spec
    if not spec:
        return RewardSet(dict(FREE_BUILTINS), {"accuracy": 1.0, "answer_found": 0.0})
    funcs, weights = {}, {}
    custom = []
    for e in spec.split(","):
        name, eq, w = e.partition("=")
        name = name.strip()
        if name in FREE_BUILTINS:
            funcs[name] = FREE_BUILTINS[name]
            weights[name] = _spec_weight(w, e, spec) if eq else 1.0
        elif ":" in name:
            custom.append(e)
        else:
            raise RewardError(f"reward {name!r} needs a layout with steps (--layout r1vl or tags); "
                              f"the free layout has none: use accuracy, answer_found or "
                              f"module:function", function=name)
    if custom:
        extra = reward_set_from_spec(",".join(custom))
        funcs.update(extra.funcs)
        weights.update(extra.weights)
    return RewardSet(funcs, weights)
