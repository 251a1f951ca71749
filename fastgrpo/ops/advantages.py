"""Group-relative advantages: outcome (one scalar per completion) and process (per step).

Outcome (GRPO / StepGRPO): the completions of one prompt form a group and
``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)`` with the unbiased std, as R1-VL publishes it.
``scale="batch"`` divides by the std over the whole batch instead; ``scale="none"`` keeps
``r_i - mean_g(r)`` (Dr. GRPO).  A group whose rewards are all equal gets exactly 0.

Process supervision (DeepSeekMath, section 4.1.3): every step of every completion in a group
has a reward; all step rewards of the group are normalized together, and a token's advantage
is the sum of the normalized rewards of the steps at or after the token's own step.
"""

from __future__ import annotations

import math

import torch

from fastgrpo.ops.logprobs import BACKENDS

__all__ = ["group_advantages", "process_advantages", "constant_groups", "group_index",
           "SCALES"]

SCALES = ("group", "batch", "none")


def group_index(b: int, group_size, group_ids, device) -> torch.Tensor:
    """Dense group index in [0, num_groups) for each of the b rows."""
    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size (consecutive groups) or group_ids")
    if group_ids is not None:
        gid = torch.as_tensor(group_ids, device=device)
        if gid.dim() != 1 or gid.numel() != b:
            raise ValueError(f"group_ids must have one entry per completion ({b}), got shape "
                             f"{tuple(gid.shape)}")
        return torch.unique(gid, return_inverse=True)[1]
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if b % group_size:
        raise ValueError(f"{b} completions do not split into groups of {group_size}")
    return torch.arange(b, device=device) // group_size


def _constant(r: torch.Tensor, gid: torch.Tensor) -> torch.Tensor:
    g = int(gid.max()) + 1
    rmax = r.new_full((g,), -math.inf).scatter_reduce_(0, gid, r, "amax")
    rmin = r.new_full((g,), math.inf).scatter_reduce_(0, gid, r, "amin")
    return (rmax == rmin)[gid]


