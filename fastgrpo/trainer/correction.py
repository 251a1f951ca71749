"""Truncated importance sampling (TIS) for rollouts from another engine (``--rollout-is``).

The engine (vLLM: other kernels, bf16, its own copy of the weights) samples from a
distribution slightly different from the trainer's policy.  As TRL
(``vllm_importance_sampling_correction``) and verl (``rollout_is``) do, each completion token's
policy loss is weighted by

    w_t = min(exp(logp_trainer_t - logp_engine_t), cap)

with ``logp_trainer`` the trainer's log-prob of the token before the update (no gradient).
The weight is positive, so ``w * -min(r A, clip(r) A) = -min(r (w A), clip(r) (w A))``: it is
applied by scaling the micro-batch's per-token advantages; the KL and entropy terms stay
unweighted (as in TRL).  The mismatch ``|logp_engine - logp_trainer|`` is logged every step.
"""

from __future__ import annotations

import math

import torch

from fastgrpo.trainer import distributed as dist_
from fastgrpo.trainer.packing import MicroBatch
from fastgrpo.trainer.sample import Sample

__all__ = ["engine_logp", "apply_tis"]


def engine_logp(mb: MicroBatch, samples: list[Sample]) -> torch.Tensor:
    """The engine's log-probs laid out like ``mb.targets`` (``[L]``, NaN off completions):
    position ``t`` of a packed sequence holds the log-prob of its token ``t + 1``."""
    out = torch.full((mb.num_tokens,), math.nan, dtype=torch.float64)
    cu = mb.cu_seqlens.tolist()
    for k, i in enumerate(mb.seq_index.tolist()):
        s = samples[i]
        start = cu[k] + len(s.prompt_ids) - 1
        out[start:start + len(s.completion_ids)] = torch.tensor(s.sampling_logp, dtype=torch.float64)
    return out


def apply_tis(batches: list[MicroBatch], samples: list[Sample], trainer_logp: list[torch.Tensor],
              cap: float) -> dict:
    """Scale each micro-batch's advantages by the truncated importance weights (in place);
    returns the step's mismatch and weight statistics over every rank's loss tokens."""
    n = capped = 0
    diff_sum = w_sum = 0.0
    diff_max = 0.0
    for mb, lp in zip(batches, trainer_logp):
        loss = (mb.targets != mb.ignore_index).cpu()
        if not bool(loss.any()):
            continue
        eng = engine_logp(mb, samples)[loss]
        ours = lp.detach().double().cpu()[loss]
        w = torch.exp(ours - eng).clamp(max=cap)
        scale = torch.ones(mb.num_tokens, dtype=torch.float64)
        scale[loss] = w
        mb.advantages = (mb.advantages.double() * scale.to(mb.advantages.device)).float()
        diff = (eng - ours).abs()
        n += int(loss.sum())
        capped += int((w >= cap).sum())
        diff_sum, w_sum = diff_sum + float(diff.sum()), w_sum + float(w.sum())
        diff_max = max(diff_max, float(diff.max()))
    parts = dist_.all_gather_objects((n, capped, diff_sum, w_sum, diff_max))
    n, capped = sum(p[0] for p in parts), sum(p[1] for p in parts)
    total = max(n, 1)
    return {"rollout/logp_diff_mean": sum(p[2] for p in parts) / total,
            "rollout/logp_diff_max": max(p[4] for p in parts),
            "rollout/is_weight_mean": sum(p[3] for p in parts) / total if n else 1.0,
            "rollout/is_capped_frac": capped / total}
