"""Vocabulary-parallel log-probs and loss (gloo, 2 and 4 processes): each rank holds a slice of
the lm_head's rows (uneven splits), the results equal the 1-process op and the float64 oracle."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from fastgrpo import fused_logprobs, grpo_loss
from fastgrpo.ops.logprobs import naive_logprobs
from gloo_helpers import spawn_gloo

N_ROWS, D, V = 37, 24, 203   # V prime: no split is even


def _splits(world):
    """Uneven contiguous row counts summing to V (the last rank gets the remainder)."""
    sizes = [V // world + (7 * r if r < world - 1 else 0) for r in range(world)]
    sizes[-1] = V - sum(sizes[:-1])
    assert all(s > 0 for s in sizes) and len(set(sizes)) > 1
    return sizes


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N_ROWS, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.7
    y = torch.randint(0, V, (N_ROWS,), generator=g)
    y[::5] = -100                                 # ignored targets
    y[1] = V - 1                                  # last vocabulary row: the last shard
    y[2] = 0
    adv = torch.randn(N_ROWS, generator=g)
    old = (torch.randn(N_ROWS, generator=g) * 0.1)
    return h, w, y, adv, old


def _close(a, b, what, rtol=1e-5, scale=1e-5):
    """fp32 noise: relative, plus an absolute part scaled to the tensor's largest entry (sums
    over the vocabulary cancel, so small entries carry the large ones' rounding)."""
    atol = scale * float(b.abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _check(rank, world, seed):
    h, w, y, adv, old = _inputs(seed)
    sizes = _splits(world)
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    temperature = 0.8
    group = dist.group.WORLD

    # --- fused_logprobs: values, and gradients through both outputs
    gl, ge = torch.randn(N_ROWS, generator=torch.Generator().manual_seed(seed + 1)), \
        torch.randn(N_ROWS, generator=torch.Generator().manual_seed(seed + 2))

    def run(weight, **kw):
        hh = h.clone().requires_grad_()
        ww = weight.clone().requires_grad_()
        logp, ent = fused_logprobs(hh, ww, y, temperature=temperature, return_entropy=True, **kw)
        ((logp * gl).sum() + (ent * ge).sum()).backward()
        return logp.detach(), ent.detach(), hh.grad, ww.grad

    lp1, en1, dh1, dw1 = run(w)                                   # 1 process, whole weight
    lpp, enp, dhp, dwp = run(w[rows], vocab_parallel_group=group)  # this rank's shard
    _close(lpp, lp1, "logp")
    _close(enp, en1, "entropy")
    _close(dhp, dh1, "d hidden (summed over the group)")
    _close(dwp, dw1[rows], "d weight shard")
    # and the float64 oracle
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    lpr, enr = naive_logprobs(h64, w64, y, temperature=temperature)
    ((lpr * gl.double()).sum() + (enr * ge.double()).sum()).backward()
    _close(lpp.double(), lpr.detach(), "logp vs float64")
    _close(enp.double(), enr.detach(), "entropy vs float64")
    _close(dhp.double(), h64.grad, "d hidden vs float64")
    _close(dwp.double(), w64.grad[rows], "d weight vs float64")
    assert (lpp[y == -100] == 0).all() and (enp[y == -100] == 0).all()

    # --- grpo_loss, padded layout with a KL and an entropy bonus (token-local: the 1-process
    # call takes its one-pass path) and the sequence-level ratio (two-pass)
    b, t = 1, N_ROWS
    for kw in (dict(beta=0.05, ref_logp=(old - 0.05).reshape(b, t), entropy_coef=0.01),
               dict(importance_sampling_level="sequence", loss_type="dapo")):
        def loss_of(weight, **extra):
            hh = h.reshape(b, t, D).clone().requires_grad_()
            ww = weight.clone().requires_grad_()
            loss, m = grpo_loss(hh, ww, y.reshape(b, t), adv.reshape(b, t),
                                old_logp=old.reshape(b, t), temperature=temperature,
                                **kw, **extra)
            loss.backward()
            return loss.detach(), m, hh.grad, ww.grad
        l1, m1, dh1, dw1 = loss_of(w)
        lp, mp_, dhp, dwp = loss_of(w[rows], vocab_parallel_group=group)
        _close(lp, l1, f"loss {kw}")
        for k in ("entropy", "logp", "clip_ratio/region_mean"):
            _close(mp_[k], m1[k], f"metric {k}")
        _close(dhp, dh1, f"grpo d hidden {kw}")
        _close(dwp, dw1[rows], f"grpo d weight {kw}")

    # --- refusals, each a clear error (the same on every rank)
    with pytest.raises(ValueError, match="outside"):
        fused_logprobs(h, w[rows], torch.full((N_ROWS,), V), vocab_parallel_group=group)
    with pytest.raises(ValueError, match="reference"):
        fused_logprobs(h, w[rows], y, backend="reference", vocab_parallel_group=group)


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_equals_one_process(world):
    spawn_gloo(_check, world, 10 + world)


def test_vocab_parallel_needs_a_process_group():
    h, w, y, _, _ = _inputs(0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fused_logprobs(h, w, y, vocab_parallel_group=object())


def _check_triton(rank, world):
    """The triton backend's kernels (interpreted on CPU) on each shard, against the 1-process
    torch op; triton is imported here first, with the interpreter on."""
    os.environ["TRITON_INTERPRET"] = "1"
    h, w, y, _, _ = _inputs(3)
    sizes = _splits(world)
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    gl = torch.randn(N_ROWS, generator=torch.Generator().manual_seed(4))

    def run(weight, **kw):
        hh, ww = h.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, ent = fused_logprobs(hh, ww, y, return_entropy=True, **kw)
        ((logp * gl).sum() + ent.sum()).backward()
        return logp.detach(), ent.detach(), hh.grad, ww.grad

    tri = run(w[rows], backend="triton", vocab_parallel_group=dist.group.WORLD)
    one = run(w, backend="torch")
    for name, a, b in zip(("logp", "entropy", "d hidden", "d weight"), tri,
                          (one[0], one[1], one[2], one[3][rows])):
        _close(a, b, f"triton shard: {name}")


def test_vocab_parallel_triton_backend():
    pytest.importorskip("triton")
    spawn_gloo(_check_triton, 2)
