"""Framework-neutral entry points for codebases that hold a model and a batch.

The pattern, in any actor::

    hidden = backbone_hidden_states(model, input_ids, attention_mask)   # no lm_head call
    loss, metrics = policy_loss(hidden[:, -R - 1:-1], lm_head_weight(model), responses,
                                advantages, mask=response_mask, old_logp=old, ref_logp=ref,
                                beta=0.04, loss_type="bnpo")
    loss.backward()

``policy_loss`` is ``fastgrpo.grpo_loss`` with plain-float metrics; every ``grpo_loss``
keyword (``loss_type``, ``epsilon_low``/``epsilon_high``, ``delta``, ``beta``,
``temperature``, ``importance_sampling_level``, ``num_items_in_batch``, ``entropy_coef``,
``max_completion_length`` ...) passes through.  ``verl_policy_loss`` and
``openrlhf_policy_loss`` only rename those frameworks' arguments; they add no math.
"""

from __future__ import annotations

import torch

from fastgrpo.hf import backbone_hidden_states, lm_head_weight
from fastgrpo.ops.loss import grpo_loss

__all__ = ["policy_loss", "backbone_hidden_states", "lm_head_weight", "verl_policy_loss",
           "openrlhf_policy_loss", "VERL_LOSS_AGG_MODES"]

# verl's ``actor.loss_agg_mode`` -> (fastgrpo loss_type, normalizer) with verl's ``agg_loss``
# arithmetic: token mean; mean of sequence means; mean of sequence sums (/ B);
# sum of sequence sums / R (R = the response tensor's width)
VERL_LOSS_AGG_MODES = {"token-mean": ("bnpo", None), "seq-mean-token-mean": ("grpo", None),
                       "seq-mean-token-sum": ("dr_grpo", "batch"),
                       "seq-mean-token-sum-norm": ("dr_grpo", "width")}


def policy_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                advantages, *, mask=None, cu_seqlens=None, old_logp=None, ref_logp=None,
                **loss_kwargs):
    """The clipped GRPO/PPO policy loss from hidden states; returns ``(loss, metrics)``.

    ``hidden`` are the states that *predict* ``targets`` (already shifted): ``[B, T, D]`` with
    ``targets [B, T]`` and ``mask [B, T]`` (1 = scored), or packed ``[N, D]`` with
    ``cu_seqlens``.  ``advantages`` per sequence or per token; ``old_logp`` / ``ref_logp`` per
    token (shaped like ``targets``).  ``loss_kwargs`` go to ``fastgrpo.grpo_loss``.
    ``metrics`` is a ``dict[str, float]`` (``entropy``, ``kl``, ``clip_ratio/*``,
    ``ratio/*``, ``logp``, ``num_tokens``).
    """
    loss, metrics = grpo_loss(hidden, lm_head_weight, targets, advantages,
                              completion_mask=mask, cu_seqlens=cu_seqlens,
                              old_logp=old_logp, ref_logp=ref_logp, **loss_kwargs)
    return loss, {k: float(v) for k, v in metrics.items()}


def verl_policy_loss(hidden, lm_head_weight, responses, response_mask, advantages,
                     old_log_prob=None, ref_log_prob=None, *, loss_agg_mode="token-mean",
                     clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0,
                     entropy_coeff=0.0, kl_loss_coef=0.0, temperature=1.0, **loss_kwargs):
    """verl's actor names -> ``policy_loss``.

    ``hidden`` is the backbone's output for the whole ``input_ids`` ``[B, P + R, D]`` (prompt
    then response, as verl's actor feeds them); the ``R = responses.size(1)`` states that
    predict the response are sliced here.  ``loss_agg_mode`` maps to a loss type and
    normalizer reproducing verl's ``agg_loss`` (``VERL_LOSS_AGG_MODES``; the KL and entropy
    terms are aggregated the same way, as verl does), ``clip_ratio_c``
    is the dual-clip bound, ``kl_loss_coef`` weights the k3 KL (verl's ``low_var_kl``, without
    its +-10 clamp) against ``ref_log_prob``.
    """
    if loss_agg_mode not in VERL_LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {tuple(VERL_LOSS_AGG_MODES)}, got "
                         f"{loss_agg_mode!r}")
    b, r = responses.shape
    loss_type, norm = VERL_LOSS_AGG_MODES[loss_agg_mode]
    if norm is not None:
        loss_kwargs.setdefault("num_items_in_batch", b if norm == "batch" else r)
    return policy_loss(hidden[:, -r - 1:-1], lm_head_weight, responses, advantages,
                       mask=response_mask, old_logp=old_log_prob,
                       ref_logp=ref_log_prob if kl_loss_coef else None, loss_type=loss_type,
                       epsilon_low=clip_ratio_low,
                       epsilon_high=clip_ratio_high, delta=clip_ratio_c,
                       entropy_coef=entropy_coeff, beta=kl_loss_coef, temperature=temperature,
                       **loss_kwargs)


def openrlhf_policy_loss(hidden, lm_head_weight, sequences, action_mask, advantages,
                         old_log_probs=None, ref_log_probs=None, *, clip_eps_low=0.2,
                         clip_eps_high=0.2, dual_clip=None, token_level_loss=True,
                         policy_loss_type="ppo", kl_coef=0.0, temperature=1.0, **loss_kwargs):
    """OpenRLHF's ``PolicyLoss`` / actor names -> ``policy_loss``.

    ``hidden`` is the backbone's output for ``sequences`` ``[B, L, D]``; the last
    ``A = action_mask.size(1)`` tokens are the actions.  ``token_level_loss=True`` is a token
    mean over the batch (``bnpo``), ``False`` a per-sequence mean then mean (``grpo``);
    ``policy_loss_type="gspo"`` is the sequence-level ratio.  ``kl_coef`` adds the k3 KL
    inside the same normalization (OpenRLHF's ``use_kl_loss`` with ``kl_estimator="k3"``
    takes a token mean: identical when ``token_level_loss=True``).
    """
    if policy_loss_type not in ("ppo", "gspo"):
        raise ValueError(f"policy_loss_type must be 'ppo' or 'gspo', got {policy_loss_type!r}")
    a = action_mask.size(1)
    return policy_loss(hidden[:, -a - 1:-1], lm_head_weight, sequences[:, -a:], advantages,
                       mask=action_mask, old_logp=old_log_probs,
                       ref_logp=ref_log_probs if kl_coef else None,
                       loss_type="bnpo" if token_level_loss else "grpo",
                       importance_sampling_level="sequence" if policy_loss_type == "gspo"
                       else "token",
                       epsilon_low=clip_eps_low, epsilon_high=clip_eps_high, delta=dual_clip,
                       beta=kl_coef, temperature=temperature, **loss_kwargs)
