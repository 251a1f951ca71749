"""The block machinery under ``fused_logprobs`` and ``grpo_loss``: the ``[N x V]`` plane walked
in fixed-size blocks (``linear_forward``, ``linear_backward``, ``linear_one_pass``,
``linear_forward_keep``), on the torch / native CPU / Triton backends, with input checks and
backend resolution.  ``fastgrpo.ops.logprobs`` explains the math and the backends; the single-
and multi-process entry points (``logprobs``, ``vocab_parallel``, ``loss``) import from here."""

from __future__ import annotations

import math
import os

import torch

from fastgrpo.ops._native import native as _native

__all__ = ["linear_forward", "linear_backward", "linear_one_pass", "linear_forward_keep",
           "one_pass_pays", "BACKENDS", "REFERENCE", "validate_inputs", "resolve_backend"]

# Workspace budget of one [rows x vocab] block, in elements.  CPU: 4M (16 MiB in fp32; the
# torch path keeps a few block-sized temporaries alive).  CUDA: 16M (32 MiB of bf16 gradient
# block, large enough for the two cuBLAS GEMMs that consume it to run near peak).
_BLOCK_ELEMS = 1 << 22
_BLOCK_ELEMS_CUDA = 1 << 24
# One-pass path: a block is a set of rows times the *whole* vocabulary (the log-sum-exp must be
# final before dz exists), overwritten by its own dz; 4M elements (16 MiB of fp32 logits) but at
# least 128 rows, since dW is read and written once per block.  The elementwise work runs on
# slices of ~_SLICE_ELEMS so its temporaries stay in cache.  Measured on this 2-core EPYC (one
# thread, fresh process): 1024x256x32768 69 MiB peak extra (177 MiB with 16M-element blocks and
# 2M-element slices, at the same speed), 4096x512x65536 204 MiB (281), 2048x1024x151936
# 754 MiB (744; 594 of it is dW itself).  At least 256 rows since 2026-12-06: the three fp32
# GEMMs of 128-row blocks ran 1.15x slower than of 256-row blocks at 4096x512x65536 (5.9 s
# against 5.1 s, one thread of a Xeon with AMX), for 32 MiB more block at V = 65536.
_ONE_PASS_ELEMS = 1 << 22
_ONE_PASS_MIN_ROWS = 256
_SLICE_ELEMS = 1 << 19
# CUDA: whole blocks at once (slices would be thousands of tiny launches); 32M elements = 128 MiB
# of fp32 logits plus the same for exp() and half that for the bf16 dz.
_ONE_PASS_ELEMS_CUDA = 1 << 25
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
              temperature: float, ignore_index: int, backend: str,
              vocab_size: int | None = None) -> None:
    """Raise on bad inputs; targets must lie in ``[0, vocab_size)`` (default ``weight``'s rows;
    the global vocabulary when ``weight`` is a vocabulary-parallel shard)."""
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
            v = weight.shape[0] if vocab_size is None else vocab_size
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
    """Operand dtype of the logits GEMM.  CPU matmuls in bf16/fp16 round their *output* to
    that dtype (measured: bf16 logits put 7.6e-3 nats of error into log-probs against 4e-7 in
    fp32), so CPU logits are computed in fp32; CUDA accumulates in fp32 on tensor cores."""
    return x.dtype if x.is_cuda else torch.float32


def _grad_dtype(x: torch.Tensor) -> torch.dtype:
    """Operand dtype of the two gradient GEMMs (dz @ W, dz.T @ h).  Their outputs may round to
    the model's dtype, which is the gradient's dtype anyway: bf16 on CPUs with bf16 dot
    products (AVX-512 BF16 / AMX: 2.2-3.3x the fp32 GEMM rate measured on this EPYC), the
    model's dtype on CUDA, fp32 otherwise."""
    if x.is_cuda:
        return x.dtype
    if x.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available() \
            and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


# -inf logits (e.g. a masked vocabulary row of -inf weights) are clamped to this: exp() of it
# is exactly 0, so such a column contributes nothing, and 0 * it stays 0 (never 0 * inf = nan).
# The clamp is one pass over every block, so it runs only when the weight has a non-finite entry.
_NEG = -1e30


