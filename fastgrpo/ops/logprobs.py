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
and V are.

Backends
--------
* ``torch``: blocks computed with ``torch.mm``; forward merges vocabulary blocks with an
  online log-sum-exp.  The CPU default.
* ``triton``: the forward is one fused Triton kernel (logits tiles on tensor cores, online
  log-sum-exp and entropy in registers, nothing written but three floats per row).  The
  backward recomputes each block's logits *and* forms ``dL/dz`` in one Triton kernel, then
  hands the block to cuBLAS for the two gradient products.  See
  ``fastgrpo_kernels.linear_logprobs`` for why the backward is split that way.
* ``reference``: the naive full-logits float64 computation, for tests only.
"""

from __future__ import annotations

import os

import torch

__all__ = ["fused_logprobs", "naive_logprobs", "linear_forward", "linear_backward", "BACKENDS",
           "validate_inputs", "resolve_backend"]

# Workspace budget of one [rows x vocab] block, in elements.  CPU: 4M (16 MiB in fp32; the
# torch path keeps a few block-sized temporaries alive).  CUDA: 16M (32 MiB of bf16 gradient
# block, large enough for the two cuBLAS GEMMs that consume it to run near peak).
_BLOCK_ELEMS = 1 << 22
_BLOCK_ELEMS_CUDA = 1 << 24
_MAX_BLOCK_ROWS = 4096
BACKENDS = ("auto", "torch", "triton")   # the kernels' backends ("auto": triton on CUDA)
REFERENCE = "reference"                  # the naive float oracle, accepted for tests


def _block_shape(n: int, v: int, cuda: bool = False) -> tuple[int, int]:
    budget = _BLOCK_ELEMS_CUDA if cuda else _BLOCK_ELEMS
    rows = max(1, min(n, _MAX_BLOCK_ROWS))
    cols = max(1, min(v, budget // rows))
    return rows, cols


# ----------------------------------------------------------------------------- validation


def validate_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              temperature: float, ignore_index: int, backend: str) -> None:
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got "
                        f"{getattr(hidden, 'dtype', type(hidden).__name__)}")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., D] and weight [V, D] disagree on D: hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point \
            or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"targets must be an integer tensor, got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden's leading "
                         f"shape {tuple(hidden.shape[:-1])}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(f"hidden, weight and targets must be on one device, got "
                         f"{hidden.device}, {weight.device}, {targets.device}")
    if not (isinstance(temperature, (int, float)) and temperature > 0
            and temperature != float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if backend not in BACKENDS and backend != REFERENCE:
        raise ValueError(f"backend must be one of {BACKENDS + (REFERENCE,)}, got {backend!r}")
    if targets.numel():
        valid = targets != ignore_index
        if bool(valid.any()):
            t = targets[valid]
            lo, hi = int(t.min()), int(t.max())
            v = weight.shape[0]
            if lo < 0 or hi >= v:
                bad = lo if lo < 0 else hi
                raise ValueError(f"target {bad} is outside [0, {v}) (vocabulary size {v}); "
                                 f"use ignore_index={ignore_index} for positions to skip")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set "
                           "before triton is imported to interpret the kernels on CPU")
    return backend


# ----------------------------------------------------------------------------- torch blocks


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # CPU matmuls in bf16/fp16 round their output; CUDA ones accumulate in fp32 on tensor cores.
    return x.dtype if x.is_cuda else torch.float32


# -inf logits (e.g. a masked vocabulary row of -inf weights) are clamped to this: exp() of it
# is exactly 0, so such a column contributes nothing, and 0 * it stays 0 (never 0 * inf = nan).
_NEG = -1e30


def _logits(hc, wc, inv_t):
    cd = _compute_dtype(hc)
    return (hc.to(cd) @ wc.to(cd).T).float().mul_(inv_t).clamp_(min=_NEG)


def _torch_forward(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, inv_t: float):
    n, v = h.shape[0], w.shape[0]
    rows, cols = _block_shape(n, v, h.is_cuda)
    lse = torch.empty(n, dtype=torch.float32, device=h.device)
    ent = torch.empty_like(lse)
    zy = torch.zeros_like(lse)
    for r0 in range(0, n, rows):
        hc = h[r0:r0 + rows]
        yc = y[r0:r0 + rows]
        m = torch.full((hc.shape[0],), float("-inf"), device=h.device)
        s = torch.zeros_like(m)   # sum exp(z - m)
        t = torch.zeros_like(m)   # sum exp(z - m) * z
        for c0 in range(0, v, cols):
            z = _logits(hc, w[c0:c0 + cols], inv_t)
            m_new = torch.maximum(m, z.max(dim=1).values)
            scale = torch.exp(m - m_new)  # 0 on the first block (m = -inf, m_new finite)
            e = torch.exp(z - m_new[:, None])
            s = s * scale + e.sum(1)
            t = t * scale + (e * z).sum(1)  # cascade sum: accurate; z >= -1e30 so no nan
            m = m_new
            hit = (yc >= c0) & (yc < c0 + z.shape[1])
            idx = (yc - c0).clamp(0, z.shape[1] - 1)
            zy[r0:r0 + rows] += torch.where(hit, z.gather(1, idx[:, None]).squeeze(1), 0.0)
        lse[r0:r0 + rows] = m + torch.log(s)
        ent[r0:r0 + rows] = lse[r0:r0 + rows] - t / s
    return zy - lse, ent, lse


def _torch_grad_logits(hc, wc, yc, c0, lse, ent, gl, ge, inv_t, out_dtype):
    """dL/d(h W^T) for one [rows x cols] block whose vocabulary starts at column c0."""
    z = _logits(hc, wc, inv_t)
    p = torch.exp(z - lse[:, None])
    # dz = -p * (gl + ge * (z - Ez)), built in place in z's buffer
    coef = z.sub_((lse - ent)[:, None]).mul_(ge[:, None]).add_(gl[:, None])
    dz = p.mul_(coef).neg_()
    hit = (yc >= c0) & (yc < c0 + dz.shape[1])
    rows = torch.nonzero(hit).squeeze(1)
    dz[rows, yc[rows] - c0] += gl[rows]
    return dz.mul_(inv_t).to(out_dtype)


# ----------------------------------------------------------------------------- autograd


def _triton_module():
    from fastgrpo_kernels import linear_logprobs  # imported lazily: CPU users may lack triton
    return linear_logprobs


def linear_forward(h, w, y, inv_t: float, backend: str):
    """Row statistics of ``softmax(h @ w.T * inv_t)``: ``(logp, entropy, lse)``, float32 [N].

    ``y`` holds -1 on rows without a target (their logp is meaningless; callers mask it).
    """
    if h.shape[0] == 0:
        e = torch.empty(0, dtype=torch.float32, device=h.device)
        return e, e.clone(), e.clone()
    if backend == "triton":
        return _triton_module().forward(h, w, y, inv_t)
    return _torch_forward(h, w, y, inv_t)


def _mm_f32(a, b):
    """``a @ b`` with a float32 result; bf16/fp16 CUDA operands stay on tensor cores."""
    if a.dtype == torch.float32:
        return a @ b
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return (a @ b).float()


def linear_backward(h, w, y, lse, ent, gl, ge, inv_t: float, backend: str,
                    need_h: bool = True, need_w: bool = True):
    """Gradients of ``sum(gl * logp + ge * entropy)`` w.r.t. ``h`` and ``w``.

    Walks the [N x V] plane in fixed-size blocks, vocabulary blocks outermost: each block's
    ``dL/dz`` is recomputed from the saved row statistics (fused in one Triton kernel, or
    torch), then two GEMMs fold it into ``dh`` (float32, [N, D]) and into the float32
    accumulator of the current vocabulary slice of ``dw`` ([cols, D]), which is written out
    once.  Extra memory: N*D*4 + cols*D*4 + one block; never O(V*D) in float32.
    """
    n, v = h.shape[0], w.shape[0]
    rows, cols = _block_shape(n, v, h.is_cuda)
    # the blocks go through GEMMs in h's dtype on GPU (tensor cores), float32 on CPU
    gdtype = h.dtype if h.is_cuda else torch.float32
    dh = torch.zeros(n, h.shape[1], dtype=torch.float32, device=h.device) if need_h else None
    dw = torch.zeros_like(w) if need_w else None
    grad_block = _triton_module().grad_logits if backend == "triton" else _torch_grad_logits
    row_blocks = [slice(r0, r0 + rows) for r0 in range(0, n, rows)]
    if not h.is_cuda:  # skip blocks nothing flows into (e.g. all ignored); no host sync on GPU
        row_blocks = [sl for sl in row_blocks if bool(gl[sl].any() or ge[sl].any())]
    for c0 in range(0, v, cols):
        wc = w[c0:c0 + cols]
        wg = wc.to(gdtype)
        dw_acc = None
        for sl in row_blocks:
            hc = h[sl]
            dz = grad_block(hc, wc, y[sl], c0, lse[sl], ent[sl], gl[sl], ge[sl], inv_t, gdtype)
            if need_h:
                dh[sl] += _mm_f32(dz, wg)
            if need_w:
                part = _mm_f32(dz.T, hc.to(gdtype))
                dw_acc = part if dw_acc is None else dw_acc.add_(part)
        if need_w and dw_acc is not None:
            dw[c0:c0 + cols] = dw_acc
    return (dh.to(h.dtype) if need_h else None), dw


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, y, inv_t, backend):
        logp, ent, lse = linear_forward(h, w, y, inv_t, backend)
        ctx.save_for_backward(h, w, y, lse, ent)
        ctx.inv_t, ctx.backend = inv_t, backend
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, w, y, lse, ent = ctx.saved_tensors
        gl = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        ge = torch.zeros_like(lse) if g_ent is None else g_ent.float().contiguous()
        dh, dw = linear_backward(h, w, y, lse, ent, gl, ge, ctx.inv_t, ctx.backend,
                                 ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dh, dw, None, None, None


def fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   temperature: float = 1.0, return_entropy: bool = False,
                   ignore_index: int = -100, backend: str = "auto"):
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

    Returns:
        ``logp`` (float32, shape of ``targets``), and ``entropy`` when asked for.  Both are
        differentiable with respect to ``hidden`` and ``weight``.
    """
    validate_inputs(hidden, weight, targets, temperature, ignore_index, backend)
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
    logp, ent = _FusedLogprobs.apply(h, w, torch.where(valid, y, -1), 1.0 / float(temperature),
                                     backend)
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
