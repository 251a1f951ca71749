"""fused_logprobs (torch backend) against a float64 full-logits reference and Liger-Kernel.

The interpreted Triton backend gets the same checks in test_kernels_triton.py.
"""

import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

import fastgrpo.ops.blocks as lp_mod  # the block machinery under fused_logprobs
from fastgrpo import fused_logprobs
from fastgrpo.ops.logprobs import naive_logprobs

pytestmark = pytest.mark.usefixtures("native_mode")  # native kernels and the fallback

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
       torch.float16: dict(atol=1e-2, rtol=1e-2)}


@pytest.fixture(params=["one_block", "many_blocks"])
def blocks(request, monkeypatch):
    """Run each test with one block and with a block grid that does not divide N or V."""
    if request.param == "many_blocks":
        monkeypatch.setattr(lp_mod, "_MAX_BLOCK_ROWS", 7)
        monkeypatch.setattr(lp_mod, "_BLOCK_ELEMS", 7 * 37)   # 7 rows x 37 vocab columns
    return request.param


def make(n, d, v, dtype, seed, lead=None, ignore_frac=0.0, ignore_index=-100, logit_std=2.0):
    """Random inputs whose logits have standard deviation ~logit_std (LM-like: 1..3)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if lead is None else lead
    h = torch.randn(*shape, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d ** 0.5 * logit_std).to(dtype).requires_grad_()
    y = torch.randint(0, v, shape, generator=g)
    if ignore_frac:
        y[torch.rand(shape, generator=g) < ignore_frac] = ignore_index
    return h, w, y


def upstream(y, which, seed):
    g = torch.Generator().manual_seed(seed + 1)
    a = torch.randn(y.shape, generator=g, dtype=torch.float64)
    b = torch.randn(y.shape, generator=g, dtype=torch.float64)
    if which == "logp":
        return a, None
    if which == "entropy":
        return None, b
    return a, b


def loss_of(logp, ent, a, b):
    out = 0
    if a is not None:
        out = out + (logp.double() * a).sum()
    if b is not None:
        out = out + (ent.double() * b).sum()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["logp", "entropy", "both"])
@pytest.mark.parametrize("n,d,v,temperature", [(1, 8, 5, 1.0), (29, 24, 131, 0.7),
                                                 (50, 16, 300, 1.3)])
def test_values_and_grads_match_float64(blocks, dtype, which, n, d, v, temperature):
    seed = zlib.crc32(repr((n, d, v, which, str(dtype))).encode())
    h, w, y = make(n, d, v, dtype, seed, ignore_frac=0.2 if n > 1 else 0.0)
    logp, ent = fused_logprobs(h, w, y, temperature=temperature, return_entropy=True,
                               backend="torch")
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == y.shape
    hr = h.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    rlogp, rent = naive_logprobs(hr, wr, y, temperature=temperature)
    tol = TOL[dtype]
    torch.testing.assert_close(logp.double(), rlogp.detach(), **tol)
    torch.testing.assert_close(ent.double(), rent.detach(), **tol)

    a, b = upstream(y, which, seed)
    gh, gw = torch.autograd.grad(loss_of(logp, ent, a, b), (h, w))
    rgh, rgw = torch.autograd.grad(loss_of(rlogp, rent, a, b), (hr, wr))
    assert gh.dtype == dtype and gw.dtype == dtype
    scale_h, scale_w = rgh.abs().max().clamp(min=1e-6), rgw.abs().max().clamp(min=1e-6)
    torch.testing.assert_close(gh.double() / scale_h, rgh / scale_h, **tol)
    torch.testing.assert_close(gw.double() / scale_w, rgw / scale_w, **tol)


@pytest.mark.parametrize("seed", range(4))
def test_peaked_distributions_entropy_grad(seed):
    """Logits with std 8: entropy gradients -p (z - E[z]) cancel two O(|z|) numbers, so fp32
    carries an absolute error ~ eps32 * |z| * p; the tolerance is scaled accordingly."""
    h, w, y = make(16, 8, 50, torch.float32, 100 + seed, logit_std=8.0)
    logp, ent = fused_logprobs(h, w, y, return_entropy=True)
    hr, wr = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rlogp, rent = naive_logprobs(hr, wr, y)
    torch.testing.assert_close(ent.double(), rent.detach(), atol=1e-4, rtol=1e-4)
    gh, gw = torch.autograd.grad((logp + ent).sum(), (h, w))
    rgh, rgw = torch.autograd.grad((rlogp + rent).sum(), (hr, wr))
    zmax = float((hr @ wr.T).detach().abs().max())
    torch.testing.assert_close(gh.double(), rgh, atol=3e-6 * zmax * hr.abs().max().item(),
                               rtol=1e-3)
    torch.testing.assert_close(gw.double(), rgw, atol=3e-6 * zmax * 16, rtol=1e-3)


def test_leading_dims_ignore_index_and_no_grad_at_ignored(blocks):
    h, w, y = make(0, 12, 97, torch.float32, 3, lead=(3, 11), ignore_frac=0.3, ignore_index=7)
    y[y == 7] = 8  # make 7 a pure ignore marker ...
    y[0, :4] = 7   # ... used here
    logp, ent = fused_logprobs(h, w, y, return_entropy=True, ignore_index=7, temperature=2.0)
    assert logp.shape == ent.shape == (3, 11)
    assert (logp[0, :4] == 0).all() and (ent[0, :4] == 0).all()
    (logp.sum() + ent.sum()).backward()
    assert (h.grad[0, :4] == 0).all()
    assert h.grad[0, 4:].abs().sum() > 0
    rlogp, rent = naive_logprobs(h.detach(), w.detach(), y, temperature=2.0, ignore_index=7)
    torch.testing.assert_close(logp.double(), rlogp, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ent.double(), rent, atol=2e-5, rtol=2e-5)


def test_only_logp_returned_and_hidden_only_grad():
    h, w, y = make(9, 8, 40, torch.float32, 5)
    w = w.detach()
    logp = fused_logprobs(h, w, y)
    assert isinstance(logp, torch.Tensor)
    logp.sum().backward()
    hr = h.detach().double().requires_grad_()
    naive_logprobs(hr, w, y)[0].sum().backward()
    torch.testing.assert_close(h.grad.double(), hr.grad, atol=1e-5, rtol=1e-5)


def test_all_targets_ignored_gives_zero_and_zero_grads():
    h, w, y = make(6, 8, 20, torch.float32, 6)
    y[:] = -100
    logp, ent = fused_logprobs(h, w, y, return_entropy=True)
    assert (logp == 0).all() and (ent == 0).all()
    (logp.sum() + ent.sum()).backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()


def test_extreme_logits_stay_finite():
    """Huge logit gaps (p underflows to exactly 0 for most columns) keep entropy finite."""
    h, w, y = make(8, 4, 64, torch.float32, 7)
    with torch.no_grad():
        h.mul_(300.0)
    logp, ent = fused_logprobs(h, w, y, return_entropy=True)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    rlogp, rent = naive_logprobs(h.detach(), w.detach(), y)
    torch.testing.assert_close(logp.double(), rlogp, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(ent.double(), rent, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shift", [-2000.0, 2000.0])
def test_logits_far_from_zero(blocks, shift):
    """All logits near +-2000: an online max started at 0 instead of -inf under/overflows."""
    d, v = 8, 90
    h, w, y = make(12, d, v, torch.float32, 9)
    with torch.no_grad():
        w[:, 0] = 1.0          # every logit gets h[:, 0] * 1 ...
        h[:, 0] = shift        # ... = shift, plus O(1) from the other dimensions
    logp, ent = fused_logprobs(h, w, y, return_entropy=True)
    rlogp, rent = naive_logprobs(h.detach(), w.detach(), y)
    torch.testing.assert_close(logp.double(), rlogp, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(ent.double(), rent, atol=1e-3, rtol=1e-4)
    logp.sum().backward()
    assert torch.isfinite(h.grad).all()


def test_minus_inf_weight_row_contributes_nothing(blocks):
    """A vocabulary row of -inf weights (a masked token) gets probability 0: log-probs,
    entropy and the weight gradient equal those of the vocabulary without that row.  (dH is
    dz @ W and picks up 0 * -inf = nan from that row in any GEMM, so it is not compared.)"""
    h, w, y = make(9, 6, 40, torch.float32, 10)
    y[y == 5] = 6
    with torch.no_grad():
        w[5] = float("-inf")
        h.abs_()  # positive hidden: the row's logits are -inf, never nan (-inf * 0)
    logp, ent = fused_logprobs(h, w, y, return_entropy=True)
    keep = torch.arange(40) != 5
    y_kept = y - (y > 5).long()
    h2 = h.detach().clone().requires_grad_()
    w2 = w.detach()[keep].clone().requires_grad_()
    rlogp, rent = naive_logprobs(h2, w2, y_kept)
    torch.testing.assert_close(logp.double(), rlogp.detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ent.double(), rent.detach(), atol=2e-5, rtol=2e-5)
    (logp.sum() + ent.sum()).backward()
    (rlogp.sum() + rent.sum()).backward()
    torch.testing.assert_close(w.grad[keep].double(), w2.grad.double(), atol=2e-5, rtol=2e-5)
    assert (w.grad[5] == 0).all()


def test_reference_backend_matches_torch_backend():
    h, w, y = make(10, 8, 33, torch.float32, 8, ignore_frac=0.2)
    a, b = fused_logprobs(h, w, y, return_entropy=True, backend="reference")
    c, d = fused_logprobs(h, w, y, return_entropy=True, backend="torch")
    torch.testing.assert_close(a.float(), c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.float(), d, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_agrees_with_liger_kernel(temperature):
    """Peer check: Liger-Kernel's chunked selective log-prob (its GRPO loss's log-prob path)."""
    liger = pytest.importorskip("liger_kernel.chunked_loss.fused_linear_ppo")
    h, w, y = make(0, 32, 1000, torch.float32, 11, lead=(4, 13))
    logp = fused_logprobs(h, w, y, temperature=temperature)
    h2 = h.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    ref = liger.LigerFusedLinearPPOBase.chunk_forward(h2, w2, y, temperature=temperature)
    torch.testing.assert_close(logp, ref.float(), atol=1e-5, rtol=1e-5)
    upstream_g = torch.randn(y.shape, generator=torch.Generator().manual_seed(12))
    gh, gw = torch.autograd.grad((logp * upstream_g).sum(), (h, w))
    rgh, rgw = torch.autograd.grad((ref * upstream_g).sum(), (h2, w2))
    torch.testing.assert_close(gh, rgh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, rgw, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case,exc,match", [
    ("d_mismatch", ValueError, r"disagree on D"),
    ("target_high", ValueError, r"target 20 is outside \[0, 20\)"),
    ("target_negative", ValueError, r"target -3 is outside"),
    ("int_hidden", TypeError, r"floating-point.*torch.int64"),
    ("float_targets", TypeError, r"integer tensor.*float32"),
    ("dtype_mismatch", TypeError, r"share a dtype"),
    ("targets_shape", ValueError, r"targets shape \(5,\) must equal"),
    ("device_mismatch", ValueError, r"one device"),
    ("temperature", ValueError, r"temperature must be a positive finite number, got 0"),
    ("backend", ValueError, r"backend must be one of .* got 'cuda'"),
])
def test_bad_input_raises_clear_error(case, exc, match):
    h, w, y = torch.randn(4, 8), torch.randn(20, 8), torch.randint(0, 20, (4,))
    kw = {}
    if case == "d_mismatch":
        w = torch.randn(20, 9)
    elif case == "target_high":
        y[1] = 20
    elif case == "target_negative":
        y[2] = -3
    elif case == "int_hidden":
        h = torch.ones(4, 8, dtype=torch.long)
    elif case == "float_targets":
        y = y.float()
    elif case == "dtype_mismatch":
        w = w.double()
    elif case == "targets_shape":
        y = torch.randint(0, 20, (5,))
    elif case == "device_mismatch":
        w = w.to("meta")
    elif case == "temperature":
        kw["temperature"] = 0
    elif case == "backend":
        kw["backend"] = "cuda"
    with pytest.raises(exc, match=match):
        fused_logprobs(h, w, y, **kw)


# ----------------------------------------------------------------------------- memory


MEMORY_SCRIPT = textwrap.dedent("""
    import sys, torch
    from fastgrpo import fused_logprobs
    torch.manual_seed(0)
    n, d, v = 4096, 32, 65536          # logits would be n*v*4 bytes = 1 GiB in fp32
    h = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(v, d) / d ** 0.5).requires_grad_()
    y = torch.randint(0, v, (n,))
    _ = fused_logprobs(h[:8], w, y[:8], return_entropy=True)  # warm up allocator and kernels
    def status(field):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status")
                    if l.startswith(field + ":"))
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
    base = status("VmRSS")
    logp, ent = fused_logprobs(h, w, y, return_entropy=True)
    (logp.sum() + 0.1 * ent.sum()).backward()
    peak = status("VmHWM")
    print(base, peak, n * v * 4, flush=True)
