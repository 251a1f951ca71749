"""grpo_loss's kl_clamp and kl_entropy_normalizer (the peers' KL cap and OpenRLHF's token-mean
KL/entropy beside a per-sequence policy term), against float64 full-logit formulas."""

import pytest
import torch

from fastgrpo.ops.loss import grpo_loss


def _case(seed=0, b=4, t=6, d=16, v=40):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, d, generator=g)
    w = 0.6 * torch.randn(v, d, generator=g)
    y = torch.randint(0, v, (b, t), generator=g)
    mask = (torch.arange(t)[None] < torch.tensor([6, 2, 0, 4])[:, None]).long()
    with torch.no_grad():
        logp = torch.log_softmax(h @ w.T, -1).gather(-1, y[..., None]).squeeze(-1)
    old = logp + 0.3 * torch.randn(b, t, generator=g)
    ref = logp + 0.5 * torch.randn(b, t, generator=g)
    ref[0, 0] = logp[0, 0] + 3.0            # k3 ~ 16
    ref[1, 1] = logp[1, 1] - 12.0           # k3 = 11
    adv = torch.randn(b, generator=g)
    return h, w, y, mask, adv, old, ref


def _reference(h, w, y, mask, adv, old, ref, *, beta, ent_coef, clamp, aux_norm, n_seq):
    lsm = torch.log_softmax(h @ w.T, -1)
    logp = lsm.gather(-1, y[..., None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    pol = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
    d = ref - logp
    kl = torch.exp(d) - d - 1
    if clamp is not None:
        kl = kl.clamp(max=clamp)
    aux = beta * kl - ent_coef * ent
    m = mask.double()
    cnt = m.sum(-1)
    seq_mean = lambda x: ((x * m).sum(-1) / cnt.clamp(min=1)).sum() / n_seq  # noqa: E731
    if aux_norm is None:
        return seq_mean(pol + aux)
    return seq_mean(pol) + (aux * m).sum() / aux_norm


@pytest.mark.parametrize("clamp", [None, 10.0, 2.0])
@pytest.mark.parametrize("aux_norm", [None, 12.0])
def test_kl_clamp_and_kl_entropy_normalizer(clamp, aux_norm):
    h, w, y, mask, adv, old, ref = _case()
    kw = dict(beta=0.1, ent_coef=0.02, clamp=clamp, aux_norm=aux_norm, n_seq=3)
    h32, w32 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, metrics = grpo_loss(h32, w32, y, adv, completion_mask=mask, old_logp=old,
                              ref_logp=ref, beta=kw["beta"], entropy_coef=kw["ent_coef"],
                              loss_type="grpo", num_items_in_batch=3, kl_clamp=clamp,
                              kl_entropy_normalizer=aux_norm)
    loss.backward()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref_loss = _reference(h64, w64, y, mask, adv.double(), old.double(), ref.double(), **kw)
    ref_loss.backward()
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5, abs=1e-6)
    for got, want in ((h32.grad, h64.grad), (w32.grad, w64.grad)):
        assert float((got.double() - want).norm()) <= 1e-5 * float(want.norm())
    if clamp is not None:
        assert metrics["kl"] <= clamp


def test_kl_options_validation():
    h, w, y, mask, adv, old, ref = _case()
    for bad in (dict(kl_clamp=0.0), dict(kl_clamp=float("inf")), dict(kl_entropy_normalizer=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            grpo_loss(h, w, y, adv, completion_mask=mask, ref_logp=ref, beta=0.1, **bad)
