"""The learning step: packed micro-batches -> fused loss -> one optimizer step per PPO epoch.

The loss is normalised over the whole batch (``num_items_in_batch``, all ranks), so the
gradient does not depend on how the batch was packed or split over ranks.  The
``[tokens x vocab]`` logits never exist: hidden states go straight into the fused kernel
together with the lm_head weight.
"""

from __future__ import annotations

import math

import torch

from fastgrpo.ops.logprobs import fused_logprobs
from fastgrpo.ops.loss import NORMALIZERS, grpo_loss
from fastgrpo.trainer import distributed as dist_
from fastgrpo.trainer.checkpoint import NonFiniteLossError, check_finite_loss
from fastgrpo.trainer.config import TrainConfig
from fastgrpo.trainer.packing import MicroBatch
from fastgrpo.trainer.policy import as_policy, policy_hidden_states, sync_gradients

__all__ = ["optimize", "batch_logprobs", "num_items", "lr_at", "NO_UPDATE_METRICS"]

# the metrics of a step without a loss (every group had equal rewards)
NO_UPDATE_METRICS = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_ratio/low_mean": 0.0,
                     "clip_ratio/high_mean": 0.0, "clip_ratio/region_mean": 0.0, "ratio/min": 1.0,
                     "ratio/mean": 1.0, "ratio/max": 1.0, "logp": 0.0, "grad_norm": 0.0}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def batch_logprobs(model, batches: list[MicroBatch], cfg: TrainConfig) -> list[torch.Tensor]:
    """Per-token log-probs ``[L]`` of each micro-batch (forward only, fused kernel)."""
    out = []
    for mb in batches:
        hidden, weight = policy_hidden_states(model, mb, bf16=cfg.bf16, cpu_bf16=cfg.cpu_bf16)
        out.append(fused_logprobs(hidden, weight, mb.targets, temperature=cfg.temperature,
                                  ignore_index=mb.ignore_index, backend=cfg.backend))
    return out


def _ref_logprobs(ref_model, policy, batches: list[MicroBatch], cfg: TrainConfig) -> list[torch.Tensor]:
    """The reference log-probs: ``ref_model``'s, or, when ``ref_model`` is the peft model whose
    adapters sit in the policy (LoRA), the policy's own with the adapters disabled (no copy)."""
    if hasattr(ref_model, "disable_adapter"):
        with ref_model.disable_adapter():
            return batch_logprobs(policy, batches, cfg)
    return batch_logprobs(ref_model, batches, cfg)


def num_items(batches: list[MicroBatch], cfg: TrainConfig) -> float:
    """The loss normalizer of the whole step (``grpo_loss``'s ``num_items_in_batch``), by
    ``ops.loss.NORMALIZERS[loss_type]``: sequences of the global batch (grpo, sapo, luspo),
    those x ``max_new_tokens`` (dr_grpo), tokens of the global batch (dapo, cispo, vespo), or
    tokens of this rank's batch x the number of ranks (bnpo: each rank takes its own token
    mean and the ranks are averaged, TRL's bnpo under data parallelism; dapo in one process).
    """
    kind = NORMALIZERS[cfg.loss_type]
    if kind == "local_tokens":
        return float(sum(mb.num_loss_tokens for mb in batches) * dist_.loss_scale())
    if kind == "tokens":
        return float(dist_.global_sum(sum(mb.num_loss_tokens for mb in batches)))
    n_seq = float(dist_.global_sum(sum(mb.num_sequences for mb in batches)))
    return n_seq * cfg.max_new_tokens if kind == "sequences_x_length" else n_seq


def _grad_norm(params: list[torch.Tensor], cfg: TrainConfig) -> float:
    if cfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    elif any(type(p).__name__ == "DTensor" for p in params):
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    else:
        norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor norm
        norm = norm.full_tensor()
    return float(norm)


