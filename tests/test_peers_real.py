"""verl_policy_loss / openrlhf_policy_loss against the REAL verl and OpenRLHF loss code.

The peers' own functions run on float64 logits materialized from the same random hidden
states and lm_head weight (tiny sizes); the adapters run fastgrpo's fused fp32 path.  Loss and
the gradients of both ``hidden`` and the lm_head weight must agree to ~1e-5 relative.

* verl 0.9.1: ``verl.workers.utils.losses.ppo_loss`` (the engine actor's loss: policy loss
  from ``get_policy_loss_fn(loss_mode)``, ``agg_loss``, ``kl_penalty``, entropy) with a real
  ``ActorConfig``, fed the unpadded log-probs layout the engine gives it and the engine's
  mini-batch totals (``dp_size``, ``batch_num_tokens``, ``global_batch_size``).
* OpenRLHF 0.11.2: the actor's real ``ActorPPOTrainer.training_step`` (``PolicyLoss``,
  ``compute_approx_kl``, ``aggregate_loss`` for KL and entropy) with a stand-in ``self``: its
  model is a callable returning our float64 log-probs / entropy, its strategy's ``backward`` is
  ``(loss / gas).backward()`` (what DeepSpeed's engine does with gradient accumulation), and
  normalizers come from OpenRLHF's own ``iter_grad_accum_global_norm``.

Import-time stubs (documented, never on the loss path): OpenRLHF's ``openrlhf.models``
package imports ``ring_attn_utils``, which imports ``flash_attn.bert_padding`` and
``flash_attn.utils.distributed`` at import time; flash-attn cannot build without CUDA.  When
flash_attn is absent those two modules are stubbed with functions that raise if called, only
while openrlhf is imported, then removed from ``sys.modules``.  ``openrlhf.trainer.ray``'s
``__init__`` imports vLLM (rollout engines only); the package is registered bare so that its
``ppo_actor`` submodule (which does not need vLLM) imports.

Run (peers installed per .ci/peers-requirements.txt): ``python -m pytest
tests/test_peers_real.py -q``.  Skipped when verl / openrlhf are not importable, unless
``FASTGRPO_REQUIRE_PEERS=1`` (CI's peers environment), which turns that into an error.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import pytest
import torch

from fastgrpo.integrations.generic import openrlhf_policy_loss, verl_policy_loss


def _import_verl():
    try:
        from tensordict import TensorDict
        from verl.trainer.ppo.core_algos import agg_loss
        from verl.utils import tensordict_utils as tu
        from verl.workers.config import ActorConfig
        from verl.workers.config.actor import PolicyLossConfig
        from verl.workers.utils.losses import ppo_loss
    except Exception as e:  # noqa: BLE001 - any import failure means "not installed here"
        return None, f"verl not importable ({type(e).__name__}: {e})"
    return types.SimpleNamespace(TensorDict=TensorDict, tu=tu, ActorConfig=ActorConfig,
                                 PolicyLossConfig=PolicyLossConfig, ppo_loss=ppo_loss,
                                 agg_loss=agg_loss), None


def _import_openrlhf():
    if importlib.util.find_spec("openrlhf") is None:
        return None, "openrlhf not installed"
    stubbed = []
    try:
        if importlib.util.find_spec("flash_attn") is None:
            # transformers probes flash_attn with find_spec, which a stub without __spec__
            # breaks: import what probes it first, then stub, then remove the stubs again
            import peft  # noqa: F401
            import transformers.integrations.deepspeed  # noqa: F401
            import transformers.modeling_flash_attention_utils  # noqa: F401

            def _not_on_the_loss_path(*args, **kwargs):
                raise AssertionError("flash_attn stub called: it was meant to be import-only")
            for name, attrs in (("flash_attn", ()), ("flash_attn.utils", ()),
                                ("flash_attn.bert_padding",
                                 ("index_first_axis", "pad_input", "rearrange", "unpad_input")),
                                ("flash_attn.utils.distributed", ("all_gather",))):
                mod = types.ModuleType(name)
                for a in attrs:
                    setattr(mod, a, _not_on_the_loss_path)
                sys.modules[name] = mod
                stubbed.append(name)
        if "openrlhf.trainer.ray" not in sys.modules:
            import openrlhf.trainer
            bare = types.ModuleType("openrlhf.trainer.ray")
            bare.__path__ = [os.path.join(os.path.dirname(openrlhf.trainer.__file__), "ray")]
            sys.modules["openrlhf.trainer.ray"] = bare
        from openrlhf.models.loss import PolicyLoss, aggregate_loss
        from openrlhf.models.utils import compute_approx_kl
        from openrlhf.trainer.ppo_utils.experience import Experience
        from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer
        from openrlhf.utils.loss_utils import iter_grad_accum_global_norm
    except Exception as e:  # noqa: BLE001
        return None, f"openrlhf not importable ({type(e).__name__}: {e})"
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)
    return types.SimpleNamespace(PolicyLoss=PolicyLoss, aggregate_loss=aggregate_loss,
                                 compute_approx_kl=compute_approx_kl,
                                 Experience=Experience,
                                 ActorPPOTrainer=ActorPPOTrainer,
                                 iter_grad_accum_global_norm=iter_grad_accum_global_norm), None


VERL, VERL_SKIP = _import_verl()
ORL, ORL_SKIP = _import_openrlhf()
if os.environ.get("FASTGRPO_REQUIRE_PEERS") and (VERL is None or ORL is None):
    # CI's peers venv: a broken install must fail, not skip
    raise ImportError(f"FASTGRPO_REQUIRE_PEERS is set: {VERL_SKIP or ''} {ORL_SKIP or ''}")
needs_verl = pytest.mark.skipif(VERL is None, reason=VERL_SKIP or "")
needs_openrlhf = pytest.mark.skipif(ORL is None, reason=ORL_SKIP or "")

D, V = 16, 48
RTOL = 1e-5


def _close(x, ref, what, scale=0.0):
    """|x - ref| <= RTOL * (|ref| + scale) (norms).  For a loss, ``scale`` is the peer's
    aggregation of a loss matrix of ones (sum of its token weights): the loss sums terms of
    size ~1 with both signs, so its fp32 error is relative to that, not to the sum."""
    x, ref = x.detach().double(), ref.detach().double()
    err = float((x - ref).norm())
    ref_norm = float(ref.norm())
    assert err <= RTOL * (ref_norm + float(scale)) + 1e-12, \
        f"{what}: |diff| {err:.3e} vs |ref| {ref_norm:.3e} (+ scale {float(scale):.3e})"


def _lengths_to_mask(lengths, width):
    return (torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]).long()


class _Case:
    """Random hidden [B, P + R, D], lm_head weight [V, D], tokens, masks and log-probs.

    ``old`` / ``ref`` are the current policy's own fp32 log-probs plus noise (ratios that hit
    both clip sides), with a few tokens pushed far off (ratio > 3, KL > 10) when asked.
    """

    def __init__(self, seed, b=5, p=3, r=6, lengths=None, far=False, per_token_adv=True):
        g = torch.Generator().manual_seed(seed)
        self.b, self.p, self.r = b, p, r
        self.hidden = torch.randn(b, p + r, D, generator=g)
        self.weight = torch.randn(V, D, generator=g) * 0.6
        self.ids = torch.randint(0, V, (b, p + r), generator=g)
        lengths = lengths if lengths is not None else torch.randint(1, r + 1, (b,), generator=g)
        self.lengths = torch.as_tensor(lengths)
        self.mask = _lengths_to_mask(self.lengths, r)
        with torch.no_grad():
            lp = torch.log_softmax(self.hidden[:, p - 1:-1] @ self.weight.T, -1)
            logp = lp.gather(-1, self.ids[:, p:, None]).squeeze(-1)
        self.old = logp + 0.3 * torch.randn(b, r, generator=g)
        self.ref = logp + 0.5 * torch.randn(b, r, generator=g)
        adv = torch.randn(b, generator=g)
        if far:
            adv[0], adv[1] = -abs(adv[0]) - 0.5, -abs(adv[1]) - 0.5
            self.old[0, 0] = logp[0, 0] - 1.6            # token ratio e^1.6 ~ 5 > clip_ratio_c
            self.old[1] = logp[1] - 1.5                  # sequence ratio e^1.5 > 3, A < 0
            self.ref[2, 0] = logp[2, 0] + 3.0            # k3 = e^3 - 4 ~ 16 > 10
            self.ref[3, 0] = logp[3, 0] - 12.0           # k3 = 11 > 10
        self.adv = adv[:, None].expand(b, r).contiguous() if per_token_adv else adv

    def rows(self, sl):
        """The same case restricted to rows ``sl`` (a micro-batch)."""
        c = object.__new__(_Case)
        c.__dict__.update(self.__dict__)
        for k in ("hidden", "ids", "lengths", "mask", "old", "ref", "adv"):
            setattr(c, k, getattr(self, k)[sl])
        c.b = c.ids.shape[0]
        return c

    def leaves32(self):
        return (self.hidden.clone().requires_grad_(), self.weight.clone().requires_grad_())

    def leaves64(self):
        return (self.hidden.double().requires_grad_(), self.weight.double().requires_grad_())


def _next_token_logp_entropy(h64, w64, ids):
    """log p(ids[t + 1] | <= t) and the entropy at every position t (last position: 0)."""
    lsm = torch.log_softmax(h64 @ w64.T, -1)
    lp = lsm[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    return torch.nn.functional.pad(lp, (0, 1)), ent


# ============================================================================ verl 0.9.1


def _verl_loss(case, h64, w64, *, mode, loss_mode="vanilla", cl=0.2, ch=0.28, c=3.0,
               ent_coef=0.0, kl_coef=0.0, dp_size=1, batch_num_tokens=None,
               global_batch_size=None, loss_scale_factor=None):
    """verl's engine ``ppo_loss`` on one micro-batch, float64."""
    cfg = VERL.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                           clip_ratio_low=cl, clip_ratio_high=ch, clip_ratio_c=c,
                           loss_agg_mode=mode, loss_scale_factor=loss_scale_factor,
                           entropy_coeff=ent_coef, use_kl_loss=kl_coef > 0,
                           kl_loss_coef=kl_coef, kl_loss_type="low_var_kl",
                           policy_loss=VERL.PolicyLossConfig(loss_mode=loss_mode))
    p = case.p
    lp, ent = _next_token_logp_entropy(h64, w64, case.ids)
    # the engine's unpadded layout: each sequence's prompt + scored response, concatenated;
    # value at flat position k predicts token k + 1 (no_padding_2_padding shifts it back)
    keep = [p + int(n) for n in case.lengths]
    model_output = {"log_probs": torch.cat([lp[i, :k] for i, k in enumerate(keep)])}
    if ent_coef:
        model_output["entropy"] = torch.cat([ent[i, :k] for i, k in enumerate(keep)])
    attn = torch.cat([torch.ones(case.b, p, dtype=torch.long), case.mask], 1)
    td = {"prompts": case.ids[:, :p], "responses": case.ids[:, p:], "attention_mask": attn,
          "response_mask": case.mask, "old_log_probs": case.old.double(),
          "advantages": (case.adv if case.adv.dim() == 2
                         else case.adv[:, None].expand(case.b, case.r)).double()}
    if kl_coef:
        td["ref_log_prob"] = case.ref.double()
    data = VERL.TensorDict(td, batch_size=[case.b])
    VERL.tu.assign_non_tensor(data, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                              global_batch_size=global_batch_size)
    loss, _ = VERL.ppo_loss(cfg, model_output, data)
    weights = VERL.agg_loss(torch.ones(case.b, case.r, dtype=torch.float64), case.mask.bool(),
                            mode, **cfg.global_batch_info)
    return loss, float(weights)


