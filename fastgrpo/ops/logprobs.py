"""Per-token log-probs and entropies straight from hidden states, never materializing [N x V].

Math (per row ``n``, ``z = h_n W^T / T``, ``y`` the target)::

    lse     = logsumexp(z)                 p = exp(z - lse)
    logp    = z_y - lse
    entropy = lse - sum_v p_v z_v          (= -sum p log p)
    Ez      = sum_v p_v z_v = lse - entropy

Backward, for upstream gradients ``g_l`` (of logp) and ``g_e`` (of entropy)::

    dL/dz_v = g_l * 1[v == y] - p_v * (g_l + g_e * (z_v - Ez))
    dL/dh   = (dL/dz) W / T               dL/dW = (dL/dz)^T h / T

Only ``lse`` and ``entropy`` ([N] float32 each) are saved for backward; the logits are
recomputed block by block.  Both backends walk the ``[N x V]`` plane in blocks of at most
``_BLOCK_ELEMS`` elements (rows x vocabulary columns), so the workspace is fixed whatever N
and V are.  That is the *two-pass* path: ``8 N D V`` FLOPs (four logits-sized GEMMs).

The *one-pass* path (``linear_one_pass``, used by ``grpo_loss`` for objectives whose
gradient per token follows from that token's log-prob and entropy) needs the upstream
gradients while the block is still there: it walks blocks of rows x the whole vocabulary,
computes the objective's ``g_l, g_e`` for those rows right after their statistics, turns the
block into ``dL/dz`` in place and runs the two gradient GEMMs: ``6 N D V`` FLOPs, no
recompute, the same fixed-size workspace.

Backends
--------
* ``torch``: blocks computed with ``torch.mm``; forward merges vocabulary blocks with an
  online log-sum-exp.  The CPU default.  On CPU (fp32, bf16) the blocks go through the native
  kernels of ``csrc/`` when they are built (``fastgrpo.ops._native``; ``FASTGRPO_NATIVE=0``
  forces plain torch): bf16 logits GEMMs with an fp32 result (oneDNN brgemm) whose tiles feed
  one fused sweep for the row statistics and one for dz while in cache, and for fp32 the same
  two sweeps over ``torch.mm`` blocks.  ``keep_logits=True`` keeps the ``[N, V]`` logits for
  the backward instead (three GEMMs, N*V*4 bytes).
* ``triton``: the forward is one fused Triton kernel (logits tiles on tensor cores, online
  log-sum-exp and entropy in registers, nothing written but three floats per row).  The
  backward recomputes each block's logits *and* forms ``dL/dz`` in one Triton kernel, then
  hands the block to cuBLAS for the two gradient products.  See
  ``fastgrpo_kernels.linear_logprobs`` for why the backward is split that way.
* ``reference``: the naive full-logits float64 computation, for tests only.
"""

from __future__ import annotations

import torch

from fastgrpo.ops.blocks import (BACKENDS, REFERENCE, linear_backward, linear_forward,  # noqa: F401
                                 linear_forward_keep, linear_one_pass, one_pass_pays, resolve_backend,
                                 validate_inputs)
from fastgrpo.ops.sharded import gathered, gathers_partitioned_weight, sharded_grad
from fastgrpo.ops.vocab_parallel import check_vocab_parallel, vocab_parallel_logprobs, vocab_range

__all__ = ["fused_logprobs", "naive_logprobs", "linear_forward", "linear_backward",
           "linear_one_pass", "linear_forward_keep", "one_pass_pays", "BACKENDS", "validate_inputs", "resolve_backend"]

class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, y, inv_t, backend, keep_logits=False):
        # w: a plain weight, an FSDP2-sharded DTensor or a ZeRO-3 partitioned parameter, gathered
        # per pass (ops/sharded.py)
        logits = None
        with gathered(w) as wf:
            if keep_logits and backend == "torch" and h.shape[0] and any(ctx.needs_input_grad[:2]):
                logp, ent, lse, logits = linear_forward_keep(h, wf, y, inv_t)
            else:
                logp, ent, lse = linear_forward(h, wf, y, inv_t, backend)
        ctx.save_for_backward(h, w, y, lse, ent, logits)
        ctx.inv_t, ctx.backend = inv_t, backend
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, w, y, lse, ent, logits = ctx.saved_tensors
        gl = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        ge = None if g_ent is None else g_ent.float().contiguous()
        with gathered(w, grad_follows=ctx.needs_input_grad[1]) as wf:
            dh, dw = linear_backward(h, wf, y, lse, ent, gl, ge, ctx.inv_t, ctx.backend,
                                     ctx.needs_input_grad[0], ctx.needs_input_grad[1], logits)
        return dh, sharded_grad(dw, w), None, None, None, None


