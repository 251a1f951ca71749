"""Rewards and held-out evaluation the default task and the loop share: the reward set of a
run (:func:`build_reward_set`), the dataset columns reward functions get (:func:`columns`) and
greedy held-out accuracy / validity (:func:`evaluate`)."""

from __future__ import annotations

import math

from fastgrpo.rewards import RewardSet, default_reward_set, load_reward_function, reward_set_from_spec
from fastgrpo.rewards.free import FREE, free_reward_set
from fastgrpo.tasks.tokenizer import encode_prompt
from fastgrpo.trainer.config import TrainConfig
from fastgrpo.trainer.rollout import generate

__all__ = ["build_reward_set", "columns", "evaluate"]


def build_reward_set(cfg: TrainConfig, layout=None) -> RewardSet:
    """The reward set: ``--rewards`` when given, else the default StepGRPO set (in ``layout``;
    default R1-VL ``### Step k:``), plus ``--reward module:function[=weight]`` extras.

    ``accuracy``, ``step_rvr`` and ``step_k`` are always computed (weight 0 when the set lacks
    them): the logs and the held-out evaluation read them, whatever the training reward."""
    if layout == FREE:  # no steps: accuracy (+ answer_found, logged), rewards/free.py
        default = free_reward_set()
        base = free_reward_set(cfg.rewards) if cfg.rewards else default
    else:
        default = default_reward_set() if layout is None else default_reward_set(layout=layout)
        base = reward_set_from_spec(cfg.rewards, layout) if cfg.rewards else default
    funcs, weights = dict(base.funcs), dict(base.weights)
    logged = ("accuracy", "answer_found") if layout == FREE else ("accuracy", "step_rvr", "step_k")
    for name in logged:  # always computed: the logs and the held-out eval read them
        if name not in funcs:
            funcs[name], weights[name] = default.funcs[name], 0.0
    for spec in cfg.reward:
        target, _, w = spec.partition("=")
        fn = load_reward_function(target)
        name = target.split(":")[-1]
        while name in funcs:
            name += "_"
        funcs[name], weights[name] = fn, float(w) if w else 1.0
    return RewardSet(funcs, weights)


def columns(rows: list[dict], index: list[int]) -> dict:
    """Every dataset column but the prompt, one value per sample (as TRL passes them); a row
    without a column gets None there ("not applicable" to the reward functions)."""
    names = dict.fromkeys(k for i in index for k in rows[i]
                          if k not in ("prompt", "prompts", "completions"))
    return {k: [rows[i].get(k) for i in index] for k in names}


def evaluate(model, tokenizer, rows: list[dict], reward_set: RewardSet, cfg: TrainConfig,
             encode=None, vision=None, engine=None) -> dict:
    """Greedy held-out accuracy and layout validity (the reward set's accuracy / step_rvr).
    ``encode(tokenizer, prompt) -> ids`` (default ``tasks.tokenizer.encode_prompt``);
    ``vision``: the run's ``trainer.vision.VisionRun`` (the rows' images in the prompts);
    ``engine``: the rollout engine that decodes (``--eval-rollout``, its weights synced; default
    :func:`~fastgrpo.trainer.rollout.generate` on ``model``)."""
    if not rows:
        return {"accuracy": math.nan, "validity": math.nan}
    encode = encode or encode_prompt
    vkw = {}
    if vision is not None:
        prompts, vkw = vision.generate_kwargs(rows, encode, "eval")
    else:
        prompts = [encode(tokenizer, r["prompt"]) for r in rows]
    stop = {"stop": cfg.stop} if cfg.stop else {}
    if engine is None:
        ro = generate(model, tokenizer, prompts, group_size=1, do_sample=False,
                      max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size, **stop, **vkw)
    else:
        ro = engine.generate(prompts, group_size=1, do_sample=False,
                             max_new_tokens=cfg.max_new_tokens, **stop, **vkw)
    res = reward_set([r["prompt"] for r in rows], ro.texts, **columns(rows, list(range(len(rows)))))
    stats = res.stats()
    valid = stats.get("step_rvr") or stats["answer_found"]  # the free layout: an answer was found
    return {"accuracy": stats["accuracy"]["mean"], "validity": valid["mean"]}