def _verl_adapter(case, h, w, *, mode, loss_mode="vanilla", cl=0.2, ch=0.28, c=3.0,
                  ent_coef=0.0, kl_coef=0.0, **totals):
    loss, metrics = verl_policy_loss(h, w, case.ids[:, case.p:], case.mask, case.adv,
                                     case.old, case.ref, loss_agg_mode=mode,
                                     loss_mode=loss_mode, clip_ratio_low=cl, clip_ratio_high=ch,
                                     clip_ratio_c=c, entropy_coeff=ent_coef,
                                     kl_loss_coef=kl_coef, **totals)
    return loss


VERL_MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
              "seq-mean-token-sum-norm"]
VERL_OPTIONS = {
    "plain": {},
    "entropy+kl": dict(ent_coef=0.01, kl_coef=0.05),
    "kl-clamped": dict(kl_coef=0.1),              # with far=True: two tokens' k3 > 10
    "gspo": dict(loss_mode="gspo"),
    "gspo+entropy+kl": dict(loss_mode="gspo", ent_coef=0.02, kl_coef=0.05),
}


def _compare_verl(case, micro, totals, **opts):
    """Sum over micro-batches (``micro``: row slices) of loss and grads, adapter vs verl."""
    h, w = case.leaves32()
    h64, w64 = case.leaves64()
    tot32 = tot64 = scale = 0.0
    for sl in micro:
        mb = case.rows(sl)
        hs, hs64 = h[sl], h64[sl]
        l32 = _verl_adapter(mb, hs, w, **opts, **totals)
        l64, weights = _verl_loss(mb, hs64, w64, **opts, **totals)
        l32.backward()                 # verl 0.9.1's engine: backward per micro-batch, no / n
        l64.backward()
        tot32, tot64, scale = tot32 + l32.detach(), tot64 + l64.detach(), scale + weights
    _close(tot32, tot64, "loss", scale)
    _close(h.grad, h64.grad, "d hidden")
    _close(w.grad, w64.grad, "d lm_head weight")
    return tot32


