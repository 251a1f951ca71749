"""The native CPU kernels (csrc/fastgrpo_csrc/fastgrpo_cpu.cpp) against float64 PyTorch, each
piece on its own and through fused_logprobs / grpo_loss, and the build's fallback.

The rest of the kernel tests (test_logprobs.py, test_loss_one_pass.py) run through both the
native kernels and the torch fallback (the ``native_mode`` fixture)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastgrpo.ops.blocks as lp_mod  # the block machinery under fused_logprobs
from fastgrpo import fused_logprobs, grpo_loss
from fastgrpo.ops._native import native
from fastgrpo.ops.logprobs import naive_logprobs


@pytest.fixture(scope="module")
def mod():
    m = native()
    if m is None:
        pytest.skip("native CPU kernels not built (FASTGRPO_NATIVE=0 or no compiler)")
    return m


def _inputs(n, d, v, dtype, seed, logit_std=2.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) / d ** 0.5 * logit_std).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, y


@pytest.mark.parametrize("n,d,v", [(1, 2, 1), (37, 24, 131), (70, 64, 1000)])
def test_bf16_logits_gemm_has_an_fp32_result(mod, n, d, v):
    """bf16 operands, float32 result: equal to float64 products of the same bf16 numbers up to
    fp32 accumulation (torch.mm on bf16 would round the result to bf16: ~1e-2 here)."""
    if not mod.brgemm_available():
        pytest.skip("this CPU has no bf16 brgemm (AMX / AVX-512-BF16)")
    h, w, _ = _inputs(n, d, v, torch.bfloat16, n + v)
    z = torch.full((n, v + 5), float("nan"))[:, :v]    # a strided block, as the blocks are
    mod.logits_bf16(h, mod.pack_bf16(w), v, z)
    ref = h.double() @ w.double().T
    assert float((z.double() - ref).abs().max()) < 1e-5 * max(1.0, float(ref.abs().max()))


def _masked_block(r, c, g):
    """Raw logits [r, c] with a -inf column (7) no target points at, and targets; row 4 has
    none (-1)."""
    raw = torch.randn(r, c, generator=g) * 3
    raw[:, 7] = float("-inf")
    y = torch.randint(0, c, (r,), generator=g)
    y[y == 7] = 8
    y[4] = -1
    return raw, y


@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_row_stats_and_grad_logits_sweeps(mod, scale):
    """Online statistics over ragged column blocks (a -inf column included) and dz, fp32 and
    bf16, against float64 log-softmax algebra."""
    g = torch.Generator().manual_seed(3)
    r, c = 19, 203
    raw, y = _masked_block(r, c, g)
    m = torch.full((r,), float("-inf"))
    s, t, zy = torch.zeros(r), torch.zeros(r), torch.zeros(r)
    for c0 in (0, 50, 61, 200):
        c1 = {0: 50, 50: 61, 61: 200, 200: c}[c0]
        mod.row_stats_(raw[:, c0:c1], y, c0, scale, m, s, t, zy)
    z = raw.double() * scale
    lse = torch.logsumexp(z, 1)
    p = torch.softmax(z, 1)
    ent = -(torch.where(p > 0, p * (z - lse[:, None]), 0.0)).sum(1)
    got_lse = m.double() + s.double().log()
    torch.testing.assert_close(got_lse, lse, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got_lse - t.double() / s.double(), ent, atol=1e-5, rtol=1e-5)
    has = y >= 0
    zt = z.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
    torch.testing.assert_close(zy.double()[has], zt[has], atol=1e-5, rtol=1e-6)
    assert float(zy[4]) == 0.0

    gl, ge = torch.randn(r, generator=g), torch.randn(r, generator=g)
    ez = lse - ent
    ref = -p * (gl.double()[:, None] + ge.double()[:, None] * (z - ez[:, None]))
    ref[has.nonzero().squeeze(1), y[has]] += gl.double()[has]
    ref = torch.where(torch.isinf(z), 0.0, ref) * scale
    a = (gl.double() - ge.double() * ez).float()
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 8e-3)):
        out = torch.empty(r, c, dtype=dtype)
        mod.grad_logits(raw, y, 0, scale, lse.float(), a, ge, gl, scale, out)
        err = (out.double() - ref).abs() / (ref.abs() + 1e-3)
        assert float(err.max()) < tol, (dtype, float(err.max()))
        assert float(out[:, 7].abs().max()) == 0.0      # the -inf column: exactly nothing
    inplace = raw.clone()
    mod.grad_logits(inplace, y, 0, scale, lse.float(), a, ge, gl, scale, inplace)
    torch.testing.assert_close(inplace.double(), ref, atol=1e-5, rtol=2e-5)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_row_stats_can_store_exp(mod, scale):
    """row_stats_(store_exp) over whole rows: the same statistics as without, and the block
    left holding exp(z - max) against float64 (a -inf column and a row without a target
    included); a continued (not fresh) state is refused."""
    g = torch.Generator().manual_seed(4)
    r, c = 21, 203
    raw, y = _masked_block(r, c, g)
    state = [torch.full((r,), float("-inf"))] + [torch.zeros(r) for _ in range(3)]
    ref_state = [x.clone() for x in state]
    mod.row_stats_(raw.clone(), y, 0, scale, *ref_state)
    e = raw.clone()
    mod.row_stats_(e, y, 0, scale, *state, store_exp=True)
    for got, want in zip(state, ref_state):
        assert torch.equal(got, want)
    z = raw.double() * scale
    torch.testing.assert_close(e.double(), torch.exp(z - state[0].double()[:, None]), atol=0,
                               rtol=2e-6)
    assert float(e[:, 7].abs().max()) == 0.0
    with pytest.raises(RuntimeError, match="whole rows"):
        mod.row_stats_(raw.clone(), y, 0, scale, *state, store_exp=True)


def test_one_pass_without_an_expected_entropy_term_stays_exact(mod):
    """linear_one_pass(entropy_grad=False) whose objective does return an entropy gradient
    (a broken promise): the same result as entropy_grad=True, not a silently wrong one."""
    h, w, y = _inputs(300, 32, 500, torch.float32, 12)
    coef = torch.randn(300, generator=torch.Generator().manual_seed(1))

    def token_grads(sl, logp, ent):
        return coef[sl], 0.3 * coef[sl]
    got = lp_mod.linear_one_pass(h, w, y, 1.0, token_grads, entropy_grad=False)
    want = lp_mod.linear_one_pass(h, w, y, 1.0, token_grads, entropy_grad=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k,c", [(1, 1), (7, 70), (130, 129)])
def test_pack_kn_layout(mod, k, c):
    """pack_kn: B[k][n] = x[k, n] as brgemm's VNNI tiles [ceil(C/64), K2, 64] (pairs of rows
    interleaved), zero-padded; checked against the layout built by indexing."""
    x = torch.randn(k, c).bfloat16()
    tiles, k2 = (c + 63) // 64, (k + 1) // 2
    xp = torch.zeros(2 * k2, tiles * 64, dtype=torch.bfloat16)
    xp[:k, :c] = x
    want = xp.view(k2, 2, tiles, 64).permute(2, 0, 3, 1).reshape(tiles, 2 * k2, 64)
    assert torch.equal(mod.pack_kn(x), want)


@pytest.mark.parametrize("n,d,v,scale", [(300, 64, 1000, 1.0), (37, 128, 258, 0.7)])
def test_fused_bf16_backward_gemms(mod, n, d, v, scale):
    """grad_gemms_bf16: logits, dz and both gradient products of one vocabulary slice (starting
    at column c0) in one walk, against float64 algebra on the same bf16 numbers: dh accumulates
    into what it holds, dw is written (bf16)."""
    if not mod.brgemm_available():
        pytest.skip("this CPU has no bf16 brgemm (AMX / AVX-512-BF16)")
    h, w, _ = _inputs(n, d, v, torch.bfloat16, n + v)
    g = torch.Generator().manual_seed(11)
    c0 = 500
    y = torch.randint(c0 - 50, c0 + v + 50, (n,), generator=g)   # some targets elsewhere
    lse = torch.randn(n, generator=g).abs() + 5
    a, b, gl = (torch.randn(n, generator=g) for _ in range(3))
    dh0 = torch.randn(n, d, generator=g)
    dh, dw = dh0.clone(), torch.full((v, d), float("nan"), dtype=torch.bfloat16)
    mod.grad_gemms_bf16(h, mod.pack_bf16(w), mod.pack_kn(h), mod.pack_kn(w), v, y, c0, scale,
                        lse, a, b, gl, scale, dh, dw)
    z = (h.double() @ w.double().T) * scale
    p = torch.exp(z - lse.double()[:, None])
    dz = -p * (a.double()[:, None] + b.double()[:, None] * z)
    hit = (y >= c0) & (y < c0 + v)
    dz[hit.nonzero().squeeze(1), (y - c0)[hit]] += gl.double()[hit]
    dz = dz * scale
    want_dh = dh0.double() + dz @ w.double()
    want_dw = dz.T @ h.double()
    for got, want in ((dh, want_dh), (dw, want_dw)):   # dz goes through bf16: bf16 accuracy
        assert float((got.double() - want).norm() / want.norm()) < 1e-2


def test_fused_bf16_backward_drops_rows_past_dw(mod):
    """grad_gemms_bf16 with dw shorter than the slice (an odd slice padded by one zero row of
    w): the rows it holds are the gradient, nothing is written past them."""
    if not mod.brgemm_available():
        pytest.skip("this CPU has no bf16 brgemm (AMX / AVX-512-BF16)")
    n, d, v = 50, 64, 130
    h, w, y = _inputs(n, d, v, torch.bfloat16, 21)
    w[-1] = 0                                           # the padding row
    lse = torch.logsumexp(h.double() @ w.double().T, 1).float()
    a, b, gl = (torch.randn(n, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3))
    dh = torch.zeros(n, d)
    dw = torch.full((v + 3, d), float("nan"), dtype=torch.bfloat16)
    mod.grad_gemms_bf16(h, mod.pack_bf16(w), mod.pack_kn(h), mod.pack_kn(w), v, y, 0, 1.0,
                        lse, a, b, gl, 1.0, dh, dw[:v - 1])
    z = h.double() @ w.double().T
    dz = -torch.exp(z - lse.double()[:, None]) * (a.double()[:, None] + b.double()[:, None] * z)
    dz[torch.arange(n), y] += gl.double()
    want = (dz.T @ h.double())[:v - 1]
    assert float((dw[:v - 1].double() - want).norm() / want.norm()) < 1e-2
    assert bool(dw[v - 1:].isnan().all())               # untouched past its rows


def test_packs_into_a_reused_workspace(mod):
    """pack_bf16 / pack_kn with a workspace: the same layout as a fresh pack, as a view at the
    workspace's front; a workspace too small is refused."""
    w = torch.randn(130, 64).bfloat16()
    for pack in (mod.pack_bf16, mod.pack_kn):
        fresh = pack(w)
        ws = torch.full((fresh.numel() + 100,), float("nan"), dtype=torch.bfloat16)
        got = pack(w, ws)
        assert torch.equal(got, fresh) and got.data_ptr() == ws.data_ptr()
        with pytest.raises(RuntimeError, match="workspace"):
            pack(w, ws[:fresh.numel() - 1])


