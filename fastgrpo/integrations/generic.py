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
from fastgrpo.ops.loss_config import LossConfig

__all__ = ["policy_loss", "backbone_hidden_states", "lm_head_weight", "verl_policy_loss",
           "openrlhf_policy_loss", "VERL_LOSS_AGG_MODES"]

# verl's ``actor.loss_agg_mode`` -> fastgrpo loss type; the normalizer (``num_items_in_batch``)
# is verl 0.9.1's ``agg_loss`` denominator (``_verl_normalizer``): token count; none (sum);
# non-empty sequences; non-empty sequences x ``loss_scale_factor`` (default: the response width).
VERL_LOSS_AGG_MODES = {"token-mean": "bnpo", "token-sum": "bnpo", "seq-mean-token-mean": "grpo",
                       "seq-mean-token-sum": "dr_grpo", "seq-mean-token-sum-norm": "dr_grpo"}


def policy_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                advantages, *, mask=None, cu_seqlens=None, old_logp=None, ref_logp=None,
                config: LossConfig | None = None, **loss_kwargs):
    """The clipped GRPO/PPO policy loss from hidden states; returns ``(loss, metrics)``.

    ``hidden`` are the states that *predict* ``targets`` (already shifted): ``[B, T, D]`` with
    ``targets [B, T]`` and ``mask [B, T]`` (1 = scored), or packed ``[N, D]`` with
    ``cu_seqlens``.  ``advantages`` per sequence or per token; ``old_logp`` / ``ref_logp`` per
    token (shaped like ``targets``).  ``config`` (a ``LossConfig``) and ``loss_kwargs`` go to
    ``fastgrpo.grpo_loss``.
    ``metrics`` is a ``dict[str, float]`` (``entropy``, ``kl``, ``clip_ratio/*``,
    ``ratio/*``, ``logp``, ``num_tokens``).
    """
    loss, metrics = grpo_loss(hidden, lm_head_weight, targets, advantages,
                              completion_mask=mask, cu_seqlens=cu_seqlens,
                              old_logp=old_logp, ref_logp=ref_logp, config=config, **loss_kwargs)
    return loss, {k: float(v) for k, v in metrics.items()}


def _reject(loss_kwargs, **instead):
    for name, use in instead.items():
        if name in loss_kwargs:
            raise TypeError(f"{name} is set by this adapter; use {use}")


def _config(loss_kwargs, **fields) -> LossConfig:
    """The adapter's ``LossConfig``; an option it sets may not come again in ``loss_kwargs``."""
    for name in fields:
        if name in loss_kwargs:
            raise TypeError(f"got multiple values for keyword argument {name!r} (this adapter sets it)")
    return LossConfig(**fields)


def _count(x, what):
    """A batch total given by the framework (int, float or 0-d tensor) as a float."""
    x = float(x)
    if not x > 0:
        raise ValueError(f"{what} must be > 0, got {x!r}")
    return x


def _verl_normalizer(mode, mask, dp_size, batch_num_tokens, global_batch_size,
                     loss_scale_factor):
    """verl 0.9.1 ``agg_loss``'s denominator D: its loss is the loss type's numerator / D.

    token-mean ``masked_sum / batch_num_tokens * dp_size``; token-sum ``masked_sum * dp_size``;
    seq-mean-* ``sum_i seq_loss_i / global_batch_size * dp_size`` (``/ loss_scale_factor``, default
    the response width, for -norm).  Left ``None`` (single process), the totals are this call's:
    its scored tokens, its non-empty sequences.
    """
    if mode == "token-sum":
        return 1.0 / dp_size
    if mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            return max(float(mask.sum()), 1.0)
        return _count(batch_num_tokens, "batch_num_tokens") / dp_size
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        n = max(float((mask.sum(-1) > 0).sum()), 1.0)
    else:
        n = _count(global_batch_size, "global_batch_size") / dp_size
    if mode == "seq-mean-token-sum-norm":
        n *= mask.shape[-1] if loss_scale_factor is None else _count(loss_scale_factor,
                                                                     "loss_scale_factor")
    return n