@needs_verl
@pytest.mark.parametrize("option", list(VERL_OPTIONS))
@pytest.mark.parametrize("mode", VERL_MODES)
def test_verl_one_batch(mode, option):
    """Every loss_agg_mode x option, one micro-batch, local totals (verl's None defaults)."""
    case = _Case(seed=hash((mode, option)) % 1000, far=option == "kl-clamped",
                 lengths=[6, 0, 3, 5, 1])                   # an empty response row
    _compare_verl(case, [slice(None)], {}, mode=mode, **VERL_OPTIONS[option])


@needs_verl
@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo"])
def test_verl_dual_clip_and_gspo_without_it(loss_mode):
    """A token (vanilla) / a sequence (gspo) ratio above clip_ratio_c with A < 0: vanilla's
    dual clip caps it, gspo has none (verl's gspo ignores clip_ratio_c)."""
    case = _Case(seed=7, far=True, lengths=[6, 6, 4, 5, 2])
    for mode in ("token-mean", "seq-mean-token-mean"):
        _compare_verl(case, [slice(None)], {}, mode=mode, loss_mode=loss_mode, c=3.0)
    # the setting matters here: a smaller c changes vanilla's loss, never gspo's
    h, w = case.leaves32()
    l3 = _verl_adapter(case, h, w, mode="token-mean", loss_mode=loss_mode, c=3.0)
    l2 = _verl_adapter(case, h, w, mode="token-mean", loss_mode=loss_mode, c=1.5)
    assert (float(l3) != float(l2)) == (loss_mode == "vanilla")