@pytest.mark.parametrize("cols", [333, 1000])
def test_fused_bf16_backward_over_odd_slices(mod, cols, monkeypatch):
    """The fused bf16 backward over vocabulary slices of odd width (each padded by a zero row
    whose dw is dropped; the packs reuse one workspace): gradients within bf16 accuracy of
    float64 on the same bf16 numbers."""
    if not mod.brgemm_available():
        pytest.skip("this CPU has no bf16 brgemm (AMX / AVX-512-BF16)")
    monkeypatch.setattr(lp_mod, "_FUSED_SLICE_COLS", cols)
    h, w, y = _inputs(90, 64, 1001, torch.bfloat16, 8)
    h.requires_grad_()
    w.requires_grad_()
    logp, ent = fused_logprobs(h, w, y, return_entropy=True)
    hr, wr = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rlogp, rent = naive_logprobs(hr, wr, y)
    g = torch.randn(90, generator=torch.Generator().manual_seed(9))
    gh, gw = torch.autograd.grad((logp * g).sum() + 0.1 * ent.sum(), (h, w))
    rgh, rgw = torch.autograd.grad((rlogp * g).sum() + 0.1 * rent.sum(), (hr, wr))
    for got, want in ((gh, rgh), (gw, rgw)):
        assert float((got.double() - want).norm() / want.norm()) < 1e-2
    # every slice's rows are right, the last (one column) included
    for s0 in range(0, 1001, cols):
        part, ref = gw[s0:s0 + cols].double(), rgw[s0:s0 + cols]
        assert float((part - ref).norm() / ref.norm()) < 1e-2, s0