class _MetricSums:
    """Token-weighted sums of the loss metrics over micro-batches, reduced over ranks."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weight = self.loss = 0.0
        self.rmin, self.rmax = math.inf, -math.inf

    def add(self, loss: float, m: dict, n_tokens: int) -> None:
        self.loss += loss
        self.weight += n_tokens
        for k, v in m.items():
            if k not in ("ratio/min", "ratio/max", "num_tokens"):
                self.sums[k] = self.sums.get(k, 0.0) + float(v) * n_tokens
        if n_tokens > 0:
            self.rmin = min(self.rmin, float(m.get("ratio/min", 1.0)))
            self.rmax = max(self.rmax, float(m.get("ratio/max", 1.0)))

    def reduce(self, epochs: int, grad_norm: float) -> dict:
        parts = dist_.all_gather_objects(vars(self))
        weight = max(sum(p["weight"] for p in parts), 1.0)
        out = {k: sum(p["sums"].get(k, 0.0) for p in parts) / weight for k in parts[0]["sums"]}
        out.setdefault("kl", 0.0)
        rmin, rmax = min(p["rmin"] for p in parts), max(p["rmax"] for p in parts)
        out["ratio/min"] = rmin if math.isfinite(rmin) else 1.0
        out["ratio/max"] = rmax if math.isfinite(rmax) else 1.0
        out["loss"] = sum(p["loss"] for p in parts) / epochs
        out["grad_norm"] = grad_norm
        return out


def _loss(policy, mb: MicroBatch, cfg: TrainConfig, normalizer: float):
    hidden, weight = policy_hidden_states(policy, mb, bf16=cfg.bf16, cpu_bf16=cfg.cpu_bf16)
    return grpo_loss(hidden, weight, mb.targets, mb.advantages, cu_seqlens=mb.cu_seqlens,
                     old_logp=mb.extras.get("old_logp"), ref_logp=mb.extras.get("ref_logp"),
                     num_items_in_batch=normalizer, config=cfg.loss_config(),
                     ignore_index=mb.ignore_index)


def optimize(model, optimizer, batches: list[MicroBatch], cfg: TrainConfig, ref_model=None, *,
             step: int = 0) -> dict:
    """Old/ref log-probs, then ``ppo_epochs`` passes of accumulate-over-micro-batches + one
    optimizer step each.  Returns token-weighted means of the loss metrics (over all ranks).

    ``model``: a causal LM or the policy from ``policy.wrap_model`` (then every rank calls this
    with the same number of micro-batches).  ``ref_model`` (used when ``cfg.beta > 0``): a
    frozen copy of the initial model, or for LoRA the peft model (``policy.apply_lora``) whose
    adapters sit in ``model``: the reference is then ``model`` with its adapters disabled.
    ``step`` (1-based) names the step in the
    ``NonFiniteLossError`` raised, before ``optimizer.step()``, when a micro-batch loss or the
    gradient norm is NaN/inf (on any rank); its ``params_updated`` tells whether an earlier PPO
    epoch of this step had already changed the parameters.
    """
    policy = as_policy(model)
    if cfg.beta > 0 and ref_model is not None:
        for mb, lp in zip(batches, _ref_logprobs(ref_model, policy, batches, cfg)):
            mb.extras["ref_logp"] = lp
    if cfg.ppo_epochs > 1:
        for mb, lp in zip(batches, batch_logprobs(policy, batches, cfg)):
            mb.extras["old_logp"] = lp
    normalizer = num_items(batches, cfg)
    scale = dist_.loss_scale()  # DDP/FSDP average -> sum over ranks (1.0 alone)
    params = [p for p in policy.parameters() if p.requires_grad]
    policy.train()
    sums, grad_norm = _MetricSums(), 0.0
    for epoch in range(cfg.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        bad: NonFiniteLossError | None = None
        for i, mb in enumerate(batches):
            with sync_gradients(policy, last=i == len(batches) - 1):
                loss, m = _loss(policy, mb, cfg, normalizer)
                (loss * scale).backward()
            value = loss.item()
            if bad is None and not math.isfinite(value):
                try:
                    check_finite_loss(value, step)
                except NonFiniteLossError as e:
                    bad = e
                if not dist_.is_distributed():
                    break  # alone: stop at once; with ranks, keep the collectives in step
            sums.add(value, m, mb.num_loss_tokens)
        if dist_.is_distributed() and dist_.global_sum(0.0 if bad is None else 1.0) > 0 and bad is None:
            bad = NonFiniteLossError(f"non-finite loss on another rank at step {step}: the run "
                                     f"stops here (see that rank's error)", step=step)
        try:
            if bad is not None:
                raise bad
            grad_norm = _grad_norm(params, cfg)
            check_finite_loss(grad_norm, step, what="gradient norm")
        except NonFiniteLossError as e:
            e.params_updated = epoch > 0
            raise
        optimizer.step()
    return sums.reduce(cfg.ppo_epochs, grad_norm)
