"""Group-relative advantages: per-group z-score of rewards, one Triton program per group.

``rewards`` is ``[G, S]`` float32 (``G`` groups of ``S`` completions of one prompt).  For each
group::

    mean = sum(r) / S
    std  = sqrt(sum((r - mean)^2) / (S - 1))      (unbiased; S == 1 -> std = 0)
    adv  = (r - mean) / (std + eps)     if scale_by_std else  r - mean

A group whose rewards are all equal (max == min, including S == 1) gets exactly 0, whatever
rounding ``r - mean`` would produce.  Cost: ``G * S`` floats read and written once; the kernel
exists so the advantage step does not launch a dozen small torch ops per batch, and it is
memory-bound by construction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["group_zscore", "CONFIGS", "KERNELS"]

# Compile-test configurations: BLOCK is next_power_of_2(S); num_warps 1 for small groups.
CONFIGS = {"group_zscore": [dict(BLOCK=16, num_warps=1, num_stages=1),
                            dict(BLOCK=1024, num_warps=4, num_stages=1)]}


@triton.jit(do_not_specialize=["S"])
def _group_zscore_kernel(r_ptr, out_ptr, S, stride_g, eps,
                         BLOCK: tl.constexpr, SCALE: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < S
    r = tl.load(r_ptr + g * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    n = S.to(tl.float32)
    mean = tl.sum(r, axis=0) / n
    diff = tl.where(mask, r - mean, 0.0)
    hi = tl.max(tl.where(mask, r, float("-inf")), axis=0)
    lo = tl.min(tl.where(mask, r, float("inf")), axis=0)
    if SCALE:
        var = tl.sum(diff * diff, axis=0) / tl.maximum(n - 1.0, 1.0)
        std = tl.where(S > 1, tl.sqrt(var), 0.0)
        adv = diff / (std + eps)
    else:
        adv = diff
    adv = tl.where(hi == lo, 0.0, adv)
    tl.store(out_ptr + g * S + offs, adv, mask=mask)


KERNELS = {"group_zscore": _group_zscore_kernel}


def group_zscore(rewards: torch.Tensor, eps: float = 1e-4, scale_by_std: bool = True
                 ) -> torch.Tensor:
    """Per-row z-score of ``rewards [G, S]`` (float32); returns a new contiguous ``[G, S]``."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2:
        raise ValueError(f"rewards must be a [groups, group_size] tensor, got "
                         f"{getattr(rewards, 'shape', type(rewards).__name__)}")
    if rewards.dtype != torch.float32:
        raise TypeError(f"rewards must be float32, got {rewards.dtype}")
    if not (eps >= 0):
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    g, s = rewards.shape
    if s > 65536:
        raise ValueError(f"group size {s} too large for one program (max 65536)")
    r = rewards if rewards.stride(1) == 1 else rewards.contiguous()
    out = torch.empty(g, s, dtype=torch.float32, device=rewards.device)
    if g == 0 or s == 0:
        return out
    block = max(16, triton.next_power_of_2(s))
    warps = 1 if block <= 256 else 4 if block <= 4096 else 8
    _group_zscore_kernel[(g,)](r, out, s, r.stride(0), float(eps), BLOCK=block,
                               SCALE=bool(scale_by_std), num_warps=warps)
    return out
