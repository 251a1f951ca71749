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
TRL (``GRPOConfig``)                fastgrpo ``LossConfig`` / ``grpo_loss``
==================================  =====================================================
``loss_type`` (all of TRL 1.16's:   ``loss_type`` (same name), ``num_items_in_batch`` =
grpo/bnpo/dr_grpo/dapo/cispo/sapo/  TRL's normalizer x gradient-accumulation steps
luspo/vespo)
``epsilon`` / ``epsilon_high``      ``epsilon_low`` / ``epsilon_high`` (cispo: the cap)
``delta``                           ``delta`` (dual clip)
``sapo_temperature_pos|neg``        ``sapo_temperature_pos|neg``
``vespo_k|lambda_pos|neg``          ``vespo_k|lambda_pos|neg``
``beta`` + ref log-probs            ``beta`` + ``ref_logp`` (k3 KL)
``use_bias_correction_kl``          ``bias_correction_kl`` (KL x IS ratio)
old log-probs (``num_iterations``)  ``old_logp`` (absent = on-policy)
``importance_sampling_level``       ``importance_sampling_level`` (token / sequence)
``top_entropy_quantile``            ``top_entropy_quantile`` + ``gather_entropies`` (the
                                    threshold over all processes' tokens, as TRL's)
``off_policy_mask_threshold``       ``off_policy_mask_threshold`` + ``sampling_logp``
``temperature``                     ``temperature``
``max_completion_length``           ``max_completion_length`` (dr_grpo)
``entropy_coef`` (any loss type)    ``entropy_coef`` + ``entropy_mean_divisor`` = accumulation
                                    steps (a token mean over the kept tokens, as TRL's);
``use_adaptive_entropy``            TRL's controller, run here on the loss's entropy sums
vLLM IS correction (truncate/mask)  folded into per-token advantages ``A * w`` (``w >= 0``);
                                    vespo: ``vespo_seq_log_weight`` = sum of ``log w``
``tool_mask``                       multiplied into the completion mask
==================================  =====================================================

Everything else TRL does (generation, rewards, advantages, old/ref log-probs, logging) is
TRL's own code.  Options fastgrpo does not implement are refused when the trainer is built,
with a ``ValueError`` naming the option: MoE router auxiliary losses (they need the model's
full forward); models with logit soft-capping, logit scaling or an lm_head bias (not in the
fused kernel).
Vision-language batches (TRL's layout: ``pixel_values`` of the batch's images in order,
``image_grid_thw``, ``mm_token_type_ids`` over prompt + completion, ...) go to the backbone as
TRL gives them to the model; the fused loss still sees only the language model's hidden states.

Logged metrics (into TRL's ``_metrics``, reduced across processes like TRL's):
``entropy``, ``kl`` (when ``beta != 0``), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
``clip_ratio/region_mean`` (clipped loss types), ``cispo_clip_ratio`` (cispo),
``vespo/phi_seq_mean`` (vespo) and, with an entropy bonus, ``policy_loss`` / ``entropy_coef``.
TRL's per-sequence extremes ``clip_ratio/low_min`` / ``clip_ratio/high_max`` are not logged
(they need per-token ratios, which the fused loss never materializes), and with
``importance_sampling_level="sequence"`` the clip fractions are token-weighted (TRL weights
each sequence once).
"""

from __future__ import annotations

import math
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
from fastgrpo.ops.loss_config import LossConfig
from fastgrpo.ops.sharded import cast_weight

__all__ = ["FastGRPOTrainer", "patch_grpo_trainer", "check_supported", "SUPPORTED_LOSS_TYPES"]

SUPPORTED_LOSS_TYPES = LOSS_TYPES  # TRL's loss types that the fused loss implements
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes",
                    "image_sizes", "image_position_ids", "mm_token_type_ids", "token_type_ids")


def _refuse(option, value, why):
    raise ValueError(f"fastgrpo's fused GRPO loss does not support {option}={value!r}: {why}. "
                     f"Change the option or use TRL's own GRPOTrainer.")


def check_supported(args, model=None) -> None:
    """Raise ``ValueError`` naming the first ``GRPOConfig`` option (or model property) the fused
    loss cannot reproduce exactly; return ``None`` when everything maps."""
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    if g("loss_type") not in SUPPORTED_LOSS_TYPES:
        _refuse("loss_type", g("loss_type"), f"supported loss types are {SUPPORTED_LOSS_TYPES}")
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
        # vision-language batches (TRL's layout: pixel values of all the batch's images in
        # order, image_grid_thw / mm_token_type_ids / ...): the model's own forward arguments,
        # passed as TRL passes them (num_images / num_tiles are TRL's bookkeeping, not inputs)
        mm = {k: inputs[k] for k in _MULTIMODAL_KEYS if inputs.get(k) is not None}
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        t = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else \
            completion_mask * inputs["tool_mask"]

        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask,
                        fastgrpo_backbone=True, **mm)
        hidden = out.last_hidden_state[:, -t - 1:-1]          # states that predict the completion
        weight = lm_head_weight(self.model)
        hidden = hidden.to(weight.device)
        # a DeepSpeed ZeRO-3 weight is partitioned here: the op gathers it (ops/sharded.py)
        if self.args.cast_lm_head_to_fp32:
            hidden, weight = hidden.float(), cast_weight(weight, torch.float32)
        elif hidden.dtype != weight.dtype:                    # autocast: matmuls in its dtype
            weight = cast_weight(weight, hidden.dtype)

        advantages, vespo_log_w = self._fastgrpo_advantages(inputs, mask)
        mode = "train" if self.model.training else "eval"
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        num_items = self._fastgrpo_num_items(inputs, mask, mode, ga)
        bonus = getattr(self, "_entropy_bonus_enabled", bool(getattr(self, "entropy_coef", 0.0)))
        entropy_coef = float(self.entropy_coef) if bonus else 0.0
        adaptive = getattr(self, "use_adaptive_entropy", False)
        if adaptive and not self._last_world_entropy <= self.args.entropy_target:
            entropy_coef = 0.0   # TRL: the coefficient applies only at or below the target
        with torch.autocast(hidden.device.type, enabled=False):
            loss, metrics = grpo_loss(
                hidden, weight, completion_ids, advantages, completion_mask=mask,
                old_logp=inputs.get("old_per_token_logps"),
                ref_logp=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
                num_items_in_batch=num_items, vespo_seq_log_weight=vespo_log_w,
                gather_entropies=self._fastgrpo_gather_entropies,
                sampling_logp=inputs.get("sampling_per_token_logps"),
                config=self._fastgrpo_loss_config(entropy_coef, ga))
        per_seq = inputs["advantages"].dim() == 1 or inputs["advantages"].size(1) == 1
        self._fastgrpo_log(mode, metrics, mask.size(0) if per_seq else None, ga, bonus)
        if adaptive and mode == "train":
            self._fastgrpo_adapt_entropy(metrics)
        if bonus and mode == "train" and self.accelerator.sync_gradients and adaptive:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)   # after the update
        return loss

    def _fastgrpo_loss_config(self, entropy_coef: float, ga: int) -> LossConfig:
        """The ``GRPOConfig`` (as the trainer resolved it) -> ``LossConfig`` mapping (the table in
        the module docstring)."""
        args = self.args
        return LossConfig(
            loss_type=self.loss_type, beta=float(self.beta), epsilon_low=float(self.epsilon_low),
            epsilon_high=float(self.epsilon_high), delta=args.delta,
            temperature=float(self.temperature), entropy_coef=entropy_coef,
            entropy_mean_divisor=float(ga), importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length,
            sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
            vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos,
            vespo_k_neg=args.vespo_k_neg, vespo_lambda_neg=args.vespo_lambda_neg,
            top_entropy_quantile=float(self.top_entropy_quantile),
            off_policy_mask_threshold=self.off_policy_mask_threshold,
            bias_correction_kl=bool(args.use_bias_correction_kl), backend=self.fastgrpo_backend)

    def _fastgrpo_advantages(self, inputs, mask):
        """Per-sequence or per-token advantages (vLLM's IS ratios folded in) and VESPO's
        per-sequence log weight."""
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        lt = self.loss_type
        vespo_log_w = None
        if lt == "vespo" and inputs.get("importance_sampling_ratio") is not None:
            # VESPO puts vLLM's IS ratios into its sequence weight (TRL sums their logs over all
            # positions, padding included)
            log_is = torch.log(inputs["importance_sampling_ratio"])
            vespo_log_w = torch.clamp(log_is, math.log(1e-8), 20.0).sum(-1)
        if self.use_vllm and self.vllm_importance_sampling_correction and lt != "vespo":
            # TRL multiplies the policy term by w >= 0 (detached); every policy term is linear in
            # A with its branch chosen by sign(A), so per-token advantages A * w are exact.
            w = inputs["importance_sampling_ratio"]
            advantages = torch.where(mask.bool(), advantages * w, torch.zeros_like(advantages * w))
        elif advantages.size(1) == 1:
            advantages = advantages.squeeze(1)
        return advantages, vespo_log_w

    def _fastgrpo_num_items(self, inputs, mask, mode: str, ga: int) -> float:
        """TRL's loss normalizer of this micro-batch, by loss type."""
        lt = self.loss_type
        n_tokens = mask.sum().clamp(min=1.0).float()
        if lt in ("grpo", "sapo", "luspo"):
            num_items = mask.size(0) * ga
        elif lt == "bnpo":
            num_items = n_tokens * ga
        elif lt == "dr_grpo":
            num_items = mask.size(0) * self.max_completion_length * ga
        else:  # dapo, cispo, vespo: TRL rescales the generation batch's token count to one window
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * ga / self.args.steps_per_generation
        return float(num_items)

    def _fastgrpo_adapt_entropy(self, metrics):
        """TRL's adaptive entropy controller: window-global mean entropy of the bonus's tokens
        moves ``entropy_coef`` by ``entropy_coef_delta`` at each optimizer step."""
        dev, args = self.accelerator.device, self.args
        stats = torch.stack([metrics["entropy_kept_sum"], metrics["num_kept"]]).to(dev)
        w = self._entropy_window_stats
        self._entropy_window_stats = stats if w is None else w + stats
        if self.accelerator.sync_gradients:
            totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
            world = (totals[0] / totals[1].clamp(min=1.0)).item()
            if world <= args.entropy_target:
                self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta,
                                        args.entropy_coef_max)
            else:
                self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta,
                                        args.entropy_coef_min)
            self._last_world_entropy = world
            self._entropy_window_stats = None

    def _fastgrpo_gather_entropies(self, ent):
        """Every process's completion-token entropies, as TRL's get_high_entropy_mask pads and
        gathers them (entropies are >= 0, so the negative pad value is a safe sentinel)."""
        padded = self.accelerator.pad_across_processes(ent, dim=0, pad_index=-1e9)
        every = self.accelerator.gather(padded)
        return every[every != -1e9]

    def _fastgrpo_log(self, mode, metrics, n_seq, ga, bonus):
        dev = self.accelerator.device
        n = metrics["num_tokens"].to(dev)
        names = ["entropy"]
        if self.beta != 0.0:
            names.insert(0, "kl")
        if self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            names += ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
        elif self.loss_type == "cispo":
            names.append("cispo_clip_ratio")
        # token-weighted means over all processes, like TRL's global_masked_mean
        stacked = torch.stack([metrics[k].to(dev) * n for k in names] + [n])
        totals = self.accelerator.reduce(stacked, reduction="sum")
        for i, k in enumerate(names):
            self._metrics[mode][k].append((totals[i] / totals[-1].clamp(min=1.0)).item())
        if self.loss_type == "vespo":  # one value per sequence (per token with (B, T) advantages)
            s = torch.tensor(float(n_seq), device=dev) if n_seq is not None else n
            totals = self.accelerator.reduce(
                torch.stack([metrics["vespo/phi_seq_mean"].to(dev) * s, s]), reduction="sum")
            self._metrics[mode]["vespo/phi_seq_mean"].append(
                (totals[0] / totals[1].clamp(min=1.0)).item())
        if bonus:  # with an entropy bonus TRL logs the policy loss (before its 1/ga)
            policy = metrics["policy_loss"].to(dev)
            if self.loss_type not in ("dapo", "cispo", "vespo"):
                policy = policy * ga
            self._metrics[mode]["policy_loss"].append(
                self.accelerator.gather(policy).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients and \
                    not getattr(self, "use_adaptive_entropy", False):
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