@needs_verl
@pytest.mark.parametrize("mode", VERL_MODES)
def test_verl_uneven_micro_batches_with_mini_batch_totals(mode):
    """A mini-batch of 7 split 2 + 5 (uneven tokens): every micro-batch gets the mini-batch's
    totals as verl 0.9.1's engine passes them (batch_num_tokens = the mini-batch's scored
    tokens, global_batch_size = ppo_mini_batch_size * n, config.loss_scale_factor), backward
    undivided; the accumulated loss/gradients equal verl's and those of one big batch."""
    case = _Case(seed=11, b=7, lengths=[6, 1, 0, 4, 6, 2, 5])
    totals = dict(batch_num_tokens=int(case.mask.sum()), global_batch_size=case.b,
                  loss_scale_factor=8 if mode == "seq-mean-token-sum-norm" else None)
    opts = dict(mode=mode, ent_coef=0.01, kl_coef=0.05)
    acc = _compare_verl(case, [slice(0, 2), slice(2, 7)], totals, **opts)
    whole = _compare_verl(case, [slice(None)], totals, **opts)
    _close(acc, whole, "micro-batches vs one batch", 1.0)


@needs_verl
@pytest.mark.parametrize("mode", VERL_MODES)
def test_verl_data_parallel_scaling(mode):
    """dp_size = 2 (this rank's half, the global totals): verl's ``* dp_size`` compensates
    DDP/FSDP's gradient averaging; the adapter scales the same way."""
    case = _Case(seed=13, lengths=[5, 2, 6, 0, 3])
    totals = dict(dp_size=2, batch_num_tokens=2 * int(case.mask.sum()) + 3,
                  global_batch_size=2 * case.b)
    _compare_verl(case, [slice(None)], totals, mode=mode, kl_coef=0.05, ent_coef=0.01)
    with pytest.raises(ValueError, match="required when dp_size > 1"):
        h, w = case.leaves32()
        _verl_adapter(case, h, w, mode=mode if mode != "token-sum" else "token-mean",
                      dp_size=2)


