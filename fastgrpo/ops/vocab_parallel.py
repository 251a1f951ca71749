"""Log-probs and entropies from a vocabulary-parallel lm_head (Megatron-style tensor parallelism).

Each rank of ``group`` holds rows ``[start_r, start_r + V_r)`` of the lm_head weight (any split,
uneven included, in rank order) and the *same* hidden states and *global* targets.  Math, per
row (``z = h W^T / T``; every statistic is float32 ``[N]``)::

    rank r, its shard only:   lse_r = logsumexp_{v in r} z_v      Ez_r = E_{p_r}[z]
                              zy_r  = z_y if y in r else 0
    max over ranks:           M   = max_r lse_r                                 (all-reduce MAX)
    sum over ranks:           S   = sum_r exp(lse_r - M),  S_z = sum_r exp(lse_r - M) Ez_r,
                              z_y = sum_r zy_r                                  (one all-reduce SUM)
    then                      lse = M + log S,  Ez = S_z / S,  entropy = lse - Ez,  logp = z_y - lse

The per-shard statistics are the single-process kernel's own forward on the shard
(``linear_forward``: ``lse_r``, ``entropy_r``, ``logp_r``), so the blocks, backends and numerics
are the same.  The backward is the single-process kernel's backward on the shard, fed with the
*global* ``lse`` and entropy: it yields ``dL/dW_r`` for the local shard and this shard's part of
``dL/dh``, which one all-reduce sums over the group (as Megatron's vocab-parallel
cross-entropy + column-parallel lm_head do: ``dh`` is the same full gradient on every rank).

Plugging in (Megatron-LM, NeMo-RL's Megatron policy, slime): replace ``output_layer(hidden)`` +
``vocab_parallel_cross_entropy`` by::

    logp, ent = fused_logprobs(hidden, output_layer.weight, targets, return_entropy=True,
                               vocab_parallel_group=parallel_state.get_tensor_model_parallel_group())

with ``hidden`` the final norm's output, the same on every tensor-parallel rank (with sequence
parallelism, gather it first with a gather whose backward *splits* the gradient, not one that
reduce-scatters it: this op already sums ``dh`` over the group), and ``targets`` the global
token ids.  ``grpo_loss(..., vocab_parallel_group=...)`` takes the same arguments.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastgrpo.ops.blocks import linear_backward, linear_forward

__all__ = ["vocab_parallel_logprobs", "vocab_range", "check_vocab_parallel"]


def check_vocab_parallel(weight: torch.Tensor, backend: str) -> None:
    """Refuse what the vocabulary-parallel path does not take, naming it."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_group needs torch.distributed initialized "
                           "(init_process_group) before the call")
    if type(weight).__name__ == "DTensor":
        raise ValueError("vocab_parallel_group takes this rank's plain weight shard [V_r, D], "
                         "not a DTensor; pass weight.to_local() for a vocabulary-sharded "
                         "DTensor, or no group for an FSDP-sharded one")
    if backend == "reference":
        raise ValueError("backend='reference' (the naive test oracle) has no vocabulary-"
                         "parallel form; use 'auto', 'torch' or 'triton'")


def vocab_range(weight_shard: torch.Tensor, group) -> tuple[int, int, int]:
    """``(start, end, vocab_size)``: this rank's rows of the global vocabulary (shards in rank
    order, sizes gathered from the group, so uneven splits work)."""
    n = torch.tensor([weight_shard.shape[0]], dtype=torch.int64, device=weight_shard.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    start = sum(sizes[:rank])
    return start, start + sizes[rank], sum(sizes)


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, y, start, inv_t, backend, group):
        # this shard's targets: local column, or -1 (no target here / ignored)
        here = (y >= start) & (y < start + w.shape[0])
        y_loc = torch.where(here, y - start, -1)
        logp_r, ent_r, lse_r = linear_forward(h, w, y_loc, inv_t, backend)
        m = lse_r.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        scale = torch.exp(lse_r - m)              # 0 for a shard whose logits are all -inf
        ez_r = torch.where(scale > 0, lse_r - ent_r, 0.0)
        stats = torch.stack([scale, scale * ez_r, torch.where(here, logp_r + lse_r, 0.0)])
        dist.all_reduce(stats, group=group)
        s, sz, zy = stats
        lse = m + torch.log(s)
        ent = lse - sz / s
        ctx.save_for_backward(h, w, y_loc, lse, ent)
        ctx.inv_t, ctx.backend, ctx.group = inv_t, backend, group
        return zy - lse, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, w, y_loc, lse, ent = ctx.saved_tensors
        gl = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        ge = None if g_ent is None else g_ent.float().contiguous()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh, dw = linear_backward(h, w, y_loc, lse, ent, gl, ge, ctx.inv_t, ctx.backend,
                                 need_h, need_w)
        if need_h:
            dist.all_reduce(dh, group=ctx.group)
        return dh, dw, None, None, None, None, None


def vocab_parallel_logprobs(h: torch.Tensor, weight_shard: torch.Tensor, y: torch.Tensor,
                            inv_t: float, backend: str, group, start: int):
    """Per-row ``(logp, entropy)`` (float32 ``[N]``) of global targets ``y`` (``-1`` = no
    target: its logp is meaningless, callers mask it) under the softmax over the whole
    vocabulary, from ``h [N, D]`` (the same on every rank) and this rank's weight rows starting
    at ``start`` (see :func:`vocab_range`).  Differentiable in ``h`` (summed over the group) and
    ``weight_shard``.  Called by ``fused_logprobs`` and ``grpo_loss`` with
    ``vocab_parallel_group``."""
    return _VocabParallelLogprobs.apply(h, weight_shard, y, start, inv_t, backend, group)
