"""Fused linear -> log-softmax -> (log-prob of target, entropy) kernels.

For ``N`` rows of hidden states ``h [N, D]``, the lm_head ``w [V, D]`` and targets ``y [N]``,
with ``z = (h @ w.T) / T`` accumulated in float32::

    lse  = logsumexp(z)          logp = z[y] - lse          ent = lse - sum_v p_v z_v

Two kernels live here; ``fastgrpo.logprobs`` drives them.

Forward: ``_fwd_kernel`` (wrapper :func:`forward`)
--------------------------------------------------
One fused kernel.  Each program owns ``BLOCK_N`` rows and walks a range of vocabulary tiles
(``BLOCK_V`` columns); for each tile it computes the ``[BLOCK_N, BLOCK_V]`` logits with
``tl.dot`` over ``BLOCK_D`` slices of ``D`` (fp32 accumulator, tensor cores for bf16/fp16),
then folds the tile into an online log-sum-exp held in registers: running max ``m``
(initialised to ``-inf``, never 0), ``s = sum exp(z - m)``, ``t = sum exp(z - m) * z`` (only
where ``exp(z - m) > 0``, so ``-inf`` logits add exactly nothing and the entropy stays finite)
and the target logit picked where ``column == y``.  Columns past ``V`` are ``-inf``.

When there are too few row blocks to fill the GPU (``N / BLOCK_N`` below twice the SM count,
e.g. 8k tokens at ``BLOCK_N = 128`` is 64 programs on 132 SMs) the vocabulary is split over a
second grid axis (``SPLIT`` ranges); each program then writes its four partial statistics
``(m, s, t, z_y)`` to a ``[SPLIT, N]`` float32 buffer and a few tiny torch ops merge them.
That is ``O(N * SPLIT)`` floats, never ``O(N * V)``; weight traffic is unchanged.

Cost: ``2 * N * D * V`` FLOPs.  Bytes read: ``N * D`` (hidden, once per program row block) plus
``ceil(N / BLOCK_N) * V * D`` (the weight, once per row block; L2 absorbs part of it when
programs of neighbouring row blocks walk the same tiles at the same time).  Bytes written:
``3 * 4 * N`` (plus ``4 * 4 * N * SPLIT`` partials when split).

Backward: ``_grad_logits_kernel`` (wrapper :func:`grad_logits`)
---------------------------------------------------------------
For one ``[R, C]`` block of the ``[N, V]`` plane (``R`` rows, the weight rows ``c0 .. c0+C``)
the kernel recomputes the logits tile (``tl.dot`` over ``D``) and applies the epilogue::

    p  = exp(z - lse)      Ez = lse - ent
    dz = (g_l * 1[c0 + col == y] - p * (g_l + g_e * (z - Ez))) / T     (p-term 0 where p == 0)

writing ``dz`` in the GEMM dtype into a block workspace of fixed size (``fastgrpo.logprobs``
caps it at 2**24 elements).  The caller then runs the two gradient GEMMs with cuBLAS:
``dH[rows] += dz @ w_c`` and ``dW[c0:c0+C] += dz.T @ h_rows``.

Cost: recompute ``2 * N * D * V`` + dH ``2 * N * D * V`` + dW ``2 * N * D * V`` = ``6 N D V``
FLOPs (the forward adds ``2 N D V``; total four logits-sized GEMMs).  Extra bytes over the
floor: each block's ``dz`` is written once and read twice (by the two GEMMs):
``3 * R * C * 2`` bytes per bf16 block, i.e. ``6 * N * V`` bytes over the whole plane — the
price of handing the gradient products to cuBLAS.

Why this split
~~~~~~~~~~~~~~
* Accumulating ``dH`` and ``dW`` inside one Triton kernel needs either fp32 atomics (every
  ``dH`` element receives ``V / BLOCK_V`` atomic adds and every ``dW`` element ``N / BLOCK_N``
  — heavy contention and non-deterministic sums) or a program that owns a row block and keeps
  its ``[BLOCK_N, D]`` ``dH`` accumulator resident while it walks the vocabulary: at
  ``D = 4096`` that is 2 MiB for ``BLOCK_N = 128``, far beyond registers and shared memory.
  Recompute + ``dz`` epilogue in Triton, then cuBLAS for the two products, keeps every kernel
  at GEMM efficiency with a fixed workspace.
* Computing gradients during the forward pass (as fused cross-entropy kernels do when the
  loss is a plain sum of per-token terms) is impossible in general here: the upstream
  gradients ``g_l`` and ``g_e`` depend on the whole forward for sequence-level importance
  ratios (GSPO), EGSW's group weights or batch quantiles.  For token-local objectives
  ``fastgrpo.ops.logprobs.linear_one_pass`` does it (the CPU default), but on a GPU it pays
  only with large row blocks: its blocks are rows x the *whole* vocabulary, so ``dW`` ([V, D])
  is read and written once per row block.  At N=8192, D=4096, V=151936 in bf16 a 256 MiB
  budget allows ~220 rows (fp32 logits + exp + bf16 dz), i.e. 38 row blocks moving
  38 x 2 x 2.5 GB = 190 GB of fp32 ``dW`` accumulator traffic (~44 ms at 4.3 TB/s) against
  ~39 ms for the three GEMMs themselves; the two-pass path writes each ``dW`` slice once.
  ``bench/gpu_check.py`` measures both when a GPU is lent.

Measurement on a GPU is still to be done: this module was written and tested on a CPU-only
machine (Triton interpreter for numerics, ``triton.compile`` for sm_80 / sm_90 to check that
every configuration in :data:`CONFIGS` compiles and fits in shared memory without spilling).

Operand precision: bf16/fp16 operands go to tensor cores with an fp32 accumulator; fp32
operands use ``input_precision="ieee"`` (true fp32, FMA units, smaller tiles in the
``*_fp32`` config lists) so fp32 inputs keep fp32 accuracy rather than tf32's.

Interpreter: under ``TRITON_INTERPRET=1`` the ``tl.dot`` operands are upcast to fp32 (the
interpreter's ``tl.dot`` on bf16 returns garbage) and one small fixed configuration is used
instead of autotuning.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["forward", "grad_logits", "CONFIGS", "KERNELS", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Autotuning configurations (GPU only), chosen from a compile sweep for sm_80 / sm_90 (see
# tests/test_kernels_compile.py, which compiles each one and reports shared memory, registers
# and spills).  Every one keeps its shared memory under the sm_80 limit (163 KiB), so the same
# list serves A100 and H100.  fp32 operands take the "*_fp32" lists: fp32 tiles need twice the
# shared memory and the IEEE fp32 dot (FMA, not tensor cores) needs smaller tiles.
# Excluded after the sweep: BLOCK_N=128 x BLOCK_V=256 (forward) and BLOCK_N=128 x BLOCK_V=128
# with 4 warps (both kernels) spill hundreds of bytes of registers; the online-LSE epilogue
# keeps several [BLOCK_N, BLOCK_V] fp32 temporaries live next to the accumulator.
CONFIGS = {
    "forward": [
        dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
        dict(BLOCK_N=64, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=3),
        dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=128, num_warps=4, num_stages=3),
        dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=4, num_stages=4),
    ],
    "grad_logits": [
        dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=4),
        dict(BLOCK_N=64, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=4),
        dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=128, num_warps=4, num_stages=3),
    ],
    "forward_fp32": [
        dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=3),
    ],
    "grad_logits_fp32": [
        dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=3),
    ],
}
# One small configuration for the interpreter (autotuning there is slow and meaningless).
INTERPRET_CONFIG = dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1)
_MAX_BLOCK_V = max(c["BLOCK_V"] for cs in CONFIGS.values() for c in cs)


@triton.jit
def _logits_tile(h_base, w_base, rmask, cmask, offs_d, D,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    """``h[rows] @ w[cols].T`` for one [BLOCK_N, BLOCK_V] tile, fp32 accumulation over D.
    ``h_base`` points at ``h[rows, 0:BLOCK_D]`` ([BLOCK_N, BLOCK_D]), ``w_base`` at the
    transposed ``w[cols, 0:BLOCK_D]`` ([BLOCK_D, BLOCK_V])."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        if EVEN_D:
            a = tl.load(h_base + d0, mask=rmask[:, None], other=0.0)
            b = tl.load(w_base + d0, mask=cmask[None, :], other=0.0)
        else:
            dmask = (d0 + offs_d) < D
            a = tl.load(h_base + d0, mask=rmask[:, None] & dmask[None, :], other=0.0)
            b = tl.load(w_base + d0, mask=cmask[None, :] & dmask[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if a.dtype == tl.float32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, y_ptr, m_ptr, s_ptr, t_ptr, zy_ptr,
                N, V, D, stride_hn, stride_wv, inv_t, v_per_split,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    """Partial online-LSE statistics of rows [pid_n*BLOCK_N, +BLOCK_N) over the vocabulary
    range [pid_s*v_per_split, +v_per_split): m, s = sum exp(z-m), t = sum exp(z-m) z, z_y."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    y = tl.load(y_ptr + rows, mask=rmask, other=-1)
    offs_v = tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    zy = tl.zeros([BLOCK_N], tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    h_base = h_ptr + rows64[:, None] * stride_hn + offs_d[None, :]
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + offs_v
        cmask = cols < v_end
        w_base = w_ptr + cols.to(tl.int64)[None, :] * stride_wv + offs_d[:, None]
        acc = _logits_tile(h_base, w_base, rmask, cmask, offs_d, D,
                           BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, UPCAST)
        z = tl.where(cmask[None, :], acc * inv_t, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # whole row -inf so far
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        t = t * alpha + tl.sum(e * tl.where(e > 0, z, 0.0), axis=1)  # never 0 * -inf
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m = m_new
    out = pid_s * N + rows
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(s_ptr + out, s, mask=rmask)
    tl.store(t_ptr + out, t, mask=rmask)
    tl.store(zy_ptr + out, zy, mask=rmask)


@triton.jit
def _grad_logits_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, dz_ptr,
                        R, C, D, c0, stride_hn, stride_wv, stride_dz, inv_t,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                        EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    """dz[r, c] = inv_t * (gl*1[c0+c == y] - p*(gl + ge*(z - Ez))) for one [BLOCK_N, BLOCK_V]
    tile, recomputing z = h w^T * inv_t."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < R
    cmask = cols < C
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    h_base = h_ptr + rows64[:, None] * stride_hn + offs_d[None, :]
    w_base = w_ptr + cols.to(tl.int64)[None, :] * stride_wv + offs_d[:, None]
    acc = _logits_tile(h_base, w_base, rmask, cmask, offs_d, D,
                       BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, UPCAST)
    z = acc * inv_t
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=rmask, other=0.0)
    gl = tl.load(gl_ptr + rows, mask=rmask, other=0.0)
    ge = tl.load(ge_ptr + rows, mask=rmask, other=0.0)
    y = tl.load(y_ptr + rows, mask=rmask, other=-1)
    p = tl.exp(z - lse[:, None])
    ez = lse - ent
    z_safe = tl.where(p > 0, z, ez[:, None])  # p == 0 (z = -inf): contributes exactly 0
    dz = -p * (gl[:, None] + ge[:, None] * (z_safe - ez[:, None]))
    dz = dz + tl.where((cols + c0)[None, :] == y[:, None], gl[:, None], 0.0)
    dz = dz * inv_t
    ptrs = dz_ptr + rows64[:, None] * stride_dz + cols[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


# Raw kernels (JITFunction, or InterpretedFunction under the interpreter); `.fn` is the
# python function, which the compile test re-wraps in a JITFunction.
KERNELS = {"forward": _fwd_kernel, "grad_logits": _grad_logits_kernel,
           "forward_fp32": _fwd_kernel, "grad_logits_fp32": _grad_logits_kernel}


def _even_d(args):
    return args["D"] % args["BLOCK_D"] == 0


def _tuned(kernel, name):
    configs = [triton.Config({k: c[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")},
                             num_warps=c["num_warps"], num_stages=c["num_stages"])
               for c in CONFIGS[name]]
    # Autotune keyed on D; triton adds the dtypes of tensor arguments to the key itself.
    return triton.autotune(configs=configs, key=["D"])(
        triton.heuristics({"EVEN_D": _even_d})(kernel))


# launchers indexed by "operands are fp32"
if INTERPRET:
    _fwd_launch = _grad_launch = None
else:
    _fwd_launch = {False: _tuned(_fwd_kernel, "forward"),
                   True: _tuned(_fwd_kernel, "forward_fp32")}
    _grad_launch = {False: _tuned(_grad_logits_kernel, "grad_logits"),
                    True: _tuned(_grad_logits_kernel, "grad_logits_fp32")}


def _check(h: torch.Tensor, w: torch.Tensor) -> None:
    if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(f"expected h [N, D] and w [V, D], got {tuple(h.shape)}, {tuple(w.shape)}")
    if h.dtype != w.dtype or h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"h and w must share a dtype among fp32/fp16/bf16, got {h.dtype}, {w.dtype}")
    if h.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("h and w need a unit stride on their last dimension")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def forward(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, inv_t: float,
            split: int | None = None):
    """Fused forward.  Returns float32 ``(logp, ent, lse)``, each ``[N]``.

    ``y`` is int64 ``[N]``; -1 (or any id outside ``[0, V)``) matches no column, giving
    ``logp = -lse`` there (the caller masks it).  ``split`` forces the number of vocabulary
    ranges (default: enough to put about two programs on every SM).
    """
    _check(h, w)
    n, d = h.shape
    v = w.shape[0]
    y = y.contiguous()
    if n == 0:
        e = torch.empty(0, dtype=torch.float32, device=h.device)
        return e, e.clone(), e.clone()
    if split is None:
        row_blocks = triton.cdiv(n, 128)
        split = max(1, min(triton.cdiv(2 * _num_sms(h.device), row_blocks),
                           triton.cdiv(v, 4 * _MAX_BLOCK_V)))
    split = max(1, min(int(split), v))
    # Each range a multiple of the largest BLOCK_V so that tiles never straddle two ranges.
    v_per_split = triton.cdiv(triton.cdiv(v, split), _MAX_BLOCK_V) * _MAX_BLOCK_V
    split = triton.cdiv(v, v_per_split)
    part = torch.empty(4, split, n, dtype=torch.float32, device=h.device)
    args = (h, w, y, part[0], part[1], part[2], part[3], n, v, d, h.stride(0), w.stride(0),
            float(inv_t), v_per_split)
    if INTERPRET:
        cfg = INTERPRET_CONFIG
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
        _fwd_kernel[grid](*args, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"],
                          BLOCK_D=cfg["BLOCK_D"], EVEN_D=d % cfg["BLOCK_D"] == 0, UPCAST=True)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
        _fwd_launch[h.dtype == torch.float32][grid](*args, UPCAST=False)
    m, s, t, zy = part.unbind(0)
    if split == 1:
        m, s, t, zy = m[0], s[0], t[0], zy[0]
    else:
        # merge the partial online-LSE states (ranges whose max is -inf contribute nothing)
        mx = m.max(dim=0).values
        mx_safe = torch.where(torch.isinf(mx) & (mx < 0), torch.zeros_like(mx), mx)
        scale = torch.exp(m - mx_safe)
        s = (s * scale).sum(0)
        t = torch.where(scale > 0, t * scale, torch.zeros_like(t)).sum(0)
        zy = zy.sum(0)
        m = mx
    lse = m + torch.log(s)
    ent = lse - t / s
    return zy - lse, ent, lse


def grad_logits(hc: torch.Tensor, wc: torch.Tensor, yc: torch.Tensor, c0: int,
                lse: torch.Tensor, ent: torch.Tensor, gl: torch.Tensor, ge: torch.Tensor,
                inv_t: float, out_dtype: torch.dtype) -> torch.Tensor:
    """``dL/dz`` for one ``[R, C]`` block (rows ``hc``, weight rows ``wc = w[c0:c0+C]``)."""
    _check(hc, wc)
    r, d = hc.shape
    c = wc.shape[0]
    dz = torch.empty(r, c, dtype=out_dtype, device=hc.device)
    if r == 0 or c == 0:
        return dz
    vecs = [x.contiguous().float() for x in (lse, ent, gl, ge)]
    for x in vecs:
        if x.shape != (r,):
            raise ValueError(f"lse/ent/gl/ge must be [{r}], got {tuple(x.shape)}")
    args = (hc, wc, yc.contiguous(), *vecs, dz, r, c, d, int(c0), hc.stride(0), wc.stride(0),
            dz.stride(0), float(inv_t))
    if INTERPRET:
        cfg = INTERPRET_CONFIG
        grid = (triton.cdiv(r, cfg["BLOCK_N"]), triton.cdiv(c, cfg["BLOCK_V"]))
        _grad_logits_kernel[grid](*args, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"],
                                  BLOCK_D=cfg["BLOCK_D"], EVEN_D=d % cfg["BLOCK_D"] == 0,
                                  UPCAST=True)
    else:
        grid = lambda meta: (triton.cdiv(r, meta["BLOCK_N"]), triton.cdiv(c, meta["BLOCK_V"]))  # noqa: E731
        _grad_launch[hc.dtype == torch.float32][grid](*args, UPCAST=False)
    return dz
