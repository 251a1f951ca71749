"""TRL 1.16's other objectives in the fused loss: cispo, sapo, vespo, luspo, the top-entropy
token mask, the off-policy sequence mask, the bias-corrected KL and the token-mean entropy
bonus.

Two checks: ``grpo_loss`` against a float64 full-logits reference that transcribes TRL's
``_compute_loss`` (loss and both gradients), and ``FastGRPOTrainer`` against TRL's own
``GRPOTrainer.compute_loss`` on the same batch (loss, every parameter's gradient, metrics),
with the harness of ``test_integrations.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastgrpo import grpo_loss
from test_integrations import _batch, _compare, _loss_and_grads, _trainer, trl_env  # noqa: F401
from test_loss import make_batch


def trl_reference(h, w, y, mask, adv, *, old, ref=None, sampling=None, beta=0.0, eps_low=0.2,
                  eps_high=0.2, delta=None, level="token", loss_type="grpo", num_items=None,
                  max_len=None, entropy_coef=0.0, ga=1, quantile=1.0, opsm=None,
                  bias_kl=False, sapo=(1.0, 1.05), vespo=(2.0, 3.0, 3.0, 2.0), vespo_is=None):
    """Float64, padded [B, T]: TRL 1.16's GRPOTrainer._compute_loss, line for line."""
    logz = torch.log_softmax(h.double() @ w.double().T, dim=-1)
    lp = logz.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    ent = -(logz.exp() * logz).sum(-1)
    mask = mask.double()
    a = adv.double()[:, None] if adv.dim() == 1 else adv.double()
    old = lp.detach() if old is None else old.double()
    emask = None
    if quantile < 1:
        thr = torch.quantile(ent.detach()[mask.bool()], 1 - quantile)
        emask = ((ent.detach() * mask) >= thr) & mask.bool()
    if opsm is not None:
        s = old if sampling is None else sampling.double()
        kl = torch.nan_to_num(s - lp.detach(), nan=0.0)
        seq_kl = (kl * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
        keep = ((a >= 0) | (seq_kl <= opsm)).double()
    log_ratio = lp - old
    if level == "token":
        coef_1 = torch.exp(log_ratio)
    else:
        coef_1 = torch.exp(((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1))[:, None])
    if beta:
        d = ref.double() - lp
        per_token_kl = torch.exp(d) - d - 1
        if bias_kl:
            per_token_kl = per_token_kl * coef_1
    if loss_type == "cispo":
        per_tok = -torch.clamp(coef_1, max=eps_high).detach() * a * lp
    elif loss_type == "sapo":
        tau = torch.where(a > 0, sapo[0], sapo[1]).double()
        per_tok = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * a
    elif loss_type == "vespo":
        with torch.no_grad():
            k_pos, lam_pos, k_neg, lam_neg = vespo
            log_w = (torch.clamp(log_ratio, -20, 20) * mask).sum(-1, keepdim=True)
            if vespo_is is not None:
                log_w = log_w + vespo_is.double()[:, None]
            log_w = log_w.clamp(math.log(1e-8), 20.0)
            k = torch.where(a >= 0, k_pos, k_neg).double()
            lam = torch.where(a >= 0, lam_pos, lam_neg).double().clamp(min=1e-4)
            phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(0, 0, 0)
        per_tok = -phi * a * lp
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        c1 = coef_1 if delta is None else torch.clamp(coef_1, max=delta)
        per_tok = -torch.min(c1 * a, coef_2 * a)
    if opsm is not None:
        per_tok = per_tok * keep
    if emask is not None:
        per_tok = per_tok * emask
    if beta:
        per_tok = per_tok + beta * per_token_kl
    per_tok = per_tok.expand_as(mask) * mask
    b = h.shape[0]
    if loss_type in ("grpo", "sapo"):
        loss = (per_tok.sum(-1) / mask.sum(-1).clamp(min=1)).mean() / ga
    elif loss_type == "bnpo":
        loss = per_tok.sum() / mask.sum().clamp(min=1) / ga
    elif loss_type == "dr_grpo":
        loss = per_tok.sum() / (b * max_len) / ga
    elif loss_type == "luspo":
        loss = per_tok.sum(-1).mean() / ga
    else:
        loss = per_tok.sum() / num_items
    if entropy_coef:
        em = mask if emask is None else mask * emask
        loss = loss - entropy_coef * (ent * em).sum() / em.sum().clamp(min=1) / ga
    return loss


def _grads(fn, h, w, dtype):
    h = h.detach().to(dtype).requires_grad_()
    w = w.detach().to(dtype).requires_grad_()
    out = fn(h, w)
    loss = out[0] if isinstance(out, tuple) else out
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss.detach().double(), gh.double(), gw.double()


# (case name, shared options, reference-only options, grpo_loss-only options)
_F64_CASES = [
    ("cispo", dict(loss_type="cispo", eps_high=1.3, num_items=30.0), {}, {}),
    ("cispo-seq-kl-bias", dict(loss_type="cispo", eps_high=1.1, num_items=30.0, level="sequence",
                               beta=0.1, bias_kl=True), {}, {}),
    ("sapo", dict(loss_type="sapo", sapo=(0.8, 1.3)), {}, {}),
    ("sapo-seq", dict(loss_type="sapo", level="sequence"), {}, {}),
    ("vespo", dict(loss_type="vespo", num_items=30.0, vespo=(2.0, 3.0, 3.0, 2.0)), {}, {}),
    ("vespo-is", dict(loss_type="vespo", num_items=30.0, vespo=(1.5, 2.0, 2.5, 1.0)),
     dict(vespo_is=torch.tensor([0.3, -0.2, 0.0, 0.1])),
     dict(vespo_seq_log_weight=torch.tensor([0.3, -0.2, 0.0, 0.1]))),
    ("luspo", dict(loss_type="luspo", level="sequence", beta=0.05), {}, {}),
    ("luspo-token-delta", dict(loss_type="luspo", delta=1.4), {}, {}),
    ("grpo-kl-bias", dict(loss_type="grpo", beta=0.2, bias_kl=True), {}, {}),
    ("grpo-seq-kl-bias", dict(loss_type="grpo", beta=0.2, bias_kl=True, level="sequence"), {}, {}),
    ("dapo-top-entropy", dict(loss_type="dapo", quantile=0.3, num_items=25.0, beta=0.1), {}, {}),
    ("bnpo-top-entropy-bonus", dict(loss_type="bnpo", quantile=0.5, entropy_coef=0.1, ga=2), {},
     {}),
    ("opsm", dict(loss_type="grpo", opsm=0.05), {}, {}),   # drops sequence 2 of seed 28
    ("opsm-sampling-nan", dict(loss_type="dr_grpo", max_len=9, opsm=0.05), {}, {}),
]
_ENTROPY_CASES = [(f"{lt}-entropy", dict(loss_type=lt, entropy_coef=0.2, ga=3, num_items=12.0,
                                         max_len=9, beta=0.05), {}, {})
                  for lt in ("grpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo")]


def _fused_kwargs(kw, mask):
    """The reference's options as grpo_loss arguments (TRL's normalizers folded in)."""
    lt, ga = kw["loss_type"], kw.get("ga", 1)
    out = dict(loss_type=lt, beta=kw.get("beta", 0.0), epsilon_low=kw.get("eps_low", 0.2),
               epsilon_high=kw.get("eps_high", 0.2), delta=kw.get("delta"),
               importance_sampling_level=kw.get("level", "token"),
               max_completion_length=kw.get("max_len"),
               top_entropy_quantile=kw.get("quantile", 1.0),
               off_policy_mask_threshold=kw.get("opsm"), bias_correction_kl=kw.get("bias_kl", 0),
               entropy_coef=kw.get("entropy_coef", 0.0), entropy_mean_divisor=float(ga))
    if "sapo" in kw:
        out.update(sapo_temperature_pos=kw["sapo"][0], sapo_temperature_neg=kw["sapo"][1])
    if "vespo" in kw:
        out.update(zip(("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"),
                       kw["vespo"]))
    b, max_len = 4, kw.get("max_len")
    out["num_items_in_batch"] = {"grpo": b * ga, "sapo": b * ga, "luspo": b * ga,
                                 "bnpo": float(mask.sum()) * ga,
                                 "dr_grpo": b * (max_len or 0) * ga}.get(lt, kw.get("num_items"))
    return out


@pytest.mark.parametrize("name, kw, ref_only, fused_only", _F64_CASES + _ENTROPY_CASES,
                         ids=[c[0] for c in _F64_CASES + _ENTROPY_CASES])
def test_objective_vs_float64_trl_formula(name, kw, ref_only, fused_only):
    h, w, y, mask, adv, old, ref = make_batch(seed=28, drift=0.3)
    sampling = None
    if name == "opsm-sampling-nan":
        sampling = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(4))
        sampling[1, 1] = float("nan")                     # a token the sampler did not score
    r = _grads(lambda h_, w_: trl_reference(h_, w_, y, mask, adv, old=old, ref=ref,
                                            sampling=sampling, **kw, **ref_only),
               h, w, torch.float64)
    f = _grads(lambda h_, w_: grpo_loss(h_, w_, y, adv, completion_mask=mask, old_logp=old,
                                        ref_logp=ref, sampling_logp=sampling, backend="torch",
                                        **_fused_kwargs(kw, mask), **fused_only),
               h, w, torch.float32)
    for what, a, b in zip(("loss", "dhidden", "dweight"), f, r):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=f"{name}: {what}")
    assert float(r[2].abs().max()) > 1e-4


