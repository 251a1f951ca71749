"""The one-pass path of grpo_loss (loss and gradients in one walk over the logits) against the
float64 reference and against the two-pass path, for every loss type and option; and the
objectives that couple tokens keep the two-pass path."""

import itertools
import zlib

import pytest
import torch

import fastgrpo.ops.blocks as lp_mod  # the block machinery under fused_logprobs
import fastgrpo.ops.loss as loss_mod
from fastgrpo import grpo_loss
from test_loss import grads, make_batch, reference_loss

pytestmark = pytest.mark.usefixtures("native_mode")  # native kernels and the fallback

V = 70
OPTIONS = {
    "plain": dict(),
    "entropy_kl_temperature": dict(entropy_coef=0.01, beta=0.04, temperature=0.8),
    "dual_clip": dict(delta=3.0, epsilon_high=0.28),
    "kl_clamp_kl_entropy_normalizer": dict(beta=0.1, kl_clamp=0.5, entropy_coef=0.02,
                                           kl_entropy_normalizer=11.0),
    "entropy_mean_divisor_bias_kl": dict(entropy_coef=0.03, entropy_mean_divisor=2.0,
                                         beta=0.04, bias_correction_kl=True),
    "num_items_in_batch": dict(num_items_in_batch=7.0, beta=0.04),
}
TOKEN_LOCAL_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"]
REFERENCE_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]   # tests/test_loss.py's float64 reference


@pytest.fixture
def small_blocks(monkeypatch):
    """5 rows x the vocabulary per block, elementwise slices of 2 rows: every batch here spans
    several blocks, ragged at the end."""
    monkeypatch.setattr(lp_mod, "_ONE_PASS_ELEMS", 5 * V)
    monkeypatch.setattr(lp_mod, "_ONE_PASS_MIN_ROWS", 1)
    monkeypatch.setattr(lp_mod, "_SLICE_ELEMS", 2 * V)


@pytest.fixture
def one_pass_calls(monkeypatch):
    calls = []
    real = loss_mod.linear_one_pass

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(loss_mod, "linear_one_pass", spy)
    return calls


def _kwargs(loss_type, option, with_old, with_ref, old, ref):
    kw = dict(OPTIONS[option], loss_type=loss_type, max_completion_length=9)
    kw.setdefault("temperature", 1.0)
    kw["old_logp"] = old if with_old else None
    kw["ref_logp"] = ref if (with_ref or kw.get("beta")) else None
    return kw


@pytest.mark.parametrize("loss_type,option,with_old",
                         list(itertools.product(TOKEN_LOCAL_TYPES, OPTIONS, [False, True])))
