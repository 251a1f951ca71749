"""TRL's ``GRPOTrainer`` with its policy loss computed by fastgrpo's fused kernel.

Usage (the only change to a TRL script is the class name)::

    from fastgrpo.integrations.trl import FastGRPOTrainer
    trainer = FastGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), ...)
    trainer.train()

or, for a trainer that already exists (any ``GRPOTrainer`` subclass)::

    from fastgrpo.integrations.trl import patch_grpo_trainer
    patch_grpo_trainer(trainer)

What changes: in ``compute_loss`` the model runs its backbone only (no lm_head, through the
wrapped model so DDP / PEFT / autocast behave as in TRL), and ``fastgrpo.grpo_loss`` turns the
completion positions' hidden states and ``lm_head.weight`` into the loss, with TRL's settings
mapped one to one:

==================================  =====================================================
TRL (``GRPOConfig``)                fastgrpo ``grpo_loss``
==================================  =====================================================
``loss_type`` grpo/bnpo/dr_grpo/    ``loss_type`` (same name), ``num_items_in_batch`` =
dapo                                TRL's normalizer x gradient-accumulation steps
``epsilon`` / ``epsilon_high``      ``epsilon_low`` / ``epsilon_high``
``delta``                           ``delta`` (dual clip)
``beta`` + ref log-probs            ``beta`` + ``ref_logp`` (k3 KL)
old log-probs (``num_iterations``)  ``old_logp`` (absent = on-policy)
``importance_sampling_level``       ``importance_sampling_level`` (token / sequence)
``temperature``                     ``temperature``
``max_completion_length``           ``max_completion_length`` (dr_grpo)
``entropy_coef`` (``bnpo`` only)    ``entropy_coef``
vLLM IS correction (truncate/mask)  folded into per-token advantages ``A * w`` (``w >= 0``)
``tool_mask``                       multiplied into the completion mask
==================================  =====================================================

Everything else TRL does (generation, rewards, advantages, old/ref log-probs, logging) is
TRL's own code.  Options fastgrpo does not implement are refused when the trainer is built,
with a ``ValueError`` naming the option: the loss types ``cispo``, ``sapo``, ``vespo``,
``luspo``; ``top_entropy_quantile < 1``; ``off_policy_mask_threshold``;
``use_bias_correction_kl=True`` with ``beta != 0`` (TRL's default: pass
``use_bias_correction_kl=False`` for GRPO's plain k3 KL); ``use_adaptive_entropy``;
``entropy_coef`` with a loss type other than ``bnpo`` (TRL normalizes its entropy bonus as a
token mean whatever the loss type);
MoE router auxiliary losses; models with logit soft-capping, logit scaling or an lm_head bias.
Multimodal batches (``pixel_values`` ...) raise ``NotImplementedError`` at the first step.

Logged metrics (into TRL's ``_metrics``, reduced across processes like TRL's):
``entropy``, ``kl`` (when ``beta != 0``), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
``clip_ratio/region_mean`` and, with an entropy bonus, ``policy_loss`` / ``entropy_coef``.
TRL's per-sequence extremes ``clip_ratio/low_min`` / ``clip_ratio/high_max`` are not logged
(they need per-token ratios, which the fused loss never materializes), and with
``importance_sampling_level="sequence"`` the clip fractions are token-weighted (TRL weights
each sequence once).
"""

from __future__ import annotations

import types

try:
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without TRL
    raise ImportError(
        "fastgrpo.integrations.trl needs TRL: pip install \"fastgrpo[trl]\" (or pip install trl)"
    ) from e

import torch

from fastgrpo.hf import backbone_output, lm_head_weight, unwrap_model
from fastgrpo.ops.loss import LOSS_TYPES, grpo_loss

__all__ = ["FastGRPOTrainer", "patch_grpo_trainer", "check_supported", "SUPPORTED_LOSS_TYPES"]

SUPPORTED_LOSS_TYPES = LOSS_TYPES  # TRL's loss types that the fused loss implements
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes",
                    "image_sizes", "num_images", "image_position_ids", "mm_token_type_ids",
                    "token_type_ids")


def _refuse(option, value, why):
    raise ValueError(f"fastgrpo's fused GRPO loss does not support {option}={value!r}: {why}. "
                     f"Change the option or use TRL's own GRPOTrainer.")


