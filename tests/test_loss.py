"""grpo_loss against a float64 reference written from the formulas (TRL's padded form),
against Liger-Kernel's LigerFusedLinearGRPOLoss, across layouts and micro-batch splits."""

import itertools
import zlib

import pytest
import torch

from fastgrpo import FusedGRPOLoss, grpo_loss

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
TOL = dict(atol=2e-5, rtol=2e-5)


def reference_loss(h, w, y, mask, adv, *, old=None, ref=None, beta=0.0, eps_low=0.2,
                   eps_high=0.2, delta=None, temperature=1.0, entropy_coef=0.0,
                   level="token", loss_type="grpo", num_items=None, max_len=None):
    """Float64, full logits, padded [B, T]: the objective exactly as STEPGRPO.md writes it."""
    logz = torch.log_softmax((h.double() @ w.double().T) / temperature, dim=-1)
    lp = logz.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ent = -(logz.exp() * logz).sum(-1)
    mask = (mask.bool() & (y != -100)).double()
    old = lp.detach() if old is None else old.double()
    log_ratio = lp - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1))[:, None]
    ratio = torch.exp(log_ratio)
    a = adv.double()[:, None] if adv.dim() == 1 else adv.double()
    unclipped = ratio if delta is None else ratio.clamp(max=delta)
    per_tok = -torch.min(unclipped * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    if ref is not None:
        d = ref.double() - lp
        per_tok = per_tok + beta * (torch.exp(d) - d - 1)
    per_tok = per_tok - entropy_coef * ent
    b = h.shape[0]
    if loss_type == "grpo":
        return ((per_tok * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / (num_items or b)
    if loss_type in ("bnpo", "dapo"):
        return (per_tok * mask).sum() / (num_items or mask.sum().clamp(min=1))
    return (per_tok * mask).sum() / (num_items or b * max_len)


def make_batch(b=4, t=9, d=16, v=70, seed=0, per_token_adv=False, drift=0.6, temperature=1.0):
    """A padded batch whose old/ref log-probs sit off the current policy by ~drift nats,
    so clipping is active on both sides."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) / d ** 0.5 * 2
    y = torch.randint(0, v, (b, t), generator=g)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    mask[0, 0] = False                       # a prompt-like hole inside a sequence
    adv = torch.randn((b, t) if per_token_adv else (b,), generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(h @ w.T / temperature, -1).gather(-1, y[..., None]).squeeze(-1)
    old = (lp + drift * torch.randn(b, t, generator=g)).float()
    ref = (lp + drift * torch.randn(b, t, generator=g)).float()
    return h.float(), w.float(), y, mask, adv.float(), old, ref


def grads(fn, h, w):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    out = fn(h, w)
    loss = out[0] if isinstance(out, tuple) else out
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss.detach().double(), gh.double(), gw.double(), out


CASES = list(itertools.product(LOSS_TYPES, [False, True], [False, True], ["token", "sequence"]))


@pytest.mark.parametrize("loss_type,with_old,with_ref,level", CASES)
def test_matches_float64_reference(loss_type, with_old, with_ref, level):
    seed = zlib.crc32(repr((loss_type, with_old, with_ref, level)).encode())
    h, w, y, mask, adv, old, ref = make_batch(seed=seed, temperature=0.8)
    kw = dict(beta=0.04 if with_ref else 0.0, epsilon_low=0.2, epsilon_high=0.28,
              temperature=0.8, entropy_coef=0.01, importance_sampling_level=level,
              loss_type=loss_type, max_completion_length=9)
    old_ = old if with_old else None
    ref_ = ref if with_ref else None
    loss, gh, gw, (_, metrics) = grads(
        lambda h_, w_: grpo_loss(h_, w_, y, adv, completion_mask=mask, old_logp=old_,
                                 ref_logp=ref_, **kw), h, w)
    rloss, rgh, rgw, _ = grads(
        lambda h_, w_: reference_loss(h_, w_, y, mask, adv, old=old_, ref=ref_, beta=kw["beta"],
                                      eps_low=0.2, eps_high=0.28, temperature=0.8,
                                      entropy_coef=0.01, level=level, loss_type=loss_type,
                                      max_len=9), h.double(), w.double())
    torch.testing.assert_close(loss, rloss, **TOL)
    torch.testing.assert_close(gh, rgh, **TOL)
    torch.testing.assert_close(gw, rgw, **TOL)
    assert all(torch.isfinite(v) for v in metrics.values())
    if with_old and level == "token":
        # drift 0.6 nats: some ratios fall below 0.8 and some rise above 1.28
        assert metrics["ratio/min"] < 0.8 and metrics["ratio/max"] > 1.28
        assert metrics["clip_ratio/region_mean"] > 0
    assert ("kl" in metrics) == with_ref


def test_dual_clip_and_per_token_advantages():
    h, w, y, mask, adv, old, ref = make_batch(seed=5, per_token_adv=True, drift=1.0)
    kw = dict(epsilon_low=0.2, epsilon_high=0.2, delta=1.5, loss_type="dapo")
    loss, gh, gw, _ = grads(lambda a, b: grpo_loss(a, b, y, adv, completion_mask=mask,
                                                   old_logp=old, **kw), h, w)
    rloss, rgh, rgw, _ = grads(lambda a, b: reference_loss(a, b, y, mask, adv, old=old,
                                                           delta=1.5, loss_type="dapo"),
                               h.double(), w.double())
    torch.testing.assert_close(loss, rloss, **TOL)
    torch.testing.assert_close(gh, rgh, **TOL)
    torch.testing.assert_close(gw, rgw, **TOL)
    # delta must bite: without it the loss differs
    no_delta = grpo_loss(h, w, y, adv, completion_mask=mask, old_logp=old, loss_type="dapo")[0]
    assert abs(float(no_delta) - float(loss)) > 1e-4


def test_metrics_against_hand_computation():
    h, w, y, mask, adv, old, ref = make_batch(seed=7)
    _, m = grpo_loss(h, w, y, adv, completion_mask=mask, old_logp=old, ref_logp=ref, beta=0.1,
                     epsilon_low=0.2, epsilon_high=0.28)
    logz = torch.log_softmax(h.double() @ w.double().T, -1)
    lp = logz.gather(-1, y[..., None]).squeeze(-1)[mask]
    ent = -(logz.exp() * logz).sum(-1)[mask]
    ratio = torch.exp(lp - old.double()[mask])
    a = adv.double()[:, None].expand_as(mask)[mask]
    low = ((ratio < 0.8) & (a < 0)).double().mean()
    high = ((ratio > 1.28) & (a > 0)).double().mean()
    d = ref.double()[mask] - lp
    expect = {"logp": lp.mean(), "entropy": ent.mean(), "kl": (d.exp() - d - 1).mean(),
              "clip_ratio/low_mean": low, "clip_ratio/high_mean": high,
              "clip_ratio/region_mean": low + high, "ratio/min": ratio.min(),
              "ratio/mean": ratio.mean(), "ratio/max": ratio.max(),
              "num_tokens": torch.tensor(float(mask.sum()))}
    assert set(m) == set(expect)
    for k, v in expect.items():
        torch.testing.assert_close(m[k].double(), v.double(), atol=1e-5, rtol=1e-5, msg=k)
        assert not m[k].requires_grad


def to_packed(h, y, mask, adv, old, ref):
    """Drop each row's padding tail; keep the masked hole as an ignored target."""
    lengths = [int(torch.nonzero(r).max()) + 1 for r in mask]
    ys = []
    for b, n in enumerate(lengths):
        yb = y[b, :n].clone()
        yb[~mask[b, :n]] = -100
        ys.append(yb)
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    cat = lambda x: torch.cat([x[b, :n] for b, n in enumerate(lengths)])  # noqa: E731
    return cat(h), torch.cat(ys), cu, cat(old), cat(ref), lengths


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_packed_equals_padded(loss_type, level):
    h, w, y, mask, adv, old, ref = make_batch(seed=11)
    ph, py, cu, pold, pref, lengths = to_packed(h, y, mask, adv, old, ref)
    kw = dict(beta=0.04, loss_type=loss_type, max_completion_length=9,
              importance_sampling_level=level, entropy_coef=0.02)
    loss_a, gh_a, gw_a, _ = grads(lambda a, b: grpo_loss(a, b, y, adv, completion_mask=mask,
                                                         old_logp=old, ref_logp=ref, **kw), h, w)
    loss_b, gh_b, gw_b, _ = grads(lambda a, b: grpo_loss(a, b, py, adv, cu_seqlens=cu,
                                                         old_logp=pold, ref_logp=pref, **kw),
                                  ph, w)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gw_a, gw_b, atol=1e-6, rtol=1e-6)
    gh_a_packed = torch.cat([gh_a[b, :n] for b, n in enumerate(lengths)])
    torch.testing.assert_close(gh_a_packed, gh_b, atol=1e-6, rtol=1e-6)
    # the [1, N, D] form of the packed layout is accepted too
    loss_c = grpo_loss(ph[None], w, py[None], adv, cu_seqlens=cu, old_logp=pold, ref_logp=pref,
                       **kw)[0]
    torch.testing.assert_close(loss_c.double(), loss_b, atol=1e-6, rtol=1e-6)


def global_normalizer(loss_type, mask, max_len):
    b = mask.shape[0]
    return {"grpo": b, "bnpo": int(mask.sum()), "dapo": int(mask.sum()),
            "dr_grpo": b * max_len}[loss_type]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_accumulation_equals_full_batch(loss_type):
    h, w, y, mask, adv, old, ref = make_batch(b=6, seed=13)
    mask[:, 0] = True
    kw = dict(beta=0.04, loss_type=loss_type, max_completion_length=9)
    full, gh, gw, _ = grads(lambda a, b: grpo_loss(
        a, b, y, adv, completion_mask=mask, old_logp=old, ref_logp=ref,
        num_items_in_batch=global_normalizer(loss_type, mask, 9), **kw), h, w)
    plain, _, _, _ = grads(lambda a, b: grpo_loss(
        a, b, y, adv, completion_mask=mask, old_logp=old, ref_logp=ref, **kw), h, w)
    torch.testing.assert_close(full, plain, atol=1e-6, rtol=1e-6)  # same normalizer, same loss
    total, acc_h, acc_w = 0.0, torch.zeros_like(gh), torch.zeros_like(gw)
    for sl in (slice(0, 1), slice(1, 4), slice(4, 6)):     # uneven micro-batches
        loss, g_h, g_w, _ = grads(lambda a, b: grpo_loss(
            a, b, y[sl], adv[sl], completion_mask=mask[sl], old_logp=old[sl],
            ref_logp=ref[sl], num_items_in_batch=global_normalizer(loss_type, mask, 9), **kw),
            h[sl], w)
        total += loss
        acc_h[sl] = g_h
        acc_w += g_w
    torch.testing.assert_close(total, full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(acc_h, gh, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(acc_w, gw, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_agrees_with_liger_kernel(loss_type, level, with_ref):
    """Peer check against LigerFusedLinearGRPOLoss (torch path, compiled=False)."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    h, w, y, mask, adv, old, ref = make_batch(seed=17)
    beta = 0.04 if with_ref else 0.0
    common = dict(beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
                  max_completion_length=9, importance_sampling_level=level, temperature=0.9)
    peer = liger.LigerFusedLinearGRPOLoss(compiled=False, use_ref_model=with_ref, **common)
    ref_ = ref if with_ref else None
    loss, gh, gw, _ = grads(lambda a, b: grpo_loss(a, b, y, adv, completion_mask=mask,
                                                   old_logp=old, ref_logp=ref_, **common), h, w)
    rloss, rgh, rgw, _ = grads(lambda a, b: peer(a, b, y, mask.long(), adv,
                                                 ref_per_token_logps=ref_,
                                                 old_per_token_logps=old), h, w)
    torch.testing.assert_close(loss, rloss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, rgh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, rgw, atol=1e-5, rtol=1e-4)


def test_egsw_weights_sequences_within_groups():
    """EGSW: loss_i scaled by G * softmax_j((A_j + alpha H_j) / P) over each group."""
    h, w, y, mask, adv, old, ref = make_batch(b=4, seed=19)
    alpha, temp = 0.5, 0.7
    loss, gh, gw, _ = grads(lambda a, b: grpo_loss(
        a, b, y, adv, completion_mask=mask, old_logp=old, loss_type="grpo", egsw_alpha=alpha,
        egsw_temperature=temp, group_size=2), h, w)
    # reference: weights from float64 entropies, detached, applied per sequence
    with torch.no_grad():
        logz = torch.log_softmax(h.double() @ w.double().T, -1)
        ent = -(logz.exp() * logz).sum(-1)
        m = mask.double()
        h_seq = (ent * m).sum(1) / m.sum(1)
        score = ((adv.double() + alpha * h_seq) / temp).view(2, 2)
        omega = (torch.softmax(score, dim=1) * 2).view(4)

    def ref_fn(a, b):
        total = 0
        for i in range(4):
            sl = slice(i, i + 1)
            total = total + omega[i] * reference_loss(a[sl], b, y[sl], mask[sl], adv[sl],
                                                      old=old[sl], loss_type="grpo")
        return total / 4
    rloss, rgh, rgw, _ = grads(ref_fn, h.double(), w.double())
    torch.testing.assert_close(loss, rloss, **TOL)
    torch.testing.assert_close(gh, rgh, **TOL)
    torch.testing.assert_close(gw, rgw, **TOL)


def test_module_holds_options_and_call_overrides():
    h, w, y, mask, adv, old, ref = make_batch(seed=23)
    mod = FusedGRPOLoss(beta=0.04, loss_type="dapo", epsilon_high=0.28)
    assert "loss_type='dapo'" in repr(mod)
    a = mod(h, w, y, adv, completion_mask=mask, ref_logp=ref, old_logp=old)[0]
    b = grpo_loss(h, w, y, adv, completion_mask=mask, ref_logp=ref, old_logp=old, beta=0.04,
                  loss_type="dapo", epsilon_high=0.28)[0]
    assert float(a) == float(b)
    c = mod(h, w, y, adv, completion_mask=mask, ref_logp=ref, old_logp=old, loss_type="bnpo")[0]
    d = grpo_loss(h, w, y, adv, completion_mask=mask, ref_logp=ref, old_logp=old, beta=0.04,
                  loss_type="bnpo", epsilon_high=0.28)[0]
    assert float(c) == float(d)


def test_no_completion_tokens_gives_zero_loss_and_zero_grads():
    h, w, y, mask, adv, old, ref = make_batch(seed=29)
    mask[:] = False
    loss, gh, gw, (_, m) = grads(lambda a, b: grpo_loss(a, b, y, adv, completion_mask=mask),
                                 h, w)
    assert float(loss) == 0 and (gh == 0).all() and (gw == 0).all()
    assert float(m["num_tokens"]) == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="ppo"), r"loss_type must be one of .* got 'ppo'"),
    (dict(epsilon_low=-0.1), r"epsilon_low must be a finite number >= 0, got -0.1"),
    (dict(epsilon_high=-1.0), r"epsilon_high must be .* got -1.0"),
    (dict(beta=0.1), r"beta=0.1 needs ref_logp"),
    (dict(importance_sampling_level="seq"), r"importance_sampling_level .* got 'seq'"),
    (dict(loss_type="dr_grpo"), r"dr_grpo.*max_completion_length"),
    (dict(delta=0.5), r"delta .* must be > 1, got 0.5"),
    (dict(nan_adv=True), r"advantages has a non-finite value nan at index \[2\]"),
    (dict(short_adv=True), r"advantages must be per sequence \[4\] or per token"),
    (dict(bad_old=True), r"old_logp must be per token"),
    (dict(bad_mask=True), r"completion_mask shape \(4, 8\) must be \[B, T\]"),
    (dict(num_items_in_batch=0), r"num_items_in_batch must be > 0, got 0"),
])
def test_bad_input_raises_clear_error(kwargs, match):
    h, w, y, mask, adv, old, ref = make_batch(seed=31)
    if kwargs.pop("nan_adv", False):
        adv[2] = float("nan")
    if kwargs.pop("short_adv", False):
        adv = adv[:3]
    if kwargs.pop("bad_old", False):
        kwargs["old_logp"] = old[:, :3]
    if kwargs.pop("bad_mask", False):
        mask = mask[:, :8]
    with pytest.raises(ValueError, match=match):
        grpo_loss(h, w, y, adv, completion_mask=mask, **kwargs)


@pytest.mark.parametrize("cu,match", [
    ([0, 3, 7], r"cu_seqlens must rise from 0 to the token count 10, got \[0, 3, 7\]"),
    ([1, 5, 10], r"rise from 0"),
    ([0, 6, 4, 10], r"rise from 0"),
])
def test_bad_cu_seqlens(cu, match):
    h, w = torch.randn(10, 8), torch.randn(30, 8)
    y = torch.randint(0, 30, (10,))
    with pytest.raises(ValueError, match=match):
        grpo_loss(h, w, y, torch.zeros(len(cu) - 1), cu_seqlens=torch.tensor(cu))