@needs_verl
def test_verl_per_sequence_advantages_and_kl_clamp_off():
    """Advantages given per sequence [B] (verl's are per token: same loss); kl_clamp=None
    disables the cap (then the adapter differs from verl exactly where k3 > 10)."""
    case = _Case(seed=17, far=True, lengths=[6, 3, 4, 5, 2], per_token_adv=False)
    _compare_verl(case, [slice(None)], {}, mode="token-mean", kl_coef=0.1)
    h, w = case.leaves32()
    capped = _verl_adapter(case, h, w, mode="token-mean", kl_coef=0.1)
    raw, _ = verl_policy_loss(h, w, case.ids[:, case.p:], case.mask, case.adv, case.old,
                              case.ref, loss_agg_mode="token-mean", clip_ratio_high=0.28,
                              kl_loss_coef=0.1, kl_clamp=None)
    assert float(raw) > float(capped)


# ============================================================================ OpenRLHF 0.11.2


class _FakeModel:
    """Stands for OpenRLHF's ``Actor``: returns the float64 log-probs / entropy of the
    actions exactly as ``Actor.forward`` lays them out (``log_probs[:, -A:] * action_mask``,
    ``output.entropy = entropy[:, :-1]``)."""

    def __init__(self, h64, w64):
        self.h64, self.w64 = h64, w64

    def train(self):
        pass

    def __call__(self, sequences, action_mask, **kwargs):
        lp, ent = _next_token_logp_entropy(self.h64, self.w64, sequences)
        a = action_mask.shape[1]
        return lp[:, :-1][:, -a:] * action_mask, types.SimpleNamespace(entropy=ent[:, :-1])


def _openrlhf_trainer(h64, w64, *, gas, eps_l, eps_h, dual_clip, token_level, ptype,
                      ent_coef, kl_coef):
    NS = types.SimpleNamespace
    args = NS(actor=NS(entropy_coef=ent_coef, aux_loss_coef=0.0,
                       loss_agg_mode="token-mean" if token_level else "seq-mean-token-mean"),
              algo=NS(kl=NS(use_loss=kl_coef > 0, init_coef=kl_coef, estimator="k3",
                            unbiased_gradient=False)),
              train=NS(dynamic_batch_enable=False))
    losses = []

    def backward(loss, model, optim):   # DeepSpeed's engine.backward: loss / gas
        losses.append(loss.detach())
        (loss / gas).backward()
    strategy = NS(ring_attn_group=None, accumulated_gradient=gas, backward=backward,
                  optimizer_step=lambda *a, **k: None, get_grad_norm=lambda model: 0.0)
    return NS(losses=losses, actor=_FakeModel(h64, w64), args=args, strategy=strategy, aux_loss=False,
              ema_model=None, actor_optim=None, replay_buffer=None,
              actor_scheduler=NS(get_last_lr=lambda: [0.0]),
              actor_loss_fn=ORL.PolicyLoss(clip_eps_low=eps_l, clip_eps_high=eps_h,
                                           dual_clip=dual_clip, token_level_loss=token_level,
                                           policy_loss_type=ptype))