def verl_policy_loss(hidden, lm_head_weight, responses, response_mask, advantages,
                     old_log_prob=None, ref_log_prob=None, *, loss_agg_mode="token-mean",
                     loss_mode="vanilla", clip_ratio_low=0.2, clip_ratio_high=0.2,
                     clip_ratio_c=3.0, entropy_coeff=0.0, kl_loss_coef=0.0, kl_clamp=10.0,
                     temperature=1.0, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                     loss_scale_factor=None, **loss_kwargs):
    """verl (0.9.1) ``ppo_loss`` names -> ``policy_loss``.

    ``hidden`` is the backbone's output for the whole ``input_ids`` ``[B, P + R, D]`` (prompt
    then response, as verl's actor feeds them); the ``R = responses.size(1)`` states that
    predict the response are sliced here.  ``loss_agg_mode`` (``VERL_LOSS_AGG_MODES``) and the
    batch totals ``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
    ``loss_scale_factor`` reproduce verl's ``agg_loss`` exactly; the policy, KL and entropy
    terms are all aggregated that way, as verl's ``ppo_loss`` does.  verl's engine gives every
    micro-batch of a mini-batch the mini-batch's totals (``data["batch_num_tokens"]``: its
    scored tokens over all ranks; ``data["global_batch_size"]``: ``ppo_mini_batch_size *
    rollout.n``; ``data["dp_size"]``; ``config.loss_scale_factor``) and calls ``backward`` on
    each micro-batch's loss undivided: pass them the same way (``**config.global_batch_info``
    fits).  Left ``None`` they are this call's own totals.

    ``loss_mode`` ``"vanilla"`` (dual clip at ``clip_ratio_c``) or ``"gspo"`` (sequence-level
    ratio, no dual clip).  ``kl_loss_coef`` weights the k3 KL (verl's ``low_var_kl``) against
    ``ref_log_prob``, capped at ``kl_clamp`` per token (verl's 10; ``None``: no cap).
    """
    if loss_agg_mode not in VERL_LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {tuple(VERL_LOSS_AGG_MODES)}, got "
                         f"{loss_agg_mode!r}")
    if loss_mode not in ("vanilla", "gspo"):
        raise ValueError(f"loss_mode must be 'vanilla' or 'gspo', got {loss_mode!r}")
    _reject(loss_kwargs, num_items_in_batch="batch_num_tokens / global_batch_size / dp_size",
            importance_sampling_level="loss_mode='gspo'", delta="clip_ratio_c")
    r = responses.size(1)
    norm = _verl_normalizer(loss_agg_mode, torch.as_tensor(response_mask).bool(), dp_size,
                            batch_num_tokens, global_batch_size, loss_scale_factor)
    gspo = loss_mode == "gspo"
    config = _config(loss_kwargs, loss_type=VERL_LOSS_AGG_MODES[loss_agg_mode],
                     importance_sampling_level="sequence" if gspo else "token",
                     epsilon_low=clip_ratio_low, epsilon_high=clip_ratio_high,
                     delta=None if gspo else clip_ratio_c, entropy_coef=entropy_coeff,
                     beta=kl_loss_coef, kl_clamp=kl_clamp, temperature=temperature)
    return policy_loss(hidden[:, -r - 1:-1], lm_head_weight, responses, advantages,
                       mask=response_mask, old_logp=old_log_prob,
                       ref_logp=ref_log_prob if kl_loss_coef else None, num_items_in_batch=norm,
                       config=config, **loss_kwargs)


def openrlhf_policy_loss(hidden, lm_head_weight, sequences, action_mask, advantages,
                         old_log_probs=None, ref_log_probs=None, *, clip_eps_low=0.2,
                         clip_eps_high=0.2, dual_clip=None, token_level_loss=True,
                         policy_loss_type="ppo", kl_coef=0.0, entropy_coef=0.0, kl_clamp=10.0,
                         temperature=1.0, dp_size=1, batch_num_tokens=None,
                         global_batch_size=None, **loss_kwargs):
    """OpenRLHF (0.11.2) ``PolicyLoss`` + actor ``training_step`` names -> ``policy_loss``.

    ``hidden`` is the backbone's output for ``sequences`` ``[B, L, D]``; the last
    ``A = action_mask.size(1)`` tokens are the actions.  The policy term is OpenRLHF's
    ``aggregate_loss``: ``token_level_loss=True`` a token sum / ``batch_num_tokens`` x
    ``dp_size``, ``False`` a sum of per-sequence means / ``global_batch_size`` x ``dp_size``
    (``policy_loss_type="gspo"``, the sequence-level ratio, forces ``False`` as ``PolicyLoss``
    does).  ``kl_coef`` (the actor's ``kl_ctl``) weights the k3 KL against ``ref_log_probs``
    (``kl_estimator="k3"``, capped at ``kl_clamp``, OpenRLHF's 10) and ``entropy_coef`` the
    entropy bonus; both are token means (/ ``batch_num_tokens`` x ``dp_size``) whatever
    ``token_level_loss``, as in ``training_step``.  Pass the ``loss_batch_info`` that
    OpenRLHF's ``iter_grad_accum_global_norm`` / ``get_loss_batch_info`` give each micro-batch
    (``dp_size``, ``batch_num_tokens``, ``global_batch_size``: the optimizer step's totals / gas,
    for DeepSpeed's ``1 / gas``); left ``None`` they are this call's own totals (scored tokens,
    non-empty sequences).
    """
    if policy_loss_type not in ("ppo", "gspo"):
        raise ValueError(f"policy_loss_type must be 'ppo' or 'gspo', got {policy_loss_type!r}")
    _reject(loss_kwargs, num_items_in_batch="batch_num_tokens / global_batch_size / dp_size",
            importance_sampling_level="policy_loss_type='gspo'", delta="dual_clip",
            beta="kl_coef")
    a = action_mask.size(1)
    mask = torch.as_tensor(action_mask).bool()
    if policy_loss_type == "gspo":
        token_level_loss = False              # PolicyLoss.__init__: GSPO is a per-sample mean
    n_tok = (max(float(mask.sum()), 1.0) if batch_num_tokens is None
             else _count(batch_num_tokens, "batch_num_tokens") / dp_size)
    if token_level_loss:
        n, aux = n_tok, None
    else:
        n = (max(float((mask.sum(-1) > 0).sum()), 1.0) if global_batch_size is None
             else _count(global_batch_size, "global_batch_size") / dp_size)
        aux = n_tok
    config = _config(loss_kwargs, loss_type="bnpo" if token_level_loss else "grpo",
                     kl_entropy_normalizer=aux,
                     importance_sampling_level="sequence" if policy_loss_type == "gspo" else "token",
                     epsilon_low=clip_eps_low, epsilon_high=clip_eps_high, delta=dual_clip,
                     beta=kl_coef, entropy_coef=entropy_coef, kl_clamp=kl_clamp,
                     temperature=temperature)
    return policy_loss(hidden[:, -a - 1:-1], lm_head_weight, sequences[:, -a:], advantages,
                       mask=action_mask, old_logp=old_log_probs,
                       ref_logp=ref_log_probs if kl_coef else None, num_items_in_batch=n,
                       config=config, **loss_kwargs)
