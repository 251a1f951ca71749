"""Numerics of the Triton kernels, run on CPU tensors through the Triton interpreter.

Triton decides between compiling and interpreting when ``@triton.jit`` runs, and its own
standard library (``tl.zeros``, ``tl.sum``...) is decorated when triton is first imported, so
the interpreter only works in a process that imported triton with ``TRITON_INTERPRET=1``.
This module sets the variable before importing triton and the kernel modules (reloading the
kernel modules if an earlier module imported them compiled), then puts it back as it was; it
is set again only while this module's tests run, so nothing leaks into other test modules.
If triton was already imported in compiled mode by an earlier test module (e.g.
tests/test_kernels_compile.py, collected first), the tests here skip and
``test_whole_module_in_subprocess`` runs this module in a fresh interpreter-mode process.
"""

from __future__ import annotations

import os
import subprocess
import sys

_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402

try:
    triton = pytest.importorskip("triton")
    import torch  # noqa: E402
    from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

    from fastgrpo_kernels import advantages as adv_k  # noqa: E402
    from fastgrpo_kernels import linear_logprobs as ll  # noqa: E402

    IN_PROCESS = isinstance(triton.language.standard.zeros, InterpretedFunction)
    if IN_PROCESS and not ll.INTERPRET:
        ll = importlib.reload(ll)
    if IN_PROCESS and not isinstance(adv_k._group_zscore_kernel, InterpretedFunction):
        adv_k = importlib.reload(adv_k)
finally:
    if _PREV_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET

from fastgrpo.ops.logprobs import fused_logprobs, naive_logprobs  # noqa: E402

_SUBPROCESS_TEST = "test_whole_module_in_subprocess"


@pytest.mark.skipif(IN_PROCESS, reason="triton runs interpreted in this process")
def test_whole_module_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.abspath(__file__)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


@pytest.fixture(autouse=True)
def _interpret(request, monkeypatch):
    if not IN_PROCESS and request.node.originalname != _SUBPROCESS_TEST:
        pytest.skip("triton was imported in compiled mode; see " + _SUBPROCESS_TEST)
    # fastgrpo.ops.logprobs checks the variable when backend="triton" runs on CPU tensors
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy inf arithmetic inside
        yield


# operands identical to the reference's (which upcasts the same rounded values): only fp32
# accumulation order differs, for every dtype (bf16 is upcast before tl.dot when interpreting)
TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ref(h, w, y, inv_t):
    z = (h.double() @ w.double().T) * inv_t
    lse = torch.logsumexp(z, dim=1)
    logz = z - lse[:, None]
    p = logz.exp()
    ent = -(torch.where(p > 0, p * logz, torch.zeros_like(p))).sum(1)
    zy = torch.where(y >= 0, z.gather(1, y.clamp(min=0)[:, None])[:, 0], 0.0)
    return zy - lse, ent, lse, z, p


def _inputs(n, v, d, dtype, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) * scale).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -1
    return h, w, y


def _close(got, want, tol, what):
    got, want = got.double(), want.double()
    err = ((got - want).abs() / (1.0 + want.abs())).max().item() if got.numel() else 0.0
    assert err <= tol, f"{what}: max scaled error {err:.3g} > {tol}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,v,d,temp,split", [
    (37, 1000, 48, 0.7, None),  # nothing a multiple of any block; D not a multiple of BLOCK_D
    (37, 1000, 64, 1.3, 3),     # vocabulary split over three ranges, merged on the host
    (1, 333, 32, 1.0, None),    # one row
])
def test_forward_matches_float64(dtype, n, v, d, temp, split):
    h, w, y = _inputs(n, v, d, dtype)
    logp, ent, lse = ll.forward(h, w, y, 1.0 / temp, split=split)
    for t in (logp, ent, lse):
        assert t.dtype == torch.float32 and t.shape == (n,)
        assert torch.isfinite(t).all()
    r_logp, r_ent, r_lse, _, _ = _ref(h, w, y, 1.0 / temp)
    tol = TOL[dtype]
    _close(lse, r_lse, tol, "lse")
    _close(ent, r_ent, tol, "entropy")
    _close(logp, r_logp, tol, "logp (y=-1 rows give -lse)")


def test_forward_strided_rows_and_neg_inf_logits():
    h, w, y = _inputs(20, 300, 40, torch.float32)
    big = torch.zeros(20, 56)
    big[:, :40] = h
    hs = big[:, :40]  # row stride 56, last-dim stride 1
    logp, ent, lse = ll.forward(hs, w, y, 1.0)
    r_logp, r_ent, r_lse, _, _ = _ref(h, w, y, 1.0)
    _close(lse, r_lse, 2e-5, "lse")
    _close(ent, r_ent, 2e-5, "entropy")
    _close(logp, r_logp, 2e-5, "logp")
    # -inf logits (a weight row of -inf times positive h) contribute exactly nothing
    h2 = h.abs() + 0.1
    w2 = w.clone()
    w2[7] = float("-inf")
    logp2, ent2, lse2 = ll.forward(h2, w2, y, 1.0, split=2)
    keep = torch.arange(300) != 7
    r_logp, r_ent, r_lse, _, _ = _ref(h2, w2[keep], torch.full_like(y, -1), 1.0)
    assert torch.isfinite(ent2).all() and torch.isfinite(lse2).all()
    _close(lse2, r_lse, 2e-5, "lse with a -inf column")
    _close(ent2, r_ent, 2e-5, "entropy with a -inf column")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r,c,c0,d,temp", [(37, 300, 500, 48, 0.7), (1, 77, 0, 32, 1.0)])