def check_supported(args, model=None) -> None:
    """Raise ``ValueError`` naming the first ``GRPOConfig`` option (or model property) the fused
    loss cannot reproduce exactly; return ``None`` when everything maps."""
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    if g("loss_type") not in SUPPORTED_LOSS_TYPES:
        _refuse("loss_type", g("loss_type"), f"supported loss types are {SUPPORTED_LOSS_TYPES}")
    if g("top_entropy_quantile", 1.0) < 1.0:
        _refuse("top_entropy_quantile", g("top_entropy_quantile"),
                "the high-entropy token mask needs every token's entropy before the loss")
    if g("off_policy_mask_threshold") is not None:
        _refuse("off_policy_mask_threshold", g("off_policy_mask_threshold"),
                "off-policy sequence masking is not implemented")
    if g("beta", 0.0) and g("use_bias_correction_kl", False):
        _refuse("use_bias_correction_kl", True, f"with beta={g('beta')!r} TRL multiplies the KL by "
                f"the importance ratio, which the fused loss does not implement; set "
                f"use_bias_correction_kl=False for GRPO's plain k3 KL")
    if g("use_adaptive_entropy", False):
        _refuse("use_adaptive_entropy", True, "the adaptive entropy controller is not implemented")
    if g("entropy_coef", 0.0) and g("loss_type") != "bnpo":
        _refuse("entropy_coef", g("entropy_coef"),
                f"TRL normalizes its entropy bonus as a token mean, which equals fastgrpo's "
                f"loss-type-weighted bonus only for loss_type='bnpo' (got {g('loss_type')!r})")
    if g("use_vllm", False) and g("vllm_importance_sampling_correction", False):
        mode = g("vllm_importance_sampling_mode")
        if mode not in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
            _refuse("vllm_importance_sampling_mode", mode, "unknown mode")
    if model is None:
        return
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        _refuse("final_logit_softcapping", cfg.final_logit_softcapping,
                "logit soft-capping is not implemented in the fused kernel")
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        val = getattr(cfg, name, None)
        if val is not None and val != 1.0:
            _refuse(f"config.{name}", val, "scaled logits are not implemented")
    coef = g("router_aux_loss_coef")
    coef = getattr(cfg, "router_aux_loss_coef", 0.0) if coef is None else coef
    if hasattr(cfg, "output_router_logits") and coef:
        _refuse("router_aux_loss_coef", coef, "the MoE router auxiliary loss needs the "
                "model's full forward; set router_aux_loss_coef=0.0")
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    if getattr(head, "bias", None) is not None:
        _refuse("lm_head.bias", "present", "the fused kernel takes a bias-free lm_head")


def _inner_model(trainer):
    """The ``PreTrainedModel`` whose ``forward`` TRL patched (the PEFT base model if any)."""
    return unwrap_model(trainer.model)


def _install_backbone_forward(model) -> None:
    """Let ``model(..., fastgrpo_backbone=True)`` return the backbone's output (no lm_head).

    Wraps whatever ``forward`` the model has now (TRL's fused-LM-head forward), so calls
    through the wrapped model (DDP, PEFT, accelerate hooks) reach it with the extra kwarg."""
    if getattr(model, "_fastgrpo_backbone_forward", False):
        return
    previous = model.forward

    def forward(self, *args, fastgrpo_backbone=False, **kwargs):
        if not fastgrpo_backbone:
            return previous(*args, **kwargs)
        return backbone_output(self, **kwargs)

    model.forward = types.MethodType(forward, model)
    model._fastgrpo_backbone_forward = True