@gathers_partitioned_weight
def fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   temperature: float = 1.0, return_entropy: bool = False,
                   ignore_index: int = -100, backend: str = "auto",
                   vocab_parallel_group=None, keep_logits: bool = False):
    """Log-probabilities of ``targets`` under ``softmax(hidden @ weight.T / temperature)``.

    Args:
        hidden: ``[..., D]`` final hidden states (bf16, fp16 or fp32).
        weight: ``[V, D]`` lm_head weight, same dtype and device as ``hidden``.
        targets: integer tensor shaped like ``hidden[..., 0]``; ``ignore_index`` positions
            give 0 and receive no gradient.
        temperature: divides the logits (sampling temperature of the rollout).
        return_entropy: also return the entropy of the temperature-scaled distribution.
        backend: ``"auto"`` (triton on CUDA, torch elsewhere), ``"triton"``, ``"torch"`` or
            ``"reference"`` (naive full logits, tests only).
        vocab_parallel_group: a ``torch.distributed`` process group over which the vocabulary
            is split: ``weight`` is then this rank's rows ``[V_r, D]`` (shards in rank order),
            ``hidden`` the same on every rank and ``targets`` global ids; the softmax is over
            the whole vocabulary and ``hidden``'s gradient is summed over the group
            (``fastgrpo.ops.vocab_parallel``).
        keep_logits: keep the float32 ``[N, V]`` logits from the forward for the backward
            (torch backend, when a gradient is wanted): N*V*4 bytes more, one logits-sized
            GEMM less (three instead of four).  Off by default: memory stays O(block).
            Not with ``vocab_parallel_group``.

    Returns:
        ``logp`` (float32, shape of ``targets``), and ``entropy`` when asked for.  Both are
        differentiable with respect to ``hidden`` and ``weight``.
    """
    vocab = start = None
    if vocab_parallel_group is not None:
        check_vocab_parallel(weight, backend)
        start, _, vocab = vocab_range(weight, vocab_parallel_group)
    validate_inputs(hidden, weight, targets, temperature, ignore_index, backend, vocab)
    backend = resolve_backend(backend, hidden.device)
    if backend == "reference":
        logp, ent = naive_logprobs(hidden, weight, targets, temperature=temperature,
                                   ignore_index=ignore_index)
        return (logp, ent) if return_entropy else logp
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    h = h if h.stride(-1) == 1 else h.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = targets.reshape(-1).long()
    valid = y != ignore_index
    if vocab_parallel_group is not None:
        logp, ent = vocab_parallel_logprobs(h, w, torch.where(valid, y, -1),
                                            1.0 / float(temperature), backend,
                                            vocab_parallel_group, start)
    else:
        logp, ent = _FusedLogprobs.apply(h, w, torch.where(valid, y, -1),
                                         1.0 / float(temperature), backend, bool(keep_logits))
    zero = torch.zeros((), dtype=torch.float32, device=h.device)
    logp = torch.where(valid, logp, zero).reshape(shape)
    if not return_entropy:
        return logp
    return logp, torch.where(valid, ent, zero).reshape(shape)


def naive_logprobs(hidden, weight, targets, *, temperature=1.0, ignore_index=-100,
                   dtype=torch.float64):
    """Full-logits reference in ``dtype`` (float64 by default).  Allocates [N x V]: tests only."""
    z = (hidden.to(dtype) @ weight.to(dtype).T) / temperature
    logz = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    idx = torch.where(valid, targets, 0).long()
    logp = logz.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    p = logz.exp()
    ent = -(torch.where(p > 0, p * logz, torch.zeros_like(p))).sum(-1)
    zero = torch.zeros((), dtype=dtype, device=z.device)
    return torch.where(valid, logp, zero), torch.where(valid, ent, zero)