def test_one_pass_equals_two_pass_and_float64(small_blocks, one_pass_calls, loss_type, option,
                                              with_old):
    seed = zlib.crc32(repr((loss_type, option, with_old)).encode())
    temperature = OPTIONS[option].get("temperature", 1.0)
    h, w, y, mask, adv, old, ref = make_batch(seed=seed, v=V, temperature=temperature)
    kw = _kwargs(loss_type, option, with_old, True, old, ref)

    def run(one_pass):
        return grads(lambda h_, w_: grpo_loss(h_, w_, y, adv, completion_mask=mask,
                                              one_pass=one_pass, backend="torch", **kw), h, w)
    l1, gh1, gw1, (_, m1) = run(True)
    assert one_pass_calls, "the token-local objective did not take the one-pass path"
    n_calls = len(one_pass_calls)
    l2, gh2, gw2, (_, m2) = run(False)
    assert len(one_pass_calls) == n_calls
    tol = dict(atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(l1, l2, **tol)
    torch.testing.assert_close(gh1, gh2, **tol)
    torch.testing.assert_close(gw1, gw2, **tol)
    assert m1.keys() == m2.keys()
    for k in m2:
        torch.testing.assert_close(m1[k], m2[k], atol=1e-6, rtol=1e-5, msg=k)
    reference_ok = loss_type in REFERENCE_TYPES and option in ("plain", "entropy_kl_temperature",
                                                               "dual_clip", "num_items_in_batch")
    if reference_ok:
        o = OPTIONS[option]
        hr = h.double().requires_grad_()
        wr = w.double().requires_grad_()
        ref_loss = reference_loss(hr, wr, y, mask, adv, old=kw["old_logp"], ref=kw["ref_logp"],
                                  beta=o.get("beta", 0.0), eps_low=0.2,
                                  eps_high=o.get("epsilon_high", 0.2), delta=o.get("delta"),
                                  temperature=temperature, entropy_coef=o.get("entropy_coef", 0.),
                                  loss_type=loss_type, num_items=o.get("num_items_in_batch"),
                                  max_len=9)
        rgh, rgw = torch.autograd.grad(ref_loss, (hr, wr))
        torch.testing.assert_close(l1, ref_loss.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gh1, rgh, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gw1, rgw, atol=1e-5, rtol=1e-4)


COUPLED = {
    "sequence_level": dict(importance_sampling_level="sequence"),
    "egsw": dict(egsw_alpha=0.5, group_size=2),
    "top_entropy_quantile": dict(top_entropy_quantile=0.5),
    "off_policy_mask": dict(off_policy_mask_threshold=0.1),
    "vespo": dict(loss_type="vespo"),
}


@pytest.mark.parametrize("name", COUPLED)
def test_objectives_coupled_across_tokens_keep_two_passes(small_blocks, one_pass_calls, name):
    h, w, y, mask, adv, old, _ = make_batch(seed=zlib.crc32(name.encode()), v=V)
    kw = dict(COUPLED[name], old_logp=old)
    auto = grads(lambda h_, w_: grpo_loss(h_, w_, y, adv, completion_mask=mask, **kw), h, w)
    forced = grads(lambda h_, w_: grpo_loss(h_, w_, y, adv, completion_mask=mask,
                                            one_pass=True, **kw), h, w)
    assert not one_pass_calls
    for a, b in zip(auto[:3], forced[:3]):
        torch.testing.assert_close(a, b)


def test_one_pass_writes_every_output(small_blocks, monkeypatch):
    """Poison every torch.empty with NaN: the one-pass outputs still equal the two-pass ones,
    so no element of logp, entropy or dh is left unwritten."""
    h, w, y, mask, adv, old, ref = make_batch(seed=11, v=V)
    kw = dict(old_logp=old, ref_logp=ref, beta=0.04, entropy_coef=0.01)
    two = grads(lambda h_, w_: grpo_loss(h_, w_, y, adv, completion_mask=mask, one_pass=False,
                                         **kw), h, w)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    one = grads(lambda h_, w_: grpo_loss(h_, w_, y, adv, completion_mask=mask, one_pass=True,
                                         **kw), h, w)
    for a, b in zip(one[:3], two[:3]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5)


def test_upstream_gradient_and_partial_needs(small_blocks):
    h, w, y, mask, adv, old, ref = make_batch(seed=12, v=V)
    kw = dict(old_logp=old, ref_logp=ref, beta=0.04, one_pass=True)
    _, gh, gw, _ = grads(lambda h_, w_: grpo_loss(h_, w_, y, adv, completion_mask=mask, **kw),
                         h, w)
    _, gh3, gw3, _ = grads(lambda h_, w_: -2.5 * grpo_loss(h_, w_, y, adv, completion_mask=mask,
                                                           **kw)[0], h, w)
    torch.testing.assert_close(gh3, -2.5 * gh)
    torch.testing.assert_close(gw3, -2.5 * gw)
    hh = h.clone().requires_grad_()            # only hidden needs a gradient (frozen lm_head)
    (g_only,) = torch.autograd.grad(grpo_loss(hh, w, y, adv, completion_mask=mask, **kw)[0], hh)
    torch.testing.assert_close(g_only.double(), gh)
    ww = w.clone().requires_grad_()            # only the weight
    (g_only,) = torch.autograd.grad(grpo_loss(h, ww, y, adv, completion_mask=mask, **kw)[0], ww)
    torch.testing.assert_close(g_only.double(), gw)
    with torch.no_grad():                      # no gradient wanted: the forward alone
        value, _ = grpo_loss(h, w, y, adv, completion_mask=mask, **kw)
    torch.testing.assert_close(value.double(), grads(
        lambda h_, w_: grpo_loss(h_, w_, y, adv, completion_mask=mask, **kw), h, w)[0])


def test_minus_inf_weight_row(small_blocks):
    """A masked vocabulary row (-inf weights) gets probability 0 in the one-pass path too."""
    h, w, y, mask, adv, old, ref = make_batch(seed=13, v=V)
    h = h.abs()
    w = w.clone()
    w[5] = float("-inf")
    y = torch.where(y == 5, 6, y)
    kw = dict(old_logp=old, entropy_coef=0.01)
    one, m1 = grpo_loss(h, w, y, adv, completion_mask=mask, one_pass=True, **kw)
    hr = h.double()
    keep = torch.ones(V, dtype=torch.bool)
    keep[5] = False
    ref_loss = reference_loss(hr, w.double()[keep], torch.where(y > 5, y - 1, y), mask, adv,
                              old=old, entropy_coef=0.01)
    assert torch.isfinite(one) and torch.isfinite(m1["entropy"])
    torch.testing.assert_close(one.double(), ref_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("one_pass", [True, False])
def test_bf16_model_on_cpu(small_blocks, one_pass):
    """bf16 hidden states and lm_head on CPU: the logits stay fp32 (log-probs, hence ratios and
    the loss, at fp32 accuracy), the gradient GEMMs may run in bf16 (the gradients' dtype):
    within bf16's 1e-2 of float64."""
    h, w, y, mask, adv, old, ref = make_batch(seed=14, v=V)
    hb, wb = h.bfloat16(), w.bfloat16()
    kw = dict(old_logp=old, ref_logp=ref, beta=0.04, entropy_coef=0.01)
    loss, gh, gw, _ = grads(lambda h_, w_: grpo_loss(h_, w_, y, adv, completion_mask=mask,
                                                     one_pass=one_pass, **kw), hb, wb)
    hr, wr = hb.double().requires_grad_(), wb.double().requires_grad_()
    ref_loss = reference_loss(hr, wr, y, mask, adv, old=old, ref=ref, beta=0.04,
                              entropy_coef=0.01)
    rgh, rgw = torch.autograd.grad(ref_loss, (hr, wr))
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * max(1.0, abs(float(ref_loss)))
    for g, r in ((gh, rgh), (gw, rgw)):
        assert float((g - r).norm() / r.norm()) < 1e-2
