"""Completion-only supervised fine-tuning through the RL trainer's own path: packed sequences
(restarting position ids), backbone hidden states, fused log-probs (never the ``[tokens x
vocab]`` logits).  :func:`sft_step` is one optimizer step; :func:`sft_sequences` a run of them
with a warm-up + cosine schedule (the tasks' warm-ups, ``trainer.sft``; a user's SFT,
``trainer.user_sft``)."""

from __future__ import annotations

import math
import random

import torch

from fastgrpo.hf import backbone_hidden_states, lm_head_weight
from fastgrpo.ops.logprobs import fused_logprobs
from fastgrpo.trainer.packing import pack_sequences

__all__ = ["sft_sequences", "sft_step"]


def sft_sequences(model, prompts: list[list[int]], comps: list[list[int]], *, steps: int,
                  loss_masks: list[list[bool] | None] | None = None, batch_size: int = 32,
                  lr: float = 3e-3, warmup: int = 10, seed: int = 0, micro_batch_tokens: int = 768,
                  log_every: int = 20, log=print) -> list[float]:
    """Completion-only SFT on token ids; ``loss_masks[i]`` (one bool per completion token)
    leaves tokens the model is not to learn (tool outputs) out of the loss."""
    rng = random.Random(seed)
    order: list[int] = []
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) *
                                              (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    weight = lm_head_weight(model)
    model.train()
    losses = []
    for step in range(steps):
        if len(order) < batch_size:
            more = list(range(len(prompts)))
            rng.shuffle(more)
            order += more
        idx, order = order[:batch_size], order[batch_size:]
        loss = sft_step(model, weight, opt, [prompts[i] for i in idx], [comps[i] for i in idx],
                        micro_batch_tokens,
                        None if loss_masks is None else [loss_masks[i] for i in idx])
        sched.step()
        losses.append(loss)
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"sft step {step:4d}  loss {loss:.4f}  lr {sched.get_last_lr()[0]:.2e}")
    return losses


def sft_step(model, weight, opt, prompts: list[list[int]], comps: list[list[int]],
             micro_batch_tokens: int, loss_masks=None, grad_clip: float = 1.0,
             device=None, cpu_bf16: bool = False) -> float:
    """One optimizer step of completion-only SFT on these sequences, packed into micro-batches
    of ``micro_batch_tokens`` (restarting position ids), through the backbone and the fused
    log-prob kernel (never the ``[tokens x vocab]`` logits); the loss is the token mean over the
    whole batch.  Returns it.  ``cpu_bf16``: the backbone under CPU bf16 autocast (the fused
    kernel then takes bf16 operands and accumulates in fp32)."""
    batches = pack_sequences(prompts, comps, None, max_tokens=micro_batch_tokens, loss_masks=loss_masks)
    n_tok = sum(mb.num_loss_tokens for mb in batches)
    opt.zero_grad(set_to_none=True)
    loss = 0.0
    for mb in batches:  # token-mean over the whole batch, accumulated per micro-batch
        if device is not None:
            mb = mb.to(device)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16 and mb.input_ids.device.type == "cpu"):
            hidden = backbone_hidden_states(model, mb.input_ids, position_ids=mb.position_ids,
                                            cu_seqlens=mb.cu_seqlens, max_seqlen=mb.max_seqlen)[0]
        logp = fused_logprobs(hidden, weight.to(hidden.dtype), mb.targets)
        mb_loss = -(logp * (mb.targets != -100)).sum() / n_tok
        mb_loss.backward()
        loss += mb_loss.detach()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    opt.step()
    return float(loss)