def test_masks_bite():
    """The entropy and off-policy masks, the KL correction and the cispo cap change the loss
    (so the cases above test something)."""
    h, w, y, mask, adv, old, ref = make_batch(seed=28, drift=0.3)

    def loss(**kw):
        return float(grpo_loss(h, w, y, adv, completion_mask=mask, old_logp=old, ref_logp=ref,
                               **kw)[0])
    base = loss(loss_type="dapo", beta=0.1)
    assert abs(loss(loss_type="dapo", beta=0.1, top_entropy_quantile=0.3) - base) > 1e-4
    assert abs(loss(loss_type="dapo", beta=0.1, off_policy_mask_threshold=0.05) - base) > 1e-4
    assert abs(loss(loss_type="dapo", beta=0.1, bias_correction_kl=True) - base) > 1e-4
    assert abs(loss(loss_type="cispo", epsilon_high=1.1) - loss(loss_type="cispo",
                                                                 epsilon_high=5.0)) > 1e-4
    assert loss(loss_type="dapo", top_entropy_quantile=0.0) != 0.0     # keeps the top token
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        loss(top_entropy_quantile=1.5)
    with pytest.raises(ValueError, match="not both"):
        loss(entropy_mean_divisor=1.0, kl_entropy_normalizer=3.0)