def _needs_clamp(w: torch.Tensor) -> bool:
    """True when ``w`` may hold a non-finite entry: one summing pass (an overflowing sum
    only costs the clamp, never correctness)."""
    return not math.isfinite(float(w.sum(dtype=torch.float32)))


def _logits(hc, wc, inv_t, clamp=True):
    """``hc @ wc.T * inv_t`` in float32 (tensor cores with an fp32 result on CUDA)."""
    cd = _compute_dtype(hc)
    z = _mm_f32(hc.to(cd), wc.to(cd).T)
    if inv_t != 1.0:
        z.mul_(inv_t)
    return z.clamp_(min=_NEG) if clamp else z


def _torch_forward(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, inv_t: float):
    n, v = h.shape[0], w.shape[0]
    rows, cols = _block_shape(n, v, h.is_cuda)
    clamp = _needs_clamp(w)
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
            z = _logits(hc, w[c0:c0 + cols], inv_t, clamp)
            m_new = torch.maximum(m, z.amax(dim=1))
            scale = torch.exp(m - m_new)  # 0 on the first block (m = -inf, m_new finite)
            e = torch.sub(z, m_new[:, None]).exp_()
            s = s * scale + e.sum(1)
            t = t * scale + torch.linalg.vecdot(e, z)  # z >= -1e30, so e * z is never nan
            m = m_new
            zy[r0:r0 + rows] += _pick(z, yc, c0)
        lse[r0:r0 + rows] = m + torch.log(s)
        ent[r0:r0 + rows] = lse[r0:r0 + rows] - t / s
    return zy - lse, ent, lse


def _pick(z, yc, c0):
    """``z[r, yc[r] - c0]`` where the target falls in this block's columns, else 0."""
    hit = (yc >= c0) & (yc < c0 + z.shape[1])
    idx = (yc - c0).clamp(0, z.shape[1] - 1)
    return torch.where(hit, z.gather(1, idx[:, None]).squeeze(1), 0.0)


def _dz_(z, e, norm, ez, yc, c0, gl, ge):
    """Overwrite ``z`` (a logits block) with ``dL/dz = gl * 1[v == y] - p * (gl + ge * (z -
    Ez))``, where ``p = e / norm`` (``e = exp(z - c)``, ``norm`` its row normalizer).

    ``ge`` None means no entropy gradient (one pass fewer).  Returns ``z``."""
    if ge is None:
        torch.mul(e, (-gl / norm)[:, None], out=z)
    else:
        a, b = -ge / norm, (ge * ez - gl) / norm     # -p * (gl + ge (z - Ez)) = e * (a z + b)
        torch.addcmul(b[:, None], z, a[:, None], out=z).mul_(e)
    hit = (yc >= c0) & (yc < c0 + z.shape[1])
    rows = torch.nonzero(hit).squeeze(1)
    z[rows, yc[rows] - c0] += gl[rows]
    return z


def _torch_grad_logits(hc, wc, yc, c0, lse, ent, gl, ge, inv_t, out_dtype, clamp=True):
    """dL/d(h W^T) for one [rows x cols] block whose vocabulary starts at column c0."""
    z = _logits(hc, wc, inv_t, clamp)
    e = torch.sub(z, lse[:, None]).exp_()
    dz = _dz_(z, e, torch.ones_like(lse), lse - ent, yc, c0, gl, ge)
    if inv_t != 1.0:
        dz.mul_(inv_t)
    return dz.to(out_dtype)


# ----------------------------------------------------------------------------- native blocks
# The same blocks through the C++ kernels (csrc/, fastgrpo.ops._native) when they are built:
# bf16 logits GEMMs with a float32 result (oneDNN brgemm) and one fused sweep per block for the
# row statistics and one for dz, instead of the chains of torch ops above.  Logits stay raw
# (h @ w.T) in the block; the sweeps apply 1/T and the -inf clamp in registers.


def _native_for(h):
    """The native module when it serves ``h`` (CPU, fp32 or bf16), else None."""
    if h.device.type != "cpu" or h.dtype not in (torch.float32, torch.bfloat16):
        return None
    return _native()