""")


@pytest.mark.slow
def test_torch_backend_peak_memory_does_not_grow_with_n_times_v():
    """Peak RSS growth during fwd+bwd at a shape whose logits would take 1 GiB stays < 200 MiB.

    Measured in a fresh process: the kernel's RSS high-water mark is reset right before the
    call (Linux /proc/self/clear_refs), so VmHWM - VmRSS is the call's peak.  The CPU block budget
    is 16 MiB of fp32; forward/backward keep a few block-sized temporaries alive, plus the
    fp32 gradient accumulators (N*D + V*D = 8.5 MiB here).
    """
    # glibc keeps freed large blocks in a heap that does not shrink once its dynamic mmap
    # threshold has risen; pinned at 1 MiB, large tensors are mmap'd and unmapped when freed,
    # so RSS tracks live memory (234 MiB allocator residue vs 75 MiB without, measured)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "1048576"}
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    base, peak, logits_bytes = map(int, out.stdout.split())
    growth = peak - base
    print(f"peak RSS growth {growth / 2**20:.0f} MiB; full logits would be "
          f"{logits_bytes / 2**20:.0f} MiB")
    assert logits_bytes >= 2**30
    assert growth < 200 * 2**20, f"peak grew by {growth / 2**20:.0f} MiB"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_logits_matches_float64_without_a_recompute(blocks, dtype, monkeypatch):
    """keep_logits=True: the forward's logits serve the backward (no logits GEMM there), with
    the same values and gradients against float64 as the default path."""
    h, w, y = make(41, 16, 203, dtype, 21, ignore_frac=0.2)
    logp, ent = fused_logprobs(h, w, y, temperature=0.8, return_entropy=True, keep_logits=True)
    hr = h.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    rlogp, rent = naive_logprobs(hr, wr, y, temperature=0.8)
    tol = TOL[dtype]
    torch.testing.assert_close(logp.double(), rlogp.detach(), **tol)
    torch.testing.assert_close(ent.double(), rent.detach(), **tol)

    def no_recompute(*args, **kwargs):
        raise AssertionError("the backward recomputed the logits")
    monkeypatch.setattr(lp_mod, "_logits", no_recompute)
    monkeypatch.setattr(lp_mod, "_NativeWeight", no_recompute)
    a, b = upstream(y, "both", 22)
    gh, gw = torch.autograd.grad(loss_of(logp, ent, a, b), (h, w))
    rgh, rgw = torch.autograd.grad(loss_of(rlogp, rent, a, b), (hr, wr))
    scale_h, scale_w = rgh.abs().max(), rgw.abs().max()
    torch.testing.assert_close(gh.double() / scale_h, rgh / scale_h, **tol)
    torch.testing.assert_close(gw.double() / scale_w, rgw / scale_w, **tol)