# ----------------------------------------------------------------------------- TRL parity


_TRL_CASES = {
    "cispo": dict(loss_type="cispo", epsilon_high=1.2),
    "cispo-seq-kl-bias": dict(loss_type="cispo", epsilon_high=1.1, beta=0.1,
                              importance_sampling_level="sequence", use_bias_correction_kl=True),
    "sapo": dict(loss_type="sapo", beta=0.1, sapo_temperature_pos=0.8, sapo_temperature_neg=1.3),
    "vespo": dict(loss_type="vespo", beta=0.1, vespo_k_pos=1.5, vespo_lambda_neg=1.0),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.1),
    "grpo-kl-bias": dict(loss_type="grpo", beta=0.1, use_bias_correction_kl=True),
    "dapo-top-entropy": dict(loss_type="dapo", top_entropy_quantile=0.3, beta=0.1),
    "grpo-top-entropy-bonus": dict(loss_type="grpo", top_entropy_quantile=0.5,
                                   entropy_coef=0.05),
    "bnpo-opsm": dict(loss_type="bnpo", off_policy_mask_threshold=0.1, beta=0.1),
    "dapo-entropy": dict(loss_type="dapo", entropy_coef=0.05, beta=0.02),
    "dr_grpo-entropy": dict(loss_type="dr_grpo", entropy_coef=0.05),
    "sapo-entropy": dict(loss_type="sapo", entropy_coef=0.05),
    "vespo-entropy": dict(loss_type="vespo", entropy_coef=0.05),
    "luspo-entropy-kl-bias": dict(loss_type="luspo", entropy_coef=0.05, beta=0.1,
                                  use_bias_correction_kl=True),
}


