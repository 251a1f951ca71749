"""The routing task's rewards wiring: the reward set of ``--task routing`` (R1-Router's
``step_type`` reward, plus the diagnostics ``routing_accuracy`` and ``answer_recall`` at weight 0
and any ``--reward`` extras) and the offline held-out metrics."""

from __future__ import annotations

import math

from fastgrpo.rewards import RewardSet, load_reward_function
from fastgrpo.rewards.functions import completion_text
from fastgrpo.rewards.retrieval import (answer_recall_reward, answer_step_score, make_step_type_reward,
                                        parse_retrieval_step)

__all__ = ["routing_reward_set", "routing_accuracy_reward", "offline_metrics"]


def routing_reward_set(extras: list[str], similarity=None) -> RewardSet:
    """``step_type`` (weight 1), ``routing_accuracy`` and ``answer_recall`` (weight 0) and the
    ``--reward module:function[=weight]`` ``extras``."""
    funcs = {"step_type": make_step_type_reward(similarity=similarity),
             "routing_accuracy": routing_accuracy_reward, "answer_recall": answer_recall_reward}
    weights = {"step_type": 1.0, "routing_accuracy": 0.0, "answer_recall": 0.0}
    for spec in extras:
        target, _, w = spec.partition("=")
        name = target.split(":")[-1]
        funcs[name] = load_reward_function(target)
        weights[name] = float(w) if w else 1.0
    return RewardSet(funcs, weights)


def routing_accuracy_reward(prompts, completions, step_type=None, reference_kb=None, **kwargs):
    """1 when a retrieval step's ``<ret>`` names the teacher's KB, else 0; ``None`` for other rows
    (a diagnostic, weight 0 in the routing reward set)."""
    n = len(completions)
    types = step_type if step_type is not None else [None] * n
    refs = reference_kb if reference_kb is not None else [None] * n
    out = []
    for c, st, ref in zip(completions, types, refs):
        if st != "retrieve" or ref is None:
            out.append(None)
            continue
        parsed = parse_retrieval_step(completion_text(c).lower())
        out.append(float(parsed is not None and parsed[2] == str(ref).strip().lower()))
    return out


def offline_metrics(rows: list[dict], texts: list[str]) -> dict:
    """Routing accuracy over the retrieve rows, mean answer-step reward over the answer rows."""
    acc = routing_accuracy_reward(None, [t for t in texts], [r.get("step_type") for r in rows],
                                  [r.get("reference_kb") for r in rows])
    ret = [a for a in acc if a is not None]
    ans = [answer_step_score(t, r["answer"]) for t, r in zip(texts, rows) if r.get("step_type") == "answer"]
    return {"routing_accuracy": sum(ret) / len(ret) if ret else math.nan,
            "answer_recall": sum(ans) / len(ans) if ans else math.nan,
            "retrieve_rows": len(ret), "answer_rows": len(ans)}