def test_add_bf16_into_fp32(mod):
    acc = torch.randn(1000, 33)
    x = torch.randn(1000, 33).bfloat16()
    want = acc.double() + x.double()
    mod.add_bf16_(acc, x)
    torch.testing.assert_close(acc.double(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_bf16_logprobs_at_fp32_accuracy(mod, temperature, monkeypatch):
    """bf16 hidden states and weight: log-probs within 1e-5 of float64 computed from the same
    bf16 numbers (the logits GEMM keeps an fp32 result); gradients within bf16 accuracy.
    Small blocks, so the forward merges several ragged vocabulary blocks."""
    monkeypatch.setattr(lp_mod, "_BLOCK_ELEMS", 64 * 300)
    monkeypatch.setattr(lp_mod, "_MAX_BLOCK_ROWS", 64)
    h, w, y = _inputs(150, 64, 1000, torch.bfloat16, 5)
    h.requires_grad_()
    w.requires_grad_()
    logp, ent = fused_logprobs(h, w, y, temperature=temperature, return_entropy=True)
    hr, wr = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rlogp, rent = naive_logprobs(hr, wr, y, temperature=temperature)
    assert float((logp.double() - rlogp).abs().max()) < 1e-5
    assert float((ent.double() - rent).abs().max()) < 2e-5
    g = torch.randn(150, generator=torch.Generator().manual_seed(6))
    gh, gw = torch.autograd.grad((logp * g).sum() + 0.1 * ent.sum(), (h, w))
    rgh, rgw = torch.autograd.grad((rlogp * g).sum() + 0.1 * rent.sum(), (hr, wr))
    for got, want in ((gh, rgh), (gw, rgw)):
        assert float((got.double() - want).norm() / want.norm()) < 1e-2


def test_paths_call_the_native_kernels(mod, monkeypatch):
    """fused_logprobs (forward, two-pass backward) and grpo_loss (one pass, with and without
    an entropy term) on CPU run the native sweeps when the kernels are built."""
    calls = []

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(mod, name)
    monkeypatch.setattr(lp_mod, "_native", lambda: Spy())
    h, w, y = _inputs(20, 16, 100, torch.float32, 7)
    h.requires_grad_()
    fused_logprobs(h, w, y).sum().backward()
    assert {"row_stats_", "grad_logits"} <= set(calls)
    calls.clear()
    hb, wb = torch.randn(20, 64).bfloat16().requires_grad_(), torch.randn(100, 64).bfloat16()
    wb.requires_grad_()
    fused_logprobs(hb, wb, y).sum().backward()        # bf16: the fused native backward
    if mod.brgemm_available():
        assert {"stats_bf16_", "grad_gemms_bf16"} <= set(calls)
    calls.clear()
    loss, _ = grpo_loss(h, w, y, torch.randn(2), cu_seqlens=torch.tensor([0, 9, 20]))
    loss.backward()                    # no entropy term: the GEMMs read exp(z - max), no dz sweep
    assert "row_stats_" in calls and "grad_logits" not in calls
    calls.clear()
    loss, _ = grpo_loss(h, w, y, torch.randn(2), cu_seqlens=torch.tensor([0, 9, 20]),
                        entropy_coef=0.01)
    loss.backward()                                    # an entropy bonus: the full dz sweep
    assert {"row_stats_", "grad_logits"} <= set(calls)


FALLBACK = textwrap.dedent("""
    import warnings, torch
    from fastgrpo import fused_logprobs
    from fastgrpo.ops.logprobs import naive_logprobs
    h, w, y = torch.randn(6, 8), torch.randn(30, 8), torch.randint(0, 30, (6,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logp = fused_logprobs(h, w, y)
    torch.testing.assert_close(logp.double(), naive_logprobs(h, w, y)[0], atol=1e-5, rtol=1e-5)
    notes = [str(c.message) for c in caught if "native CPU kernels" in str(c.message)]
    print(len(notes), notes[0] if notes else "")
""")


def test_no_compiler_falls_back_with_one_notice(tmp_path):
    env = {**os.environ, "CXX": "/nonexistent/c++", "FASTGRPO_CACHE_DIR": str(tmp_path)}
    env.pop("FASTGRPO_NATIVE", None)
    out = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    count, note = out.stdout.split(" ", 1)
    assert count == "1" and "no C++ compiler" in note and "torch path" in note
    env["FASTGRPO_NATIVE"] = "1"           # CI's setting: a failed build is an error
    out = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode != 0 and "FASTGRPO_NATIVE=1" in out.stderr


def test_a_stale_build_lock_is_removed_not_waited_on(mod):
    """A process killed while building leaves torch's ``lock`` file; the next process must not
    wait on it forever (torch's loader would), but remove it with a warning and load."""
    from fastgrpo.ops._native import build_target

    lock = build_target()[1] / "lock"
    lock.write_text("")                     # as a killed build leaves it
    code = ("import warnings; warnings.simplefilter('always')\n"
            "from fastgrpo.ops._native import native\n"
            "print('loaded', native() is not None)")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "FASTGRPO_NATIVE": "1"}, timeout=300)
    finally:
        lock.unlink(missing_ok=True)
    assert out.returncode == 0, out.stderr
    assert "loaded True" in out.stdout and "stale build lock" in out.stderr