@pytest.mark.parametrize("case", list(_TRL_CASES))
def test_trl_objective_loss_and_grads_match(trl_env, case):  # noqa: F811
    from trl import GRPOTrainer

    from fastgrpo.integrations.trl import FastGRPOTrainer

    kw = _TRL_CASES[case]
    inputs = _batch()
    if "opsm" in case:   # a sampler's log-probs, one token unscored
        inputs["sampling_per_token_logps"] = inputs["old_per_token_logps"] + 0.2
        inputs["sampling_per_token_logps"][2, 1] = float("nan")
    ref = _loss_and_grads(_trainer(GRPOTrainer, trl_env, **kw), inputs)
    fast = _loss_and_grads(_trainer(FastGRPOTrainer, trl_env, **kw), inputs)
    names = ("entropy", "kl") if kw.get("beta") else ("entropy",)
    lt = kw["loss_type"]
    if lt in ("grpo", "bnpo", "dapo", "dr_grpo") and "importance_sampling_level" not in kw:
        names += ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
    names += {"cispo": ("cispo_clip_ratio",), "vespo": ("vespo/phi_seq_mean",)}.get(lt, ())
    if kw.get("entropy_coef"):
        names += ("policy_loss",)
    if case == "cispo-seq-kl-bias":   # TRL weights sequences in the clip fraction there
        names = ("entropy", "kl")
    _compare(ref, fast, names)
    assert float(ref[0]) != 0.0


def test_trl_vespo_vllm_importance_sampling(trl_env):  # noqa: F811
    """VESPO folds vLLM's token IS ratios into its sequence weight instead of the loss."""
    from trl import GRPOTrainer

    from fastgrpo.integrations.trl import FastGRPOTrainer

    inputs = _batch()
    inputs["importance_sampling_ratio"] = 0.5 + torch.rand(
        4, 6, generator=torch.Generator().manual_seed(3))
    results = []
    for cls in (GRPOTrainer, FastGRPOTrainer):
        tr = _trainer(cls, trl_env, loss_type="vespo", beta=0.1)
        tr.use_vllm, tr.vllm_importance_sampling_correction = True, True
        tr.vllm_importance_sampling_mode = "token_truncate"
        results.append(_loss_and_grads(tr, inputs))
    _compare(*results, metric_names=("entropy", "kl", "vespo/phi_seq_mean"))


def test_trl_adaptive_entropy(trl_env):  # noqa: F811
    """TRL's adaptive entropy controller: off on the first step (no entropy measured yet), then
    the coefficient moves by entropy_coef_delta and applies; two steps match TRL's."""
    from trl import GRPOTrainer

    from fastgrpo.integrations.trl import FastGRPOTrainer

    kw = dict(loss_type="dapo", use_adaptive_entropy=True, entropy_coef=0.05,
              entropy_target=10.0, entropy_coef_delta=0.02, beta=0.1)
    inputs = _batch()
    trainers = [_trainer(cls, trl_env, **kw) for cls in (GRPOTrainer, FastGRPOTrainer)]
    for step in range(2):
        ref, fast = (_loss_and_grads(tr, inputs, ga=1) for tr in trainers)
        _compare(ref, fast, ("entropy", "kl", "policy_loss", "entropy_coef"))
    assert trainers[1].entropy_coef == pytest.approx(0.09)