class _NativeWeight:
    """A vocabulary slice ``w [C, D]`` prepared once for its logits GEMMs: packed for brgemm
    (bf16 where the CPU has bf16 dot products: the GEMM tiles feed the sweeps while in cache),
    else float32 for ``torch.mm`` into a block the sweeps then read."""

    def __init__(self, mod, w, workspace=None):
        self.mod, self.c = mod, w.shape[0]
        self.bf16 = (w.dtype == torch.bfloat16 and w.shape[1] % 2 == 0
                     and mod.brgemm_available())
        self.packed = mod.pack_bf16(w, workspace) if self.bf16 else None
        self.w = None if self.bf16 else w.float()

    def logits(self, hc, buf):
        """Raw float32 logits ``hc @ w.T`` [R, C], written into ``buf`` (a flat scratch)."""
        z = buf[:hc.shape[0] * self.c].view(hc.shape[0], self.c)
        if self.bf16:
            self.mod.logits_bf16(_rows(hc), self.packed, self.c, z)
            return z
        return torch.mm(hc.float(), self.w.T, out=z)

    def stats_(self, hc, yc, c0, inv_t, state, buf, keep=False, store_exp=False):
        """Fold this slice's logits into the rows' online statistics ``state`` = (m, s, t, zy);
        returns the raw logits block when ``keep`` (one pass: dz is built from it), or, with
        ``store_exp`` (float32, whole rows), the block holding ``exp(z - max)`` instead."""
        if self.bf16:
            z = buf[:hc.shape[0] * self.c].view(hc.shape[0], self.c) if keep else None
            self.mod.stats_bf16_(_rows(hc), self.packed, self.c, yc, c0, inv_t, *state, z)
            return z
        z = self.logits(hc, buf)
        self.mod.row_stats_(z, yc, c0, inv_t, *state, store_exp=store_exp)
        return z

    def grad(self, hc, yc, c0, inv_t, lse, ent, gl, ge, buf, out):
        """dL/d(h W^T) of this slice for the rows ``hc`` into ``out`` (bf16 or float32)."""
        a, b = _dz_coefficients(lse, ent, gl, ge)
        gl = gl.float().contiguous()
        if self.bf16 and out.dtype == torch.bfloat16:
            self.mod.grad_bf16(_rows(hc), self.packed, self.c, yc, c0, inv_t, lse, a, b, gl,
                               inv_t, out)
            return out
        z = self.logits(hc, buf)
        out = z if out.dtype == torch.float32 else out
        self.mod.grad_logits(z, yc, c0, inv_t, lse, a, b, gl, inv_t, out)
        return out