class _FastGRPOMixin:
    """Overrides ``GRPOTrainer._compute_loss``; see the module docstring."""

    fastgrpo_backend: str = "auto"

    def _fastgrpo_setup(self, backend: str = "auto") -> None:
        check_supported(self.args, _inner_model(self))
        self.fastgrpo_backend = backend
        _install_backbone_forward(_inner_model(self))

    def _compute_loss(self, model, inputs):
        for key in _MULTIMODAL_KEYS:
            if inputs.get(key) is not None:
                raise NotImplementedError(f"FastGRPOTrainer takes text-only batches; this batch "
                                          f"has {key!r}")
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        t = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else \
            completion_mask * inputs["tool_mask"]

        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask,
                        fastgrpo_backbone=True)
        hidden = out.last_hidden_state[:, -t - 1:-1]          # states that predict the completion
        weight = lm_head_weight(self.model)
        hidden = hidden.to(weight.device)
        if self.args.cast_lm_head_to_fp32:
            hidden, weight = hidden.float(), weight.float()
        elif hidden.dtype != weight.dtype:                    # autocast: matmuls in its dtype
            weight = weight.to(hidden.dtype)

        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            # TRL multiplies the clipped policy term by w >= 0 (detached): -min(r A, clip(r) A) w
            # = -min(r (A w), clip(r) (A w)), so per-token advantages A * w are exact.
            w = inputs["importance_sampling_ratio"]
            advantages = torch.where(mask.bool(), advantages * w, torch.zeros_like(advantages * w))
        elif advantages.size(1) == 1:
            advantages = advantages.squeeze(1)

        mode = "train" if self.model.training else "eval"
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        n_tokens = mask.sum().clamp(min=1.0).float()
        if self.loss_type == "grpo":
            num_items = mask.size(0) * ga
        elif self.loss_type == "bnpo":
            num_items = n_tokens * ga
        elif self.loss_type == "dr_grpo":
            num_items = mask.size(0) * self.max_completion_length * ga
        else:  # dapo: TRL rescales the generation batch's token count to one window
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * ga / self.args.steps_per_generation
        num_items = float(num_items)

        bonus = getattr(self, "_entropy_bonus_enabled", bool(getattr(self, "entropy_coef", 0.0)))
        entropy_coef = float(self.entropy_coef) if bonus else 0.0
        device_type = hidden.device.type
        with torch.autocast(device_type, enabled=False):
            loss, metrics = grpo_loss(
                hidden, weight, completion_ids, advantages, completion_mask=mask,
                old_logp=inputs.get("old_per_token_logps"),
                ref_logp=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
                beta=float(self.beta), epsilon_low=float(self.epsilon_low),
                epsilon_high=float(self.epsilon_high), delta=self.args.delta,
                temperature=float(self.temperature), entropy_coef=entropy_coef,
                importance_sampling_level=self.importance_sampling_level,
                loss_type=self.loss_type, num_items_in_batch=num_items,
                max_completion_length=self.max_completion_length,
                backend=self.fastgrpo_backend)
        self._fastgrpo_log(mode, metrics, loss, entropy_coef, ga)
        return loss

    def _fastgrpo_log(self, mode, metrics, loss, entropy_coef, ga):
        dev = self.accelerator.device
        n = metrics["num_tokens"].to(dev)
        names = ["entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                 "clip_ratio/region_mean"]
        if self.beta != 0.0:
            names.insert(0, "kl")
        # token-weighted means over all processes, like TRL's global_masked_mean
        stacked = torch.stack([metrics[k].to(dev) * n for k in names] + [n])
        totals = self.accelerator.reduce(stacked, reduction="sum")
        for i, k in enumerate(names):
            self._metrics[mode][k].append((totals[i] / totals[-1].clamp(min=1.0)).item())
        if entropy_coef:  # bnpo only: loss = (policy - coef * H) / ga
            policy = loss.detach() * ga + entropy_coef * metrics["entropy"].to(dev)
            self._metrics[mode]["policy_loss"].append(
                self.accelerator.gather(policy).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)


class FastGRPOTrainer(_FastGRPOMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` whose policy loss is fastgrpo's fused kernel.

    Same constructor as ``GRPOTrainer`` plus ``fastgrpo_backend`` (``"auto"``, ``"torch"``,
    ``"triton"``).  Raises ``ValueError`` for options the fused loss cannot reproduce (see the
    module docstring) before any model is loaded.
    """

    def __init__(self, *args, fastgrpo_backend: str = "auto", **kwargs):
        config = kwargs.get("args")
        if config is None and len(args) >= 3:
            config = args[2]
        if config is not None:
            check_supported(config)
        super().__init__(*args, **kwargs)
        self._fastgrpo_setup(fastgrpo_backend)


def patch_grpo_trainer(trainer, *, backend: str = "auto"):
    """Switch an existing ``GRPOTrainer`` (or subclass) instance to the fused loss, in place.

    The instance's class becomes a subclass of its own class with fastgrpo's
    ``_compute_loss``; returns the trainer.  Raises ``ValueError`` like ``FastGRPOTrainer``.
    """
    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"patch_grpo_trainer takes a trl.GRPOTrainer, got "
                        f"{type(trainer).__name__}")
    if not isinstance(trainer, _FastGRPOMixin):
        check_supported(trainer.args, _inner_model(trainer))
        cls = type(trainer)
        trainer.__class__ = type(f"Fast{cls.__name__}", (_FastGRPOMixin, cls), {})
    trainer._fastgrpo_setup(backend)
    return trainer