ORL_OPTIONS = {
    "ppo-token": dict(token_level=True),
    "ppo-seq": dict(token_level=False),
    "ppo-token-dual+entropy+kl": dict(token_level=True, dual_clip=3.0, ent_coef=0.01,
                                      kl_coef=0.05),
    "ppo-seq-dual+entropy+kl": dict(token_level=False, dual_clip=3.0, ent_coef=0.01,
                                    kl_coef=0.05),
    "ppo-seq-kl-clamped": dict(token_level=False, kl_coef=0.1),
    "gspo": dict(ptype="gspo"),                                # token_level_loss=True given
    "gspo-dual+entropy+kl": dict(ptype="gspo", dual_clip=3.0, ent_coef=0.02, kl_coef=0.05),
}


def _compare_openrlhf(case, micro, gas, *, token_level=True, ptype="ppo", dual_clip=None,
                      ent_coef=0.0, kl_coef=0.0, eps_l=0.2, eps_h=0.28):
    """The micro-batches ``micro`` (row slices) as one optimizer step of ``gas`` micro-batches:
    OpenRLHF's training_step with iter_grad_accum_global_norm's totals vs the adapter fed the
    same totals; both backward ``loss / gas``."""
    h, w = case.leaves32()
    h64, w64 = case.leaves64()
    a = case.r
    pieces = [case.rows(sl) for sl in micro]
    with torch.no_grad():
        infos = [info for _, info in ORL.iter_grad_accum_global_norm(
            iter(pieces), types.SimpleNamespace(), gas, lambda mb: mb.mask.bool())]
    tot32 = tot64 = scale = 0.0
    for sl, mb, info in zip(micro, pieces, infos):
        trainer = _openrlhf_trainer(h64[sl], w64, gas=gas, eps_l=eps_l, eps_h=eps_h,
                                    dual_clip=dual_clip, token_level=token_level, ptype=ptype,
                                    ent_coef=ent_coef if ent_coef else None, kl_coef=kl_coef)
        amask = mb.mask.bool()
        exp = ORL.Experience(sequences=mb.ids, attention_mask=torch.ones_like(mb.ids),
                             action_mask=amask, action_log_probs=mb.old.double() * amask,
                             base_action_log_probs=mb.ref.double() * amask,
                             advantages=(mb.adv if mb.adv.dim() == 2
                                         else mb.adv[:, None].expand(mb.b, a)).double(),
                             info={})
        status = ORL.ActorPPOTrainer.training_step(trainer, exp, kl_coef, 0, info)
        assert status["num_action_tokens"] == float(amask.sum())
        l32, _ = openrlhf_policy_loss(h[sl], w, mb.ids, amask, mb.adv, mb.old, mb.ref,
                                      clip_eps_low=eps_l, clip_eps_high=eps_h,
                                      dual_clip=dual_clip, token_level_loss=token_level,
                                      policy_loss_type=ptype, kl_coef=kl_coef,
                                      entropy_coef=ent_coef, **info)
        (l32 / gas).backward()
        tot32 = tot32 + l32.detach() / gas
        tot64 = tot64 + trainer.losses[-1] / gas
        scale += float(ORL.aggregate_loss(torch.ones(mb.b, a, dtype=torch.float64), amask,
                                          token_level_loss=trainer.actor_loss_fn.token_level_loss,
                                          **info)) / gas
    _close(tot32, tot64, "loss", scale)
    _close(h.grad, h64.grad, "d hidden")
    _close(w.grad, w64.grad, "d lm_head weight")
    return tot32


@needs_openrlhf
@pytest.mark.parametrize("option", list(ORL_OPTIONS))
def test_openrlhf_one_batch(option):
    """Each PolicyLoss option, one micro-batch, with an empty action row (OpenRLHF's
    per-sample mean divides by the non-empty rows)."""
    case = _Case(seed=31 + len(option), far=option == "ppo-seq-kl-clamped",
                 lengths=[6, 0, 3, 5, 1])
    _compare_openrlhf(case, [slice(None)], 1, **ORL_OPTIONS[option])


@needs_openrlhf
@pytest.mark.parametrize("option", ["ppo-token-dual+entropy+kl", "ppo-seq-dual+entropy+kl",
                                    "gspo-dual+entropy+kl"])