def test_grad_logits_matches_float64(dtype, r, c, c0, d, temp):
    v = 1000
    h, w, y = _inputs(r, v, d, dtype, seed=1)
    inv_t = 1.0 / temp
    _, r_ent, r_lse, z, p = _ref(h, w, y, inv_t)
    g = torch.Generator().manual_seed(2)
    gl, ge = torch.randn(r, generator=g), torch.randn(r, generator=g)
    lse, ent = r_lse.float(), r_ent.float()
    for out_dtype in (torch.float32, dtype):
        dz = ll.grad_logits(h, w[c0:c0 + c], y, c0, lse, ent, gl, ge, inv_t, out_dtype)
        assert dz.dtype == out_dtype and dz.shape == (r, c)
        ez = (r_lse - r_ent)[:, None]
        hit = (torch.arange(v)[None, :] == y[:, None]).double()
        want = inv_t * (gl.double()[:, None] * hit
                        - p * (gl.double()[:, None] + ge.double()[:, None] * (z - ez)))
        tol = 2e-5 if out_dtype == torch.float32 else 1e-2
        _close(dz, want[:, c0:c0 + c], tol, f"dz ({out_dtype})")
        assert (want[:, c0:c0 + c] != 0).any()


def test_grad_logits_zero_where_p_is_zero():
    h, w, y = _inputs(8, 100, 32, torch.float32)
    h = h.abs() + 0.1
    w[3] = float("-inf")
    y[:] = 3
    y[0] = 5
    logp, ent, lse = ll.forward(h, w, torch.full_like(y, -1), 1.0)
    gl, ge = torch.ones(8), torch.ones(8)
    dz = ll.grad_logits(h, w, y, 0, lse, ent, gl, ge, 1.0, torch.float32)
    assert torch.isfinite(dz).all()
    # column 3 has p == 0: only the target indicator term remains
    assert torch.equal(dz[1:, 3], gl[1:])
    assert dz[0, 3].item() == 0.0


# ----------------------------------------------------------------------------- end to end


def _loss(logp, ent, a, b):
    return (a * logp).sum() + (b * ent).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_logprobs_triton_end_to_end(dtype):
    torch.manual_seed(0)
    B, T, D, V, temp = 3, 13, 40, 700, 0.8
    h0 = torch.randn(B, T, D).to(dtype)
    w0 = (torch.randn(V, D) * 0.5).to(dtype)
    y = torch.randint(0, V, (B, T))
    y[0, :4] = -100
    a, b = torch.randn(B, T), torch.randn(B, T)

    results = {}
    for backend in ("triton", "torch"):
        h = h0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        logp, ent = fused_logprobs(h, w, y, temperature=temp, return_entropy=True,
                                   backend=backend)
        _loss(logp, ent, a, b).backward()
        results[backend] = (logp.detach(), ent.detach(), h.grad, w.grad)

    h64 = h0.double().requires_grad_(True)
    w64 = w0.double().requires_grad_(True)
    r_logp, r_ent = naive_logprobs(h64, w64, y, temperature=temp)
    _loss(r_logp, r_ent, a.double(), b.double()).backward()

    logp, ent, gh, gw = results["triton"]
    assert logp.dtype == torch.float32 and logp.shape == (B, T)
    assert torch.all(logp[0, :4] == 0) and torch.all(ent[0, :4] == 0)
    assert gh.dtype == dtype and gw.dtype == dtype
    _close(logp, r_logp, 2e-5, "logp vs float64")
    _close(ent, r_ent, 2e-5, "entropy vs float64")
    gtol = 2e-5 if dtype == torch.float32 else 1e-2  # bf16 gradients are rounded to bf16
    _close(gh, h64.grad, gtol, "dL/dh vs float64")
    _close(gw, w64.grad, gtol, "dL/dw vs float64")
    # rows whose targets are ignored still get entropy gradient only through b (here 0)
    t_logp, t_ent, t_gh, t_gw = results["torch"]
    # both backends are within 2e-5 of float64 (checked above): they may differ by the sum
    _close(logp, t_logp, 4e-5, "logp vs torch backend")
    _close(ent, t_ent, 4e-5, "entropy vs torch backend")
    _close(gh, t_gh, gtol, "dL/dh vs torch backend")
    _close(gw, t_gw, gtol, "dL/dw vs torch backend")


# ----------------------------------------------------------------------------- advantages


def _zscore_ref(r, eps, scale):
    r = r.double()
    mean = r.mean(1, keepdim=True)
    if r.shape[1] > 1:
        std = r.std(1, keepdim=True)
    else:
        std = torch.zeros_like(mean)
    adv = (r - mean) / (std + eps) if scale else r - mean
    same = (r.max(1, keepdim=True).values == r.min(1, keepdim=True).values)
    return torch.where(same, torch.zeros_like(adv), adv)


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("g,s", [(6, 8), (4, 5), (3, 1), (2, 300)])
def test_group_zscore_matches_float64(g, s, scale):
    torch.manual_seed(g * 1000 + s)
    r = torch.randn(g, s)
    r[0] = 0.7  # all-equal group -> exactly 0
    if g > 2:
        r[2] = torch.randint(0, 2, (s,)).float()  # binary rewards
    out = adv_k.group_zscore(r, 1e-4, scale)
    assert out.shape == (g, s) and out.dtype == torch.float32
    assert torch.all(out[0] == 0)
    _close(out, _zscore_ref(r, 1e-4, scale), 1e-5, "group z-score")


def test_group_zscore_validates():
    with pytest.raises(TypeError):
        adv_k.group_zscore(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError):
        adv_k.group_zscore(torch.zeros(6))
    # non-contiguous input is handled
    r = torch.randn(8, 4).T
    _close(adv_k.group_zscore(r), _zscore_ref(r, 1e-4, True), 1e-5, "strided rewards")
