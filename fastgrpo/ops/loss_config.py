"""``LossConfig``: every option of ``grpo_loss`` in one frozen dataclass, validated once.

``grpo_loss(hidden, weight, targets, advantages, ..., config=LossConfig(loss_type="dapo",
beta=0.04))`` takes it; the keyword form (``grpo_loss(..., loss_type="dapo", beta=0.04)``) builds
one.  The trainer's config (``TrainConfig.loss_config``), the TRL mapping
(``integrations.trl``) and the verl / OpenRLHF adapters (``integrations.generic``) build a
``LossConfig``; what changes per call (the tensors, ``num_items_in_batch``) stays an argument
of ``grpo_loss``.  An invalid option raises ``LossConfigError`` (a ``ValueError``) naming it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["LossConfig", "LossConfigError", "LOSS_TYPES", "IS_LEVELS"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IS_LEVELS = ("token", "sequence")


class LossConfigError(ValueError):
    """An invalid ``LossConfig`` option: ``option`` names it, ``why`` says what it must be (the
    trainer's command line words its error from these)."""

    def __init__(self, option: str, why: str, message: str):
        super().__init__(message)
        self.option, self.why = option, why


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclass(frozen=True)
class LossConfig:
    """The clipped StepGRPO/GRPO objective's options (``fastgrpo.ops.loss`` gives the formulas).

    loss_type: ``grpo`` (sequence mean, then mean: the published StepGRPO), ``bnpo``, ``dapo``,
        ``dr_grpo``, ``luspo``, or TRL's ``cispo``, ``sapo``, ``vespo``.
    beta: weight of the k3 KL against ``ref_logp`` (``grpo_loss`` then needs ``ref_logp``).
    epsilon_low / epsilon_high: clip range ``[1 - eps_low, 1 + eps_high]`` (``epsilon_high``
        defaults to ``epsilon_low``); for ``cispo`` ``epsilon_high`` is the cap on the IS weight
        itself (TRL's meaning; ScaleRL uses 5.0).
    delta: dual-clip bound, caps the unclipped ratio (for negative advantages).
    temperature: the sampling temperature the logits are divided by.
    entropy_coef: weight of an entropy bonus (its gradient included).
    importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO).
    max_completion_length: ``dr_grpo``'s constant (unless ``num_items_in_batch`` is given).
    egsw_alpha / egsw_temperature / group_size: entropy-guided sequence weighting; needs
        ``group_size`` here or ``group_ids`` per call.
    kl_clamp: caps the k3 KL per token (no gradient where capped), as verl's ``low_var_kl`` and
        OpenRLHF's ``k3`` do with 10; ``None`` = no cap.
    kl_entropy_normalizer: the KL and entropy terms are a token sum divided by this number (a
        token mean, as OpenRLHF aggregates them) instead of the policy term's weights.
    sapo_temperature_pos / sapo_temperature_neg: SAPO's gate temperatures for A > 0 / A <= 0.
    vespo_k_pos / vespo_lambda_pos / vespo_k_neg / vespo_lambda_neg: VESPO's gamma-weight
        parameters for A >= 0 / A < 0.
    top_entropy_quantile: keep the policy term (and entropy bonus) only on tokens whose entropy
        is >= the ``1 - q`` quantile of the batch's completion entropies.
    off_policy_mask_threshold: drop the policy term of sequences with A < 0 whose mean
        ``sampling_logp - logp`` exceeds it.
    bias_correction_kl: multiply the k3 KL by the (undetached) IS ratio (TRL's default).
    entropy_mean_divisor: the entropy bonus is ``entropy_coef`` times the token mean of H over
        the kept tokens, divided by this number (TRL: the accumulation steps).
    ignore_index: the target id of positions that are not completion tokens.
    backend: ``"auto"``, ``"torch"`` or ``"triton"`` (``fastgrpo.ops.logprobs``).
    one_pass: loss and gradients in one walk over the logits (three GEMMs, no recompute in
        backward) when the objective is token-local (token-level ratio; no EGSW, entropy
        quantile, off-policy mask or VESPO).  ``None``: on for the torch backend on CPU, where it
        measures faster, except bf16 through the native kernels (a recomputed bf16 logits GEMM
        costs less than storing and re-reading fp32 logits there: bench/results); ``False``
        forces the two-pass path.  An FSDP2-sharded (DTensor) ``weight`` takes the two-pass path.
    """

    loss_type: str = "grpo"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    temperature: float = 1.0
    entropy_coef: float = 0.0
    importance_sampling_level: str = "token"
    max_completion_length: int | None = None
    egsw_alpha: float | None = None
    egsw_temperature: float = 1.0
    group_size: int | None = None
    kl_clamp: float | None = None
    kl_entropy_normalizer: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    bias_correction_kl: bool = False
    entropy_mean_divisor: float | None = None
    ignore_index: int = -100
    backend: str = "auto"
    one_pass: bool | None = None

    @property
    def clip_high(self) -> float:
        """``epsilon_high``, defaulting to ``epsilon_low``."""
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    def replace(self, **changes) -> "LossConfig":
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes) if changes else self

    def __post_init__(self):
        self._check_choices()
        self._check_clip()
        self._check_terms()

    def _check_choices(self):
        if self.loss_type not in LOSS_TYPES:
            raise LossConfigError("loss_type", f"unknown loss type; choose one of {', '.join(LOSS_TYPES)}",
                                  f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IS_LEVELS:
            raise LossConfigError("importance_sampling_level", f"choose one of {', '.join(IS_LEVELS)}",
                                  f"importance_sampling_level must be one of {IS_LEVELS}, got "
                                  f"{self.importance_sampling_level!r}")
        if self.loss_type == "dr_grpo" and self.max_completion_length is not None and not (
                isinstance(self.max_completion_length, int) and self.max_completion_length > 0):
            raise LossConfigError("max_completion_length", "must be a positive int",
                                  f"loss_type='dr_grpo' needs max_completion_length (a positive "
                                  f"int) or num_items_in_batch, got {self.max_completion_length!r}")

    def _check_clip(self):
        for name in ("epsilon_low", "epsilon_high", "beta"):
            val = self.clip_high if name == "epsilon_high" else getattr(self, name)
            if not (_finite(val) and val >= 0):
                raise LossConfigError(name, "must be a finite number >= 0",
                                      f"{name} must be a finite number >= 0, got {val!r}")
        if self.epsilon_low >= 1:
            raise LossConfigError("epsilon_low", "must be < 1",
                                  f"epsilon_low must be < 1 (the ratio's lower bound 1 - epsilon_low "
                                  f"must stay positive), got {self.epsilon_low!r}")
        if self.delta is not None and not self.delta > 1:
            raise LossConfigError("delta", "must be > 1",
                                  f"delta (dual-clip bound) must be > 1, got {self.delta!r}")
        if self.loss_type == "cispo" and not self.clip_high > 0:
            raise LossConfigError("epsilon_high", "must be > 0 (cispo's cap on the IS weight)",
                                  f"loss_type='cispo' caps the IS weight at epsilon_high, which must "
                                  f"be > 0, got {self.clip_high!r}")

    def _check_terms(self):
        if not _finite(self.entropy_coef):
            raise LossConfigError("entropy_coef", "must be finite",
                                  f"entropy_coef must be finite, got {self.entropy_coef!r}")
        if self.egsw_alpha is not None and not self.egsw_temperature > 0:
            raise LossConfigError("egsw_temperature", "must be > 0",
                                  f"egsw_temperature must be > 0, got {self.egsw_temperature!r}")
        if self.kl_clamp is not None and not (math.isfinite(self.kl_clamp) and self.kl_clamp > 0):
            raise LossConfigError("kl_clamp", "must be a finite number > 0",
                                  f"kl_clamp must be a finite number > 0, got {self.kl_clamp!r}")
        for name in ("kl_entropy_normalizer", "entropy_mean_divisor"):
            val = getattr(self, name)
            if val is not None and not float(val) > 0:
                raise LossConfigError(name, "must be > 0", f"{name} must be > 0, got {val!r}")
        if self.entropy_mean_divisor is not None and self.kl_entropy_normalizer is not None:
            raise LossConfigError("entropy_mean_divisor", "not with kl_entropy_normalizer",
                                  "pass entropy_mean_divisor or kl_entropy_normalizer, not both")
        if not (self.sapo_temperature_pos > 0 and self.sapo_temperature_neg > 0):
            raise LossConfigError("sapo_temperature_pos", "must be > 0",
                                  f"sapo temperatures must be > 0, got {self.sapo_temperature_pos!r}, "
                                  f"{self.sapo_temperature_neg!r}")
        if not 0 <= self.top_entropy_quantile <= 1:
            raise LossConfigError("top_entropy_quantile", "must be in [0, 1]",
                                  f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile!r}")