def test_openrlhf_gradient_accumulation_over_the_step(option):
    """gas = 3 uneven micro-batches (1 + 2 + 4 rows, an empty one inside): OpenRLHF
    normalizes over the whole optimizer step (batch_num_tokens / global_batch_size of the step,
    / gas for DeepSpeed's 1/gas); the adapter given the same loss_batch_info matches, and the
    step equals one batch of all rows."""
    case = _Case(seed=41, b=7, far=True, lengths=[6, 2, 0, 5, 6, 1, 4])
    acc = _compare_openrlhf(case, [slice(0, 1), slice(1, 3), slice(3, 7)], 3,
                            **ORL_OPTIONS[option])
    whole = _compare_openrlhf(case, [slice(None)], 1, **ORL_OPTIONS[option])
    _close(acc, whole, "3 micro-batches vs one batch", 1.0)


@needs_openrlhf
def test_openrlhf_dual_clip_far_ratios_and_per_sequence_advantages():
    """Token / sequence ratios above dual_clip with A < 0, k3 > 10, advantages per sequence."""
    case = _Case(seed=43, far=True, lengths=[6, 6, 4, 5, 2], per_token_adv=False)
    for option in ("ppo-token-dual+entropy+kl", "gspo-dual+entropy+kl"):
        _compare_openrlhf(case, [slice(None)], 1, **ORL_OPTIONS[option])


@needs_openrlhf
def test_openrlhf_gspo_ignores_token_level_loss():
    """PolicyLoss(policy_loss_type="gspo") forces token_level_loss=False: both settings of the
    adapter give the same loss."""
    case = _Case(seed=47, lengths=[6, 1, 3, 5, 2])
    h, w = case.leaves32()
    l1, _ = openrlhf_policy_loss(h, w, case.ids, case.mask, case.adv, case.old,
                                 policy_loss_type="gspo", token_level_loss=True)
    l2, _ = openrlhf_policy_loss(h, w, case.ids, case.mask, case.adv, case.old,
                                 policy_loss_type="gspo", token_level_loss=False)
    assert float(l1) == float(l2)
    assert ORL.PolicyLoss(policy_loss_type="gspo", token_level_loss=True).token_level_loss is False


@needs_openrlhf
@pytest.mark.parametrize("option", list(ORL_OPTIONS))
def test_openrlhf_policy_loss_called_without_batch_totals(option):
    """``PolicyLoss`` / ``aggregate_loss`` called bare (no dp_size / batch_num_tokens /
    global_batch_size, as a custom actor would): a masked token mean, or a mean over the
    NON-EMPTY rows' sequence means; KL and entropy token means (training_step's composition).
    The adapter called without totals matches, empty action row included."""
    o = {**dict(token_level=True, ptype="ppo", dual_clip=None, ent_coef=0.0, kl_coef=0.0),
         **ORL_OPTIONS[option]}
    case = _Case(seed=53 + len(option), far=True, lengths=[5, 0, 6, 2, 0])
    h, w = case.leaves32()
    h64, w64 = case.leaves64()
    amask = case.mask.bool()
    logp, out = _FakeModel(h64, w64)(case.ids, amask)
    loss_fn = ORL.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=o["dual_clip"],
                             token_level_loss=o["token_level"], policy_loss_type=o["ptype"])
    ref_loss = loss_fn(logp, case.old.double() * amask, case.adv.double(), action_mask=amask)[0]
    kl = ORL.compute_approx_kl(logp, case.ref.double() * amask, kl_estimator="k3")
    ref_loss = ref_loss + o["kl_coef"] * ORL.aggregate_loss(kl, amask)
    ref_loss = ref_loss - o["ent_coef"] * ORL.aggregate_loss(out.entropy[:, -case.r:], amask)
    ref_loss.backward()
    loss, _ = openrlhf_policy_loss(h, w, case.ids, amask, case.adv, case.old, case.ref,
                                   clip_eps_low=0.2, clip_eps_high=0.28,
                                   dual_clip=o["dual_clip"], token_level_loss=o["token_level"],
                                   policy_loss_type=o["ptype"], kl_coef=o["kl_coef"],
                                   entropy_coef=o["ent_coef"])
    loss.backward()
    scale = ORL.aggregate_loss(torch.ones(case.b, case.r, dtype=torch.float64), amask,
                               token_level_loss=loss_fn.token_level_loss)
    _close(loss, ref_loss, "loss", scale)
    _close(h.grad, h64.grad, "d hidden")
    _close(w.grad, w64.grad, "d lm_head weight")
