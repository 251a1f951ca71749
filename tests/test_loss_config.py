"""``LossConfig``: every ``grpo_loss`` option in one frozen, validated dataclass.

The config form must give the float64 reference's loss and gradients (``tests/test_loss.py``'s
``reference_loss``, the objective as STEPGRPO.md writes it) exactly as the keyword form does;
keywords next to a config override its fields; bad options raise naming the option; the
trainer's config, the verl / OpenRLHF adapters and ``FusedGRPOLoss`` build one."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from fastgrpo import FusedGRPOLoss, LossConfig, grpo_loss
from fastgrpo.ops.loss_config import LossConfigError
from fastgrpo.trainer.config import ConfigError, parse_args
from test_loss import TOL, grads, make_batch, reference_loss

# the options grpo_loss took as keywords before LossConfig (the public API that must not break)
OPTIONS = {"beta", "epsilon_low", "epsilon_high", "delta", "temperature", "entropy_coef",
           "importance_sampling_level", "loss_type", "max_completion_length", "egsw_alpha",
           "egsw_temperature", "group_size", "kl_clamp", "kl_entropy_normalizer",
           "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos",
           "vespo_k_neg", "vespo_lambda_neg", "top_entropy_quantile", "off_policy_mask_threshold",
           "bias_correction_kl", "entropy_mean_divisor", "ignore_index", "backend", "one_pass"}


def test_every_option_is_a_field_and_none_is_a_call_argument():
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    assert fields == OPTIONS
    assert not fields & set(inspect.signature(grpo_loss).parameters)


@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dapo", "sequence"), ("dr_grpo", "token")])
def test_config_and_keywords_both_match_the_float64_reference(loss_type, level):
    h, w, y, mask, adv, old, ref = make_batch(seed=hash((loss_type, level)) % 1000, temperature=0.7)
    opts = dict(beta=0.05, epsilon_low=0.15, epsilon_high=0.3, temperature=0.7, entropy_coef=0.02,
                importance_sampling_level=level, loss_type=loss_type, max_completion_length=9)
    cfg = LossConfig(**opts)
    by_config = grads(lambda a, b: grpo_loss(a, b, y, adv, completion_mask=mask, old_logp=old,
                                             ref_logp=ref, config=cfg), h, w)
    by_keywords = grads(lambda a, b: grpo_loss(a, b, y, adv, completion_mask=mask, old_logp=old,
                                               ref_logp=ref, **opts), h, w)
    want = grads(lambda a, b: reference_loss(a, b, y, mask, adv, old=old, ref=ref, beta=0.05,
                                             eps_low=0.15, eps_high=0.3, temperature=0.7,
                                             entropy_coef=0.02, level=level, loss_type=loss_type,
                                             max_len=9), h.double(), w.double())
    for got in (by_config, by_keywords):
        for g, r in zip(got[:3], want[:3]):
            torch.testing.assert_close(g, r, **TOL)
    for g, k in zip(by_config[:3], by_keywords[:3]):
        assert torch.equal(g, k)


def test_keywords_next_to_a_config_override_its_fields():
    h, w, y, mask, adv, old, _ = make_batch(seed=5)
    base = LossConfig(loss_type="grpo", epsilon_low=0.1)
    got, _ = grpo_loss(h, w, y, adv, completion_mask=mask, old_logp=old, config=base,
                       loss_type="bnpo", epsilon_high=0.3)
    want = reference_loss(h, w, y, mask, adv, old=old, eps_low=0.1, eps_high=0.3, loss_type="bnpo")
    torch.testing.assert_close(got.double(), want, **TOL)
    assert base.loss_type == "grpo"                          # the config itself is unchanged


def test_frozen_and_validated_once():
    cfg = LossConfig(loss_type="dapo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.beta = 1.0
    assert cfg.clip_high == 0.2 and LossConfig(epsilon_high=0.28).clip_high == 0.28
    assert cfg.replace(beta=0.1) == LossConfig(loss_type="dapo", beta=0.1)


@pytest.mark.parametrize("bad, option", [
    (dict(loss_type="ppo"), "loss_type"), (dict(importance_sampling_level="seq"), "importance_sampling_level"),
    (dict(epsilon_low=1.0), "epsilon_low"), (dict(epsilon_high=float("nan")), "epsilon_high"),
    (dict(beta=-0.1), "beta"), (dict(delta=0.9), "delta"), (dict(kl_clamp=0.0), "kl_clamp"),
    (dict(entropy_mean_divisor=2.0, kl_entropy_normalizer=3.0), "entropy_mean_divisor"),
    (dict(top_entropy_quantile=1.5), "top_entropy_quantile"), (dict(entropy_coef=float("inf")), "entropy_coef"),
    (dict(loss_type="cispo", epsilon_high=0.0), "epsilon_high"),
])
def test_a_bad_option_raises_naming_it(bad, option):
    with pytest.raises(LossConfigError) as e:
        LossConfig(**bad)
    assert e.value.option == option and option.split("_")[0] in str(e.value)
    assert isinstance(e.value, ValueError)                   # grpo_loss's documented error type
    with pytest.raises(ValueError):
        LossConfig().replace(**bad)


def test_the_trainer_builds_its_loss_config_from_the_command_line():
    cfg = parse_args(["--loss-type", "dapo", "--beta", "0.04", "--epsilon-high", "0.28",
                      "--temperature", "0.9", "--backend", "torch"])
    assert cfg.loss_config() == LossConfig(loss_type="dapo", beta=0.04, epsilon_low=0.2,
                                           epsilon_high=0.28, temperature=0.9, backend="torch")
    assert parse_args([]).loss_config().clip_high == parse_args([]).epsilon_low
    with pytest.raises(ConfigError, match=r"invalid --epsilon-low 1.0: must be < 1"):
        parse_args(["--epsilon-low", "1.0"])
    with pytest.raises(ConfigError, match=r"invalid --importance-sampling-level 'seq': choose one of token"):
        parse_args(["--importance-sampling-level", "seq"])


def test_module_holds_a_config():
    h, w, y, mask, adv, old, _ = make_batch(seed=9)
    mod = FusedGRPOLoss(LossConfig(loss_type="bnpo"), epsilon_low=0.1)
    assert mod.config == LossConfig(loss_type="bnpo", epsilon_low=0.1)
    assert "loss_type='bnpo'" in repr(mod) and "beta" not in repr(mod)
    got, _ = mod(h, w, y, adv, completion_mask=mask, old_logp=old)
    want = reference_loss(h, w, y, mask, adv, old=old, eps_low=0.1, eps_high=0.1, loss_type="bnpo")
    torch.testing.assert_close(got.double(), want, **TOL)


def test_an_adapter_refuses_an_option_it_sets_and_passes_the_others():
    from fastgrpo.integrations.generic import openrlhf_policy_loss, verl_policy_loss
    h, w, y, mask, adv, old, _ = make_batch(seed=3)
    r = y.shape[1] - 1
    args = (h, w, y[:, 1:], mask[:, 1:], adv, old[:, 1:])
    with pytest.raises(TypeError, match="'loss_type'"):
        verl_policy_loss(*args, loss_type="grpo")
    with pytest.raises(TypeError, match="'kl_entropy_normalizer'"):
        openrlhf_policy_loss(*args, kl_entropy_normalizer=2.0)
    got, _ = verl_policy_loss(*args, loss_agg_mode="token-mean", one_pass=False)
    want = reference_loss(h[:, :r], w, y[:, 1:], mask[:, 1:], adv, old=old[:, 1:], delta=3.0,
                          loss_type="bnpo")  # verl: dual clip at clip_ratio_c=3, token-mean
    torch.testing.assert_close(got.double(), want, **TOL)