def constant_groups(rewards, *, group_size: int | None = None, group_ids=None) -> torch.Tensor:
    """``[B]`` bool, True where a completion's group has all-equal rewards.

    The one definition of a group without signal: its advantages are exactly 0 (see
    :func:`group_advantages`), and DAPO's dynamic sampling drops it."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    return _constant(r, group_index(r.numel(), group_size, group_ids, r.device))


def _segment_zscore(r: torch.Tensor, gid: torch.Tensor, scale: str, eps: float) -> torch.Tensor:
    """z-score of float64 rewards r within the groups gid (torch path, any grouping)."""
    g = int(gid.max()) + 1
    cnt = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, gid, torch.ones_like(r))
    mean = torch.zeros_like(cnt).index_add_(0, gid, r) / cnt
    centred = r - mean[gid]
    constant = _constant(r, gid)
    if scale == "group":
        var = torch.zeros_like(cnt).index_add_(0, gid, centred * centred) / (cnt - 1).clamp(min=1)
        centred = centred / (var.sqrt()[gid] + eps)
    elif scale == "batch":
        std = r.std(unbiased=True) if r.numel() > 1 else r.new_zeros(())
        centred = centred / (std + eps)
    return torch.where(constant, torch.zeros_like(centred), centred)


def group_advantages(rewards, *, group_size: int | None = None, group_ids=None,
                     scale: str = "group", eps: float = 1e-4, weights=None,
                     backend: str = "auto") -> torch.Tensor:
    """Group-normalized advantages, one per completion.

    Args:
        rewards: ``[B]`` rewards, or ``[B, K]`` reward components combined with ``weights``
            (``[K]``, default all ones).  Any float dtype; NaN or inf is an error.
        group_size: completions ``[g*G, (g+1)*G)`` share a prompt.  Or:
        group_ids: ``[B]`` group label per completion (any integers, any order).
        scale: ``"group"`` (unbiased std within the group, as published), ``"batch"`` (std
            over the batch) or ``"none"`` (no std division, Dr. GRPO).
        eps: added to the std.
        backend: ``"auto"`` runs a Triton kernel for CUDA tensors grouped by ``group_size``
            with ``scale`` group/none, torch otherwise; ``"torch"`` forces the torch path.

    Returns:
        float32 ``[B]`` advantages; a group whose rewards are all equal (a group of one
        included) gets exactly 0.
    """
    r = torch.as_tensor(rewards)
    if not (r.is_floating_point() or r.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"rewards must be numeric, got {r.dtype}")
    if r.dim() == 2:
        w = torch.ones(r.shape[1], dtype=torch.float64) if weights is None \
            else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (r.shape[1],):
            raise ValueError(f"weights must have one entry per reward component ({r.shape[1]}), "
                             f"got shape {tuple(w.shape)}")
        r = r.double() @ w.to(r.device)
    elif weights is not None:
        raise ValueError("weights apply to [B, K] reward components; rewards is 1-D")
    if r.dim() != 1 or r.numel() == 0:
        raise ValueError(f"rewards must be [B] or [B, K] with B > 0, got shape {tuple(r.shape)}")
    if not torch.isfinite(r).all():
        bad = int(torch.nonzero(~torch.isfinite(r))[0])
        raise ValueError(f"reward of completion {bad} is {float(r[bad])}; rewards must be finite")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    gid = group_index(r.numel(), group_size, group_ids, r.device)

    use_triton = backend == "triton" or (backend == "auto" and r.is_cuda)
    if use_triton and group_ids is None and scale != "batch":
        from fastgrpo_kernels.advantages import group_zscore
        g = r.float().contiguous().view(-1, group_size)
        return group_zscore(g, eps, scale == "group").view(-1)
    return _segment_zscore(r.double(), gid, scale, eps).float()


def process_advantages(step_rewards, token_step_index, *, group_size: int | None = None,
                       group_ids=None, step_mask=None, eps: float = 1e-4) -> torch.Tensor:
    """Per-token advantages from per-step rewards (DeepSeekMath process supervision).

    Args:
        step_rewards: ``[B, S]`` reward of each step of each completion (padded).
        token_step_index: ``[B, T]`` index of the step each completion token belongs to;
            ``-1`` for tokens outside any step (they get advantage 0).
        group_size / group_ids: grouping of the B completions, as in ``group_advantages``.
        step_mask: ``[B, S]`` bool, which steps exist (default: the finite entries).
        eps: added to the std.

    Returns:
        float32 ``[B, T]``: ``A[b, t] = sum_{j >= s(t)} (r[b, j] - mean) / (std + eps)`` over
        existing steps, mean and unbiased std taken over all steps of the group.
    """
    r = torch.as_tensor(step_rewards, dtype=torch.float64)
    idx = torch.as_tensor(token_step_index, device=r.device).long()
    if r.dim() != 2 or idx.dim() != 2 or idx.shape[0] != r.shape[0]:
        raise ValueError(f"step_rewards must be [B, S] and token_step_index [B, T] with the same "
                         f"B, got {tuple(r.shape)} and {tuple(idx.shape)}")
    b, s = r.shape
    mask = torch.isfinite(r) if step_mask is None else torch.as_tensor(step_mask, device=r.device)
    if mask.shape != r.shape:
        raise ValueError(f"step_mask shape {tuple(mask.shape)} must equal step_rewards "
                         f"shape {tuple(r.shape)}")
    if not torch.isfinite(r[mask]).all():
        raise ValueError("step rewards of existing steps must be finite")
    if bool(((idx < -1) | (idx >= s)).any()):
        bad = int(idx[(idx < -1) | (idx >= s)][0])
        raise ValueError(f"token_step_index {bad} is outside [-1, {s})")
    gid_row = group_index(b, group_size, group_ids, r.device)
    gid_step = gid_row[:, None].expand(b, s)[mask]
    norm = torch.zeros_like(r)
    norm[mask] = _segment_zscore(r[mask], gid_step, "group", eps)
    # suffix sums over steps: a token's advantage counts its own step and every later one
    suffix = norm.flip(1).cumsum(1).flip(1)
    adv = suffix.gather(1, idx.clamp(min=0))
    return torch.where(idx >= 0, adv, torch.zeros_like(adv)).float()