def _rows(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _dz_coefficients(lse, ent, gl, ge):
    """dz = gl 1[v = y] - p (a + b z): a = gl - ge Ez, b = ge (Ez = lse - entropy)."""
    gl = gl.float().contiguous()
    if ge is None:
        return gl, torch.zeros_like(gl)
    ge = ge.float().contiguous()
    return (gl - ge * (lse - ent)).contiguous(), ge


def _native_state(n):
    return (torch.full((n,), float("-inf")), torch.zeros(n), torch.zeros(n), torch.zeros(n))


# Vocabulary columns per slice of the fused bf16 backward (_native_grad_gemms): its workspace
# is two packed copies of the slice of w (bf16), reused by every slice; nothing [N x cols].
_FUSED_SLICE_COLS = 8192


def _fused_grad_pays(h) -> bool:
    """The fused native bf16 backward (csrc grad_gemms_bf16) serves ``h``: CPU bf16 with a
    bf16 brgemm, D a multiple of 64."""
    mod = _native_for(h)
    return (mod is not None and h.dtype == torch.bfloat16 and h.shape[-1] % 64 == 0
            and mod.brgemm_available())


def _native_grad_gemms(mod, h, w, y, lse, ent, gl, ge, inv_t):
    """``linear_backward`` for bf16 through the fused native backward: per vocabulary slice the
    logits, dz and both gradient GEMMs (bf16 operands, float32 accumulators) tile by tile in
    cache; four logits-sized GEMMs in all, as the two-pass path is, at brgemm rates."""
    n, v = h.shape[0], w.shape[0]
    hc = _rows(h)
    hkn = mod.pack_kn(hc)
    a, b = _dz_coefficients(lse, ent, gl, ge)
    gl = gl.float().contiguous()
    dh = torch.zeros(n, h.shape[1])
    dw = torch.empty_like(w)
    cols = min(v, _FUSED_SLICE_COLS)
    packed, wkn = (torch.empty((cols + 64) * h.shape[1], dtype=w.dtype) for _ in range(2))
    for c0 in range(0, v, cols):
        wc = _rows(w[c0:c0 + cols])
        if wc.shape[0] % 2:            # an odd last slice: pad one zero row (its dw is dropped)
            wc = torch.cat([wc, wc.new_zeros(1, wc.shape[1])])
        mod.grad_gemms_bf16(hc, mod.pack_bf16(wc, packed), hkn, mod.pack_kn(wc, wkn),
                            wc.shape[0], y, c0, inv_t, lse, a, b, gl, inv_t, dh,
                            dw[c0:c0 + cols])
    return dh.to(h.dtype), dw


def one_pass_pays(h) -> bool:
    """Whether the one-pass path beats the two-pass path for ``h`` on CPU: yes, except bf16
    through the native kernels, where the recompute is a bf16 GEMM that feeds the sweeps in
    cache, cheaper than writing and re-reading an fp32 logits block (measured: bench/results)."""
    mod = _native_for(h)
    return not (mod is not None and h.dtype == torch.bfloat16 and h.shape[-1] % 2 == 0
                and mod.brgemm_available())


def _native_forward(mod, h, w, y, inv_t):
    n, v = h.shape[0], w.shape[0]
    rows, cols = _block_shape(n, v)
    state = _native_state(n)
    buf = torch.empty(min(n, rows) * min(v, cols))
    workspace = (torch.empty((min(v, cols) + 64) * h.shape[1], dtype=h.dtype)
                 if h.dtype == torch.bfloat16 else None)   # each slice's packed w
    for c0 in range(0, v, cols):        # vocabulary outermost: each slice is packed once
        wn = _NativeWeight(mod, w[c0:c0 + cols], workspace)
        for r0 in range(0, n, rows):
            sl = slice(r0, r0 + rows)
            wn.stats_(h[sl], y[sl], c0, inv_t, [x[sl] for x in state], buf)
    m, s, t, zy = state
    lse = m + torch.log(s)
    ent = lse - t / s
    return zy - lse, ent, lse


def _native_one_pass(mod, h, w, y, inv_t, token_grads, need_h, need_w, entropy_grad):
    n, v = h.shape[0], w.shape[0]
    rows = max(1, min(n, max(_ONE_PASS_MIN_ROWS, _ONE_PASS_ELEMS // v)))
    gd = _grad_dtype(h)
    wn = _NativeWeight(mod, w)          # bf16: one packed copy of w (V*D*2 bytes)
    # float32 without an entropy term (the usual case): the stats sweep leaves e = exp(z - max)
    # in the block and the gradient GEMMs read it as it is (_exp_block_grads): no dz sweep
    store_exp = not entropy_grad and h.dtype == torch.float32
    wg = w.to(gd)
    buf = torch.empty(rows * v)
    dzbuf = None if gd == torch.float32 else torch.empty(rows * v, dtype=gd)
    logp = torch.empty(n)
    ent = torch.empty(n)
    dh = torch.empty(n, h.shape[1], dtype=h.dtype) if need_h else None
    dw = None if not need_w else torch.empty(v, h.shape[1]) if n else torch.zeros(v, h.shape[1])
    for r0 in range(0, n, rows):
        sl = slice(r0, r0 + rows)
        hr, yr = h[sl], y[sl]
        m, s, t, zy = state = _native_state(hr.shape[0])
        z = wn.stats_(hr, yr, 0, inv_t, state, buf, keep=True, store_exp=store_exp)
        lse = m + torch.log(s)
        ent[sl] = lse - t / s
        logp[sl] = zy - lse
        gl, ge = token_grads(sl, logp[sl], ent[sl])
        gl = gl.float().contiguous()
        if store_exp and ge is None:    # dz = gl (1[v = y] - e / s) / T
            _exp_block_grads(z, hr, yr, gl * (-inv_t) / s, gl * inv_t, wg, dh, dw, sl, r0 == 0)
            continue
        if store_exp:                   # an entropy gradient after all: the logits again
            z = wn.logits(hr, buf)
        dz = z if dzbuf is None else dzbuf[:z.numel()].view(z.shape)
        a, b = _dz_coefficients(lse, ent[sl], gl, ge)
        mod.grad_logits(z, yr, 0, inv_t, lse, a, b, gl, inv_t, dz)
        if need_h:
            dh[sl] = _mm_f32(dz, wg)
        if need_w:
            if dz.dtype == torch.float32:
                if r0 == 0:
                    torch.mm(dz.T, hr.float(), out=dw)
                else:
                    dw.addmm_(dz.T, hr.float())
            elif r0 == 0:
                dw.copy_(dz.T @ hr.to(gd))
            else:
                mod.add_bf16_(dw, dz.T @ hr.to(gd))
    return logp, ent, dh, (None if dw is None else dw.to(w.dtype))


def _exp_block_grads(e, hr, yr, coef, gy, w, dh, dw, sl, first):
    """One-pass gradients of a float32 block of whole rows holding ``e = exp(z - max)``, for
    ``dz = coef[:, None] * e + gy * 1[v = y]`` (no entropy term): the row factors go on the
    small ``[rows, D]`` operands instead of a sweep over ``e``:
    ``dh = coef * (e @ w) + gy * w[y]``, ``dw (+)= e.T @ (coef * h) + gy * h`` into rows y."""
    has = (yr >= 0).nonzero().squeeze(1)
    gy = gy[has, None]
    if dh is not None:
        g = torch.mm(e, w, out=dh[sl])
        g.mul_(coef[:, None]).index_add_(0, has, gy * w[yr[has]])
    if dw is not None:
        hs = hr * coef[:, None]
        if first:
            torch.mm(e.T, hs, out=dw)
        else:
            dw.addmm_(e.T, hs)
        dw.index_add_(0, yr[has], gy * hr[has])


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
    mod = _native_for(h)
    if mod is not None:
        return _native_forward(mod, h, w, y, inv_t)
    return _torch_forward(h, w, y, inv_t)


def _mm_f32(a, b):
    """``a @ b`` with a float32 result; bf16/fp16 CUDA operands stay on tensor cores."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return (a @ b).float()


def _addmm_f32_(acc, a, b, alpha):
    """``acc += alpha * a @ b`` into a float32 accumulator; bf16/fp16 operands on tensor cores."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b, alpha=alpha)
        return
    if a.is_cuda:
        try:
            torch.addmm(acc, a, b, alpha=alpha, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    acc.add_(a @ b, alpha=alpha)   # promotes in place: no float32 temporary


def linear_forward_keep(h, w, y, inv_t: float):
    """``linear_forward`` (torch backend) that also returns the float32 ``[N, V]`` logits for
    ``linear_backward(logits=...)``: the caller spends N*V*4 bytes to save the backward's
    logits GEMM (three logits-sized GEMMs in all instead of four)."""
    n, v = h.shape[0], w.shape[0]
    mod = _native_for(h)
    if mod is not None:             # raw logits; the sweeps apply 1/T and the clamp
        m, s, t, zy = state = _native_state(n)
        z = torch.empty(n, v)
        _NativeWeight(mod, w).stats_(h, y, 0, inv_t, state, z.view(-1), keep=True)
    else:                           # scaled, clamped logits
        z = _logits(h, w, inv_t, _needs_clamp(w))
        m = z.amax(1)
        e = torch.sub(z, m[:, None]).exp_()
        s, t, zy = e.sum(1), torch.linalg.vecdot(e, z), _pick(z, y, 0)
        del e
    lse = m + torch.log(s)
    ent = lse - t / s
    return zy - lse, ent, lse, z


def _kept_grad_block(h, logits, gdtype, buf_elems):
    """dL/dz of a block of kept logits (``linear_forward_keep``), for ``linear_backward``."""
    mod = _native_for(h)
    if mod is None:
        def block(z, yc, c0, lse, ent, gl, ge, inv_t):
            dz = _dz_(z.clone(), torch.sub(z, lse[:, None]).exp_(), torch.ones_like(lse),
                      lse - ent, yc, c0, gl, ge)
            return (dz.mul_(inv_t) if inv_t != 1.0 else dz).to(gdtype)
        return block
    dzbuf = torch.empty(buf_elems, dtype=gdtype)

    def block(z, yc, c0, lse, ent, gl, ge, inv_t):  # noqa: E306
        out = dzbuf[:z.numel()].view(z.shape)
        a, b = _dz_coefficients(lse, ent, gl, ge)
        mod.grad_logits(z, yc, c0, inv_t, lse, a, b, gl.float().contiguous(), inv_t, out)
        return out
    return block


def linear_backward(h, w, y, lse, ent, gl, ge, inv_t: float, backend: str,
                    need_h: bool = True, need_w: bool = True, logits=None):
    """Gradients of ``sum(gl * logp + ge * entropy)`` w.r.t. ``h`` and ``w``.

    Walks the [N x V] plane in fixed-size blocks, vocabulary blocks outermost: each block's
    ``dL/dz`` is recomputed from the saved row statistics (fused in one Triton kernel, or
    torch), then two GEMMs fold it into ``dh`` (float32, [N, D]) and into the float32
    accumulator of the current vocabulary slice of ``dw`` ([cols, D]), which is written out
    once.  Extra memory: N*D*4 + cols*D*4 + one block; never O(V*D) in float32.
    ``logits``: the ``[N, V]`` logits kept by ``linear_forward_keep`` (torch backend), read
    instead of recomputed.
    """
    if logits is None and need_h and need_w and _fused_grad_pays(h):
        return _native_grad_gemms(_native_for(h), h, w, y, lse, ent, gl, ge, inv_t)
    n, v = h.shape[0], w.shape[0]
    rows, cols = _block_shape(n, v, h.is_cuda)
    # the blocks go through GEMMs in h's dtype on GPU (tensor cores), float32 on CPU
    gdtype = _grad_dtype(h)
    dh = torch.zeros(n, h.shape[1], dtype=torch.float32, device=h.device) if need_h else None
    dw = torch.zeros_like(w) if need_w else None
    if backend == "triton":
        grad_block = _triton_module().grad_logits
        ge = torch.zeros_like(gl) if ge is None else ge
    elif _native_for(h) is not None:
        mod = _native_for(h)
        buf = torch.empty(min(n, rows) * min(v, cols))
        dzbuf = torch.empty(buf.numel(), dtype=gdtype)
        prepared = {}                 # the current vocabulary slice, packed once

        def grad_block(hc, wc, yc, c0, lse_, ent_, gl_, ge_, inv_t_, out_dtype):  # noqa: E306
            if prepared.get("c0") != c0:
                prepared.update(c0=c0, wn=_NativeWeight(mod, wc))
            out = dzbuf[:hc.shape[0] * wc.shape[0]].view(hc.shape[0], wc.shape[0])
            return prepared["wn"].grad(hc, yc, c0, inv_t_, lse_, ent_, gl_, ge_, buf, out)
    else:
        clamp = _needs_clamp(w)
        def grad_block(*args):  # noqa: E306
            return _torch_grad_logits(*args, clamp=clamp)
    if logits is not None:
        kept_block = _kept_grad_block(h, logits, gdtype, min(n, rows) * min(v, cols))
    row_blocks = [slice(r0, r0 + rows) for r0 in range(0, n, rows)]
    if not h.is_cuda:  # skip blocks nothing flows into (e.g. all ignored); no host sync on GPU
        row_blocks = [sl for sl in row_blocks
                      if bool(gl[sl].any() or (ge is not None and ge[sl].any()))]
    # CPU bf16 gradient GEMMs over all rows at once (one row block): their bf16 products go
    # straight into dw, and into dh through the native bf16 -> fp32 add (no fp32 temporaries)
    direct = (not h.is_cuda and gdtype == torch.bfloat16 and len(row_blocks) == 1
              and row_blocks[0] == slice(0, rows) and n <= rows and _native_for(h) is not None)
    for c0 in range(0, v, cols):
        wc = w[c0:c0 + cols]
        wg = wc.to(gdtype)
        dw_acc = None
        for sl in row_blocks:
            hc = h[sl]
            if logits is None:
                dz = grad_block(hc, wc, y[sl], c0, lse[sl], ent[sl], gl[sl],
                                None if ge is None else ge[sl], inv_t, gdtype)
            else:
                dz = kept_block(logits[sl, c0:c0 + cols], y[sl], c0, lse[sl], ent[sl], gl[sl],
                                None if ge is None else ge[sl], inv_t)
            if direct:
                if need_h:
                    _native_for(h).add_bf16_(dh, torch.mm(dz, wg))
                if need_w:
                    dw_acc = torch.mm(hc.to(gdtype).T, dz).T   # the faster layout on CPU
                continue
            if need_h:
                dh[sl] += _mm_f32(dz, wg)
            if need_w:
                part = _mm_f32(dz.T, hc.to(gdtype))
                dw_acc = part if dw_acc is None else dw_acc.add_(part)
        if need_w and dw_acc is not None:
            dw[c0:c0 + cols] = dw_acc
    return (dh.to(h.dtype) if need_h else None), dw


def linear_one_pass(h, w, y, inv_t: float, token_grads, need_h: bool = True,
                    need_w: bool = True, entropy_grad: bool = True):
    """Forward *and* backward in one walk over the [N x V] plane (torch backend).

    For objectives whose gradient with respect to a token's log-prob and entropy is known as
    soon as that token's own log-prob and entropy are (token-level clipping, dual clip, k3
    KL, an entropy bonus, a normalizer fixed up front): ``token_grads(sl, logp, ent)`` returns
    ``(g_logp, g_ent)`` for the rows ``sl`` (``g_ent`` None when the objective does not use
    the entropy).  Each block of rows x the whole vocabulary is computed once: logits,
    log-sum-exp, log-prob, entropy, the objective's gradient, ``dz`` (in the logits' buffer),
    then ``dh[rows] = dz @ w`` and ``dw += dz.T @ h[rows]``: three logits-sized GEMMs in all,
    no recompute.  Workspace: one ``[rows, V]`` float32 block (``_ONE_PASS_ELEMS``, at least
    ``_ONE_PASS_MIN_ROWS`` rows) plus cache-sized slices; ``dw`` accumulates in float32 (an
    extra ``[V, D]`` float32 buffer only when ``w`` is not float32).  ``entropy_grad=False``
    promises that ``g_ent`` is None (no entropy term): the native float32 path then builds
    ``dz`` from the stats sweep's ``exp(z - max)`` without a second exp (a ``g_ent`` after all
    costs one more logits GEMM for that block, still exact).

    Returns ``(logp, ent, dh, dw)``: float32 ``[N]``, ``[N]``, and the gradients of
    ``sum(g_logp * logp + g_ent * ent)`` (``None`` where not needed).
    """
    mod = _native_for(h)
    if mod is not None:
        return _native_one_pass(mod, h, w, y, inv_t, token_grads, need_h, need_w, entropy_grad)
    n, v = h.shape[0], w.shape[0]
    dev = h.device
    budget = _ONE_PASS_ELEMS_CUDA if h.is_cuda else _ONE_PASS_ELEMS
    rows = max(1, min(n, max(_ONE_PASS_MIN_ROWS, budget // v)))
    step = rows if h.is_cuda else max(1, min(rows, _SLICE_ELEMS // v))
    clamp = _needs_clamp(w)
    cd, gd = _compute_dtype(h), _grad_dtype(h)
    wc, wg = w.to(cd), w.to(gd)     # w itself, unless the CPU computes in fp32 for bf16 w
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    ent = torch.empty_like(logp)
    dh = torch.empty(n, h.shape[1], dtype=h.dtype, device=dev) if need_h else None
    dw = None
    if need_w:
        dw = torch.zeros(v, h.shape[1], dtype=torch.float32, device=dev)
    for r0 in range(0, n, rows):
        hr = h[r0:r0 + rows]
        z = _logits(hr.to(cd), wc, inv_t, clamp)            # [R, V] float32, becomes dz
        for s0 in range(0, z.shape[0], step):               # elementwise work, cache-sized
            zs = z[s0:s0 + step]
            sl = slice(r0 + s0, r0 + s0 + zs.shape[0])
            m = zs.amax(1)
            e = torch.sub(zs, m[:, None]).exp_()
            norm = e.sum(1)
            lse = m + norm.log()
            ent[sl] = lse - torch.linalg.vecdot(e, zs) / norm
            logp[sl] = _pick(zs, y[sl], 0) - lse
            gl, ge = token_grads(sl, logp[sl], ent[sl])
            _dz_(zs, e, norm, lse - ent[sl], y[sl], 0, gl, ge)
        dz = z.to(gd)
        if need_h:
            g = _mm_f32(dz, wg)
            dh[r0:r0 + rows] = g.mul_(inv_t) if inv_t != 1.0 else g
        if need_w:
            _addmm_f32_(dw, dz.T, hr.to(gd), inv_t)
    return logp, ent, dh, (None if dw is None else dw.to(w.dtype))
