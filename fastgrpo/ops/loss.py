"""The clipped StepGRPO / GRPO objective (and TRL's other policy objectives), fused with the
log-prob kernel.

Per completion token ``t`` of sequence ``i`` (``A`` its advantage)::

    log_ratio_t = logp_t - old_t                       (old = logp.detach(): on-policy)
    rho         = exp(log_ratio_t)                     token level
                = exp(mean_{t' in i} log_ratio_t')     sequence level (GSPO)
    obj_t       = min(min(rho, delta) * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)
    KL_t        = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (k3; x rho with
                                                                       bias_correction_kl)
    loss_t      = -obj_t * keep_t + beta * KL_t - entropy_coef * H_t

where ``keep_t`` (1 by default) drops tokens below the batch's top-entropy quantile and
negative-advantage sequences that drifted off-policy (DeepSeek-V3.2's mask).  The other loss
types replace ``-obj_t`` (TRL 1.16's definitions; ``sg`` = detached)::

    cispo   -sg(min(rho, eps_high)) * A * logp_t
    sapo    -4 / tau * sigmoid(tau * (rho - 1)) * A        tau = tau_pos if A > 0 else tau_neg
    vespo   -sg(phi(w_i)) * A * logp_t                     w_i = exp(sum_{t in i} log_ratio_t)
            phi(w) = exp(lam + k * log w - lam * w)        (k, lam) by the sign of A
    luspo   -obj_t  (the clipped objective, summed per sequence)

and the batch loss is ``sum_t w_t * omega_i * loss_t`` with the normalization ``w_t`` of the
loss type (``omega_i`` = 1, or the EGSW sequence weight):

===========  ====================================  =================================
loss_type    w_t                                   ``num_items_in_batch`` replaces
===========  ====================================  =================================
grpo, sapo   1 / (n_tokens(i) * n_sequences)       n_sequences (whole batch)
bnpo         1 / n_tokens                          n_tokens (this rank's batch)
dapo, cispo, 1 / n_tokens                          n_tokens (global batch, all ranks)
vespo
dr_grpo      1 / (n_sequences * max_length)        n_sequences * max_length
luspo        1 / n_sequences                       n_sequences (whole batch)
===========  ====================================  =================================

With ``entropy_mean_divisor`` the entropy bonus instead is ``entropy_coef * mean_t(H_t) /
entropy_mean_divisor`` over the kept tokens, whatever the loss type (TRL's normalization).

Passing the whole batch's normalizer as ``num_items_in_batch`` makes the losses of
micro-batches add up to the loss of the whole batch, so gradient accumulation gives the
gradient of one big batch whatever the packing.

Fusion, two paths.  *Two-pass* (``_FusedGRPO``, any objective): the log-prob kernel's
forward keeps three floats per token (no logits), the objective above is evaluated on the
``[N]`` vectors and differentiated right there, so only ``dloss/dlogp`` and
``dloss/dentropy`` (``[N]`` each) are kept; the backward is the kernel's tiled recompute fed
with those two vectors (four logits-sized GEMMs in all).  *One-pass* (``_OnePassGRPO``, the
CPU default) for ``token_local`` objectives, whose per-token gradient follows from that
token's own log-prob and entropy (token-level ratio, clipping, dual clip, k3 KL, entropy bonus,
fixed normalizers): ``linear_one_pass`` evaluates the objective restricted to each block's
tokens as soon as their statistics exist and runs the gradient GEMMs on the block at once
(three GEMMs, no recompute); the backward only scales the stored gradients.  Sequence-level
ratios (GSPO), EGSW's group weights, the entropy quantile, the off-policy mask and VESPO's
sequence weights need the whole forward first and keep the two-pass path.  The per-token math
is O(N) elementwise work, written in plain torch rather than inside a kernel epilogue.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from fastgrpo.ops.advantages import group_index
from fastgrpo.ops.blocks import (linear_backward, linear_forward, linear_one_pass, one_pass_pays,
                                 resolve_backend, validate_inputs)
from fastgrpo.ops.loss_config import IS_LEVELS, LOSS_TYPES, LossConfig, LossConfigError
from fastgrpo.ops.sharded import gathered, gathers_partitioned_weight, is_dtensor, is_zero3, sharded_grad
from fastgrpo.ops.vocab_parallel import check_vocab_parallel, vocab_parallel_logprobs, vocab_range

__all__ = ["grpo_loss", "FusedGRPOLoss", "LossConfig", "LossConfigError", "LOSS_TYPES", "IS_LEVELS",
           "NORMALIZERS"]

# what each loss type's ``num_items_in_batch`` counts (the table in the module docstring):
# sequences, tokens of the global batch, tokens of this rank's batch, sequences x max length
NORMALIZERS = {"grpo": "sequences", "sapo": "sequences", "luspo": "sequences",
               "dapo": "tokens", "cispo": "tokens", "vespo": "tokens",
               "bnpo": "local_tokens", "dr_grpo": "sequences_x_length"}


# ----------------------------------------------------------------------------- layout


@dataclass
class _Tokens:
    """The completion tokens of a batch, flattened, whatever layout they came in."""
    rows: torch.Tensor            # [M] indices into the flattened hidden [*, D]
    seq: torch.Tensor             # [M] sequence index of each token
    n_seq: int
    per_seq_tokens: torch.Tensor  # [n_seq] completion tokens per sequence (float)
    adv: torch.Tensor             # [M] advantage of each token
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    sampling_logp: torch.Tensor | None = None  # [M] may hold NaN (tokens vLLM did not score)
    seq_adv: torch.Tensor | None = None        # [n_seq] when advantages are per sequence


def _slice_tokens(tok: _Tokens, sl: slice) -> _Tokens:
    """The tokens ``sl`` of ``tok``, keeping the whole batch's per-sequence counts."""
    cut = (lambda x: None if x is None else x[sl])  # noqa: E731
    return replace(tok, rows=tok.rows[sl], seq=tok.seq[sl], adv=tok.adv[sl],
                   old_logp=cut(tok.old_logp), ref_logp=cut(tok.ref_logp),
                   sampling_logp=cut(tok.sampling_logp))


def _check_finite(name, x):
    if x is not None and not torch.isfinite(x).all():
        bad = torch.nonzero(~torch.isfinite(x))[0].tolist()
        raise ValueError(f"{name} has a non-finite value {x[tuple(bad)].item()} at index {bad}")


def _flatten(hidden, targets, advantages, completion_mask, cu_seqlens, old_logp, ref_logp,
             ignore_index, sampling_logp=None) -> tuple[torch.Tensor, torch.Tensor, _Tokens]:
    """Return hidden [R, D], targets [R], and which rows are completion tokens of which sequence."""
    dev = hidden.device
    if cu_seqlens is not None:
        h = hidden.reshape(-1, hidden.shape[-1]) if hidden.dim() == 3 and hidden.shape[0] == 1 \
            else hidden
        if h.dim() != 2:
            raise ValueError(f"packed layout takes hidden [N, D] or [1, N, D], got "
                             f"{tuple(hidden.shape)}")
        n = h.shape[0]
        y = targets.reshape(-1)
        if y.numel() != n:
            raise ValueError(f"targets have {y.numel()} entries, hidden has {n} tokens")
        cu = torch.as_tensor(cu_seqlens, device=dev)
        if cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point:
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor [S+1], got "
                             f"{tuple(cu.shape)} {cu.dtype}")
        cu = cu.long()
        if int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to the token count {n}, got "
                             f"{cu.tolist() if cu.numel() <= 16 else cu}")
        n_seq = cu.numel() - 1
        seq_of_row = torch.repeat_interleave(torch.arange(n_seq, device=dev), cu.diff(),
                                             output_size=n)
        mask = y != ignore_index
        if completion_mask is not None:
            cm = completion_mask.reshape(-1)
            if cm.numel() != n:
                raise ValueError(f"completion_mask has {cm.numel()} entries, hidden has {n} "
                                 f"tokens")
            mask &= cm.bool()
    else:
        if hidden.dim() != 3:
            raise ValueError(f"padded layout takes hidden [B, T, D] (or pass cu_seqlens for the "
                             f"packed layout [N, D]), got {tuple(hidden.shape)}")
        b, t = hidden.shape[:2]
        if tuple(targets.shape) != (b, t):
            raise ValueError(f"targets shape {tuple(targets.shape)} must be [B, T] = {(b, t)}")
        n_seq = b
        h = hidden.reshape(b * t, hidden.shape[-1])
        y = targets.reshape(-1)
        mask = y != ignore_index
        if completion_mask is not None:
            if tuple(completion_mask.shape) != (b, t):
                raise ValueError(f"completion_mask shape {tuple(completion_mask.shape)} must be "
                                 f"[B, T] = {(b, t)}")
            mask &= completion_mask.reshape(-1).to(device=dev).bool()
        seq_of_row = torch.arange(b, device=dev).repeat_interleave(t)
    adv = torch.as_tensor(advantages, device=dev)
    if adv.numel() not in (n_seq, y.numel()) or (adv.dim() > 1 and adv.numel() != y.numel()):
        raise ValueError(f"advantages must be per sequence [{n_seq}] or per token "
                         f"{tuple(targets.shape)}, got {tuple(adv.shape)}")
    _check_finite("advantages", adv.float())
    rows = torch.nonzero(mask).squeeze(1)
    seq = seq_of_row[rows]
    counts = torch.zeros(n_seq, device=dev).index_add_(0, seq, torch.ones(seq.numel(), device=dev))
    a = adv.reshape(-1).float()
    per_sequence = adv.dim() == 1 and a.numel() == n_seq
    tok_adv = a[seq] if per_sequence else a[rows]

    def per_token(name, x, finite=True):
        if x is None:
            return None
        x = torch.as_tensor(x, device=dev)
        if x.numel() != y.numel():
            raise ValueError(f"{name} must be per token, shaped like targets "
                             f"{tuple(targets.shape)}, got {tuple(x.shape)}")
        x = x.reshape(-1)[rows].float()
        if finite:
            _check_finite(name, x)
        return x

    tok = _Tokens(rows, seq, n_seq, counts, tok_adv,
                  per_token("old_logp", old_logp), per_token("ref_logp", ref_logp),
                  per_token("sampling_logp", sampling_logp, finite=False),
                  a if per_sequence else None)
    return h, y, tok


def _segment_mean(x, seq, counts):
    return torch.zeros_like(counts, dtype=x.dtype).index_add_(0, seq, x) / counts.clamp(min=1)


# ----------------------------------------------------------------------------- objective


@dataclass
class _Objective:
    """The per-token StepGRPO objective on [M] vectors (see the module docstring)."""
    tok: _Tokens
    loss_type: str
    beta: float
    eps_low: float
    eps_high: float
    delta: float | None
    entropy_coef: float
    is_level: str
    normalizer: float | None
    max_completion_length: int | None
    egsw: tuple[float, float, torch.Tensor] | None  # (alpha, temperature, group index per seq)
    kl_clamp: float | None = None
    kl_entropy_normalizer: float | None = None
    sapo_temperatures: tuple[float, float] = (1.0, 1.05)            # (A > 0, A <= 0)
    vespo_params: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0)  # k+, lam+, k-, lam-
    vespo_seq_log_weight: torch.Tensor | None = None                # [n_seq], added to log w_i
    top_entropy_quantile: float = 1.0
    gather_entropies: object = None   # callable: this rank's [M] entropies -> all ranks'
    off_policy_mask_threshold: float | None = None
    bias_correction_kl: bool = False
    entropy_mean_divisor: float | None = None
    metrics: dict = field(default_factory=dict)
    n_tokens: int | None = None   # the whole call's token count, when ``tok`` is a slice of it
    record: bool = True           # fill ``metrics``

    @property
    def token_local(self) -> bool:
        """True when each token's gradient follows from its own log-prob and entropy alone
        (so the one-pass path applies): no sequence-level ratio, no group or batch statistic
        of the log-probs or entropies (EGSW, the entropy quantile, the off-policy mask,
        VESPO's sequence weights).  Every normalizer here is a count known up front."""
        return (self.is_level == "token" and self.egsw is None and self.loss_type != "vespo"
                and self.top_entropy_quantile >= 1 and self.off_policy_mask_threshold is None)

    @property
    def entropy_grad(self) -> bool:
        """Whether the loss may depend on the entropies through a differentiable path (an
        entropy bonus or EGSW's weights); the entropy quantile's mask alone carries none."""
        return bool(self.entropy_coef) or self.egsw is not None

    def restricted(self, sl: slice) -> "_Objective":
        """This objective's terms for the tokens ``sl`` only (``token_local`` objectives):
        ``sum over slices of restricted(sl)(logp[sl], ent[sl])`` is ``self(logp, ent)``."""
        return replace(self, tok=_slice_tokens(self.tok, sl), metrics={}, record=False,
                       n_tokens=self.tok.seq.numel() if self.n_tokens is None else self.n_tokens)

    def __call__(self, logp: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
        tok = self.tok
        adv, old, ref = tok.adv, tok.old_logp, tok.ref_logp
        old = logp.detach() if old is None else old
        log_ratio = logp - old
        is_log_ratio = log_ratio if self.is_level == "token" else \
            _segment_mean(log_ratio, tok.seq, tok.per_seq_tokens)[tok.seq]
        ratio = torch.exp(is_log_ratio)
        per_tok = self._policy_term(logp, log_ratio, ratio, adv)
        ent_mask = self._entropy_mask(ent) if self.top_entropy_quantile < 1 else None
        if ent_mask is not None:
            per_tok = per_tok * ent_mask
        if self.off_policy_mask_threshold is not None:
            per_tok = per_tok * self._off_policy_mask(logp, old, adv)
        kl = None
        aux = per_tok.new_zeros(()) if self.kl_entropy_normalizer is not None else per_tok
        if ref is not None:
            d = ref - logp
            if self.kl_clamp is not None:   # k3(+-(c + 1)) > c: same values, no exp overflow
                d = d.clamp(-self.kl_clamp - 1, self.kl_clamp + 1)
            kl = torch.exp(d) - d - 1
            if self.kl_clamp is not None:
                kl = kl.clamp(max=self.kl_clamp)
            if self.bias_correction_kl:     # unbiased reverse-KL gradient (DeepSeek-V3.2)
                kl = kl * ratio
            if self.beta:
                aux = aux + self.beta * kl
        bonus_ent = ent if ent_mask is None else ent * ent_mask
        if self.entropy_coef and self.entropy_mean_divisor is None:
            aux = aux - self.entropy_coef * bonus_ent
        if self.kl_entropy_normalizer is None:
            per_tok, aux = aux, None
        if self.egsw is not None:
            per_tok = per_tok * self._egsw_weights(adv, ent)[tok.seq]
        loss = (per_tok * self._token_weights()).sum()
        if aux is not None:
            loss = loss + aux.sum() / self.kl_entropy_normalizer
        if self.entropy_mean_divisor is not None:
            n_kept = ent.new_tensor(float(self.n_tokens or len(ent))) if ent_mask is None \
                else ent_mask.sum()
            mt = self.metrics
            mt["policy_loss"], mt["entropy_kept_sum"], mt["num_kept"] = \
                loss.detach(), bonus_ent.detach().sum(), n_kept
            if self.entropy_coef:
                loss = loss - self.entropy_coef * bonus_ent.sum() / n_kept.clamp(min=1) \
                    / self.entropy_mean_divisor
        if self.record:
            self._record_metrics(logp, ent, ratio, adv, kl)
        return loss

    def _policy_term(self, logp, log_ratio, ratio, adv) -> torch.Tensor:
        """-objective per token, for each loss type (module docstring)."""
        if self.loss_type == "cispo":
            return -torch.clamp(ratio, max=self.eps_high).detach() * adv * logp
        if self.loss_type == "sapo":
            pos, neg = self.sapo_temperatures
            tau = torch.where(adv > 0, pos, neg)
            return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
        if self.loss_type == "vespo":
            return -self._gamma_weights(log_ratio, adv) * adv * logp
        clipped = torch.clamp(ratio, 1 - self.eps_low, 1 + self.eps_high)
        capped = ratio if self.delta is None else torch.clamp(ratio, max=self.delta)
        return -torch.minimum(capped * adv, clipped * adv)

    @torch.no_grad()
    def _gamma_weights(self, log_ratio, adv) -> torch.Tensor:
        """VESPO's phi(w_i) = e^lam w^k e^(-lam w) of the sequence IS weight, as TRL clamps it."""
        tok, low = self.tok, math.log(1e-8)
        k_pos, lam_pos, k_neg, lam_neg = self.vespo_params
        log_w = torch.zeros_like(tok.per_seq_tokens).index_add_(
            0, tok.seq, log_ratio.clamp(-20.0, 20.0))
        if self.vespo_seq_log_weight is not None:
            log_w = log_w + self.vespo_seq_log_weight
        log_w = log_w.clamp(low, 20.0)

        def phi(log_w, a):
            k = torch.where(a >= 0, k_pos, k_neg)
            lam = torch.where(a >= 0, lam_pos, lam_neg).clamp(min=1e-4)
            out = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
            return out.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        per_tok = phi(log_w[tok.seq], adv)
        # logged as TRL does: over sequences (empty ones too) or, per-token A, over tokens
        mean = per_tok.mean() if tok.seq_adv is None else phi(log_w, tok.seq_adv).mean()
        self.metrics["vespo/phi_seq_mean"] = mean.nan_to_num(nan=1.0)
        return per_tok

    @torch.no_grad()
    def _entropy_mask(self, ent) -> torch.Tensor:
        """1 where H_t >= the (1 - top_entropy_quantile) quantile of all ranks' entropies."""
        every = ent if self.gather_entropies is None else self.gather_entropies(ent)
        if every.numel() == 0:
            return torch.zeros_like(ent)
        threshold = torch.quantile(every.float(), 1 - self.top_entropy_quantile)
        return (ent >= threshold).to(ent.dtype)

    @torch.no_grad()
    def _off_policy_mask(self, logp, old, adv) -> torch.Tensor:
        """Keep a token unless A < 0 and its sequence's mean KL(sampler || policy) > threshold."""
        tok = self.tok
        sampling = old if tok.sampling_logp is None else tok.sampling_logp
        kl = torch.nan_to_num(sampling - logp, nan=0.0)
        seq_kl = _segment_mean(kl, tok.seq, tok.per_seq_tokens)[tok.seq]
        return ((adv >= 0) | (seq_kl <= self.off_policy_mask_threshold)).to(logp.dtype)

    def _token_weights(self) -> torch.Tensor:
        tok, norm = self.tok, self.normalizer
        m = tok.seq.numel() if self.n_tokens is None else self.n_tokens
        if self.loss_type in ("grpo", "sapo"):
            n = norm if norm is not None else tok.n_seq
            return 1.0 / (tok.per_seq_tokens[tok.seq] * n)
        if self.loss_type in ("bnpo", "dapo", "cispo", "vespo"):
            n = norm if norm is not None else max(m, 1)
        elif self.loss_type == "luspo":
            n = norm if norm is not None else tok.n_seq
        else:  # dr_grpo
            n = norm if norm is not None else tok.n_seq * self.max_completion_length
        return torch.full((tok.seq.numel(),), 1.0 / n, device=tok.seq.device)

    def _egsw_weights(self, adv, ent) -> torch.Tensor:
        """omega_j = G * softmax_j((A_j + alpha * H_j) / P) within each group; detached."""
        alpha, temp, group = self.egsw
        tok = self.tok
        a_seq = _segment_mean(adv.detach(), tok.seq, tok.per_seq_tokens)
        h_seq = _segment_mean(ent.detach(), tok.seq, tok.per_seq_tokens)
        score = (a_seq + alpha * h_seq) / temp
        g = int(group.max()) + 1
        gmax = torch.full((g,), -math.inf, device=score.device).scatter_reduce(
            0, group, score, "amax")
        e = torch.exp(score - gmax[group])
        denom = torch.zeros(g, device=score.device).index_add_(0, group, e)
        size = torch.zeros(g, device=score.device).index_add_(0, group, torch.ones_like(e))
        return e / denom[group] * size[group]

    @torch.no_grad()
    def _record_metrics(self, logp, ent, ratio, adv, kl):
        m = max(logp.numel(), 1)
        low = (ratio < 1 - self.eps_low) & (adv < 0)
        high = (ratio > 1 + self.eps_high) & (adv > 0)
        mt = self.metrics
        mt["num_tokens"] = torch.tensor(float(logp.numel()))
        mt["logp"] = logp.sum() / m
        mt["entropy"] = ent.sum() / m
        mt["clip_ratio/low_mean"] = low.float().sum() / m
        mt["clip_ratio/high_mean"] = high.float().sum() / m
        mt["clip_ratio/region_mean"] = (low | high).float().sum() / m
        if self.loss_type == "cispo":
            mt["cispo_clip_ratio"] = ((ratio > self.eps_high) & (adv > 0)).float().sum() / m
        empty = logp.numel() == 0
        mt["ratio/min"] = ratio.new_tensor(1.0) if empty else ratio.min()
        mt["ratio/mean"] = ratio.sum() / m if not empty else ratio.new_tensor(1.0)
        mt["ratio/max"] = ratio.new_tensor(1.0) if empty else ratio.max()
        if kl is not None:
            mt["kl"] = kl.sum() / m
        for k, v in mt.items():
            mt[k] = v.detach().float().cpu() if v.is_cuda else v.detach().float()


class _FusedGRPO(torch.autograd.Function):
    """Two passes: the forward keeps three floats per token and the objective's gradient with
    respect to each token's log-prob and entropy; the backward recomputes the logits."""

    @staticmethod
    def forward(ctx, h, w, y, inv_t, backend, objective):
        # w: a plain weight, an FSDP2-sharded DTensor or a ZeRO-3 partitioned parameter, gathered
        # per pass (ops/sharded.py)
        with gathered(w) as wf:
            logp, ent, lse = linear_forward(h, wf, y, inv_t, backend)
        with torch.enable_grad():
            lp = logp.detach().requires_grad_()
            en = ent.detach().requires_grad_()
            loss = objective(lp, en)
            gl, ge = torch.autograd.grad(loss, (lp, en), allow_unused=True)
        gl = torch.zeros_like(logp) if gl is None else gl
        ctx.save_for_backward(h, w, y, lse, ent, gl, ge)
        ctx.inv_t, ctx.backend = inv_t, backend
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_loss):
        h, w, y, lse, ent, gl, ge = ctx.saved_tensors
        g = grad_loss.float()
        with gathered(w, grad_follows=ctx.needs_input_grad[1]) as wf:
            dh, dw = linear_backward(h, wf, y, lse, ent, gl * g,
                                     None if ge is None else ge * g, ctx.inv_t, ctx.backend,
                                     ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dh, sharded_grad(dw, w), None, None, None, None


class _OnePassGRPO(torch.autograd.Function):
    """One pass, for ``token_local`` objectives: the forward computes the loss *and* its
    gradients (``linear_one_pass``: three logits-sized GEMMs, no recompute); the backward
    only scales them by the upstream gradient."""

    @staticmethod
    def forward(ctx, h, w, y, inv_t, objective, need_h, need_w):
        def token_grads(sl, logp, ent):
            with torch.enable_grad():
                lp = logp.detach().requires_grad_()
                en = ent.detach().requires_grad_()
                part = objective.restricted(sl)(lp, en)
                gl, ge = torch.autograd.grad(part, (lp, en), allow_unused=True)
            return (torch.zeros_like(logp) if gl is None else gl), ge

        logp, ent, dh, dw = linear_one_pass(h, w, y, inv_t, token_grads, need_h, need_w,
                                            entropy_grad=objective.entropy_grad)
        ctx.save_for_backward(dh, dw)
        return objective(logp, ent)   # the exact value, and the metrics, from the whole batch

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        if not (grad_loss.device.type == "cpu" and float(grad_loss) == 1.0):
            g = grad_loss.to(torch.float32)
            dh = None if dh is None else (dh.float() * g).to(dh.dtype)
            dw = None if dw is None else (dw.float() * g).to(dw.dtype)
        return dh, dw, None, None, None, None, None


# ----------------------------------------------------------------------------- public API


def _objective(cfg: LossConfig, tok, device, num_items_in_batch, group_ids, vespo_seq_log_weight,
               gather_entropies) -> "_Objective":
    """The objective of one call: ``cfg``'s options and this call's per-sequence inputs."""
    egsw = None
    if cfg.egsw_alpha is not None:
        group = group_index(tok.n_seq, cfg.group_size, group_ids, device)
        egsw = (float(cfg.egsw_alpha), float(cfg.egsw_temperature), group)
    opt = lambda x: None if x is None else float(x)  # noqa: E731
    return _Objective(tok, cfg.loss_type, float(cfg.beta), float(cfg.epsilon_low), float(cfg.clip_high),
                      cfg.delta, float(cfg.entropy_coef), cfg.importance_sampling_level,
                      opt(num_items_in_batch), cfg.max_completion_length, egsw, opt(cfg.kl_clamp),
                      opt(cfg.kl_entropy_normalizer),
                      sapo_temperatures=(float(cfg.sapo_temperature_pos), float(cfg.sapo_temperature_neg)),
                      vespo_params=(float(cfg.vespo_k_pos), float(cfg.vespo_lambda_pos),
                                    float(cfg.vespo_k_neg), float(cfg.vespo_lambda_neg)),
                      vespo_seq_log_weight=None if vespo_seq_log_weight is None else
                      torch.as_tensor(vespo_seq_log_weight, device=device).float().reshape(tok.n_seq),
                      top_entropy_quantile=float(cfg.top_entropy_quantile),
                      gather_entropies=gather_entropies,
                      off_policy_mask_threshold=opt(cfg.off_policy_mask_threshold),
                      bias_correction_kl=bool(cfg.bias_correction_kl),
                      entropy_mean_divisor=opt(cfg.entropy_mean_divisor))


@gathers_partitioned_weight
def grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              advantages, *, completion_mask=None, cu_seqlens=None, old_logp=None, ref_logp=None,
              num_items_in_batch: float | None = None, group_ids=None, vespo_seq_log_weight=None,
              gather_entropies=None, sampling_logp=None, vocab_parallel_group=None,
              config: LossConfig | None = None, **options):
    """Clipped StepGRPO/GRPO policy loss straight from hidden states.

    Layouts:
        padded: ``hidden [B, T, D]``, ``targets [B, T]``, optional ``completion_mask [B, T]``.
        packed: ``hidden [N, D]`` (or ``[1, N, D]``), ``targets [N]``, ``cu_seqlens [S+1]``.
        In both, positions whose target is ``ignore_index`` (or masked out) are not
        completion tokens.

    Args:
        advantages: per sequence ``[B]`` / ``[S]``, or per token (shaped like ``targets``).
        old_logp: behaviour-policy log-probs, per token; absent = on-policy (ratio 1).
        ref_logp: reference log-probs, per token, for the k3 KL (``beta`` > 0 needs it).
        config: a ``LossConfig``, every option of the objective (loss type, clip range, KL,
            entropy, temperature, backend, ...: its docstring lists them); keyword ``options``
            build one (``grpo_loss(..., loss_type="dapo")``) or, with ``config``, override its
            fields.
        num_items_in_batch: the whole batch's normalizer, for gradient accumulation.
        group_ids: per sequence, for EGSW (else ``config.group_size``).
        vespo_seq_log_weight: per sequence, added to VESPO's log IS weight (TRL: the summed log
            of vLLM's token IS ratios).
        gather_entropies: maps this call's ``[M]`` entropies to every rank's (the entropy
            quantile's threshold over all processes, as TRL computes it).
        sampling_logp: the sampler's log-probs, per token (the off-policy mask's reference;
            default ``old_logp``).
        vocab_parallel_group: the vocabulary is split over this process group: ``weight`` is
            this rank's rows, ``hidden`` and everything else the same on every rank, targets
            global ids (``fused_logprobs``'s argument; always the two-pass path).

    Returns:
        ``(loss, metrics)``: a float32 scalar differentiable w.r.t. ``hidden`` and ``weight``,
        and a dict of detached float32 scalars (means over this call's completion tokens):
        ``logp``, ``entropy``, ``kl`` (when ``ref_logp`` is given), ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``ratio/min|mean|max``,
        ``num_tokens``, with ``entropy_mean_divisor`` ``policy_loss`` (the loss without the
        bonus), ``entropy_kept_sum`` and ``num_kept`` (the bonus's tokens),
        ``cispo_clip_ratio`` (cispo) and ``vespo/phi_seq_mean`` (vespo).
    """
    cfg = LossConfig(**options) if config is None else config.replace(**options)
    if cfg.beta > 0 and ref_logp is None:
        raise ValueError(f"beta={cfg.beta} needs ref_logp (reference log-probs) for the KL term")
    if num_items_in_batch is not None and not float(num_items_in_batch) > 0:
        raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch!r}")
    if cfg.loss_type == "dr_grpo" and num_items_in_batch is None and cfg.max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (a positive int) "
                         "or num_items_in_batch, got None")
    temperature, backend, ignore_index = cfg.temperature, cfg.backend, cfg.ignore_index
    vocab = start = None
    if vocab_parallel_group is not None:
        check_vocab_parallel(weight, backend)
        start, _, vocab = vocab_range(weight, vocab_parallel_group)
    validate_inputs(hidden, weight, targets, temperature, ignore_index, backend, vocab)
    backend = resolve_backend(backend, hidden.device)
    if backend == "reference":
        backend = "torch"  # the reference is a test oracle for fused_logprobs only
    h, y, tok = _flatten(hidden, targets, advantages, completion_mask, cu_seqlens,
                         old_logp, ref_logp, ignore_index, sampling_logp)
    objective = _objective(cfg, tok, h.device, num_items_in_batch, group_ids, vespo_seq_log_weight,
                           gather_entropies)
    # completion rows only (padding and prompts cost no FLOPs); no copy when all rows count
    h_tok = h if tok.rows.numel() == h.shape[0] else h.index_select(0, tok.rows)
    h_tok = h_tok if h_tok.stride(-1) == 1 else h_tok.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    y_tok = y[tok.rows].long()
    need_h = torch.is_grad_enabled() and h_tok.requires_grad
    need_w = torch.is_grad_enabled() and w.requires_grad
    one_pass = cfg.one_pass
    if one_pass is None:   # the CPU default (measured faster: bench/); two passes on CUDA
        one_pass = backend == "torch" and not h.is_cuda and one_pass_pays(h)
    if vocab_parallel_group is not None:   # the objective on the gathered [M] statistics
        logp, ent = vocab_parallel_logprobs(h_tok, w, y_tok, 1.0 / float(temperature), backend,
                                            vocab_parallel_group, start)
        loss = objective(logp, ent)
    elif one_pass and objective.token_local and (need_h or need_w) and not is_dtensor(w) \
            and not is_zero3(w):   # sharded: two passes, the backward gathers again
        loss = _OnePassGRPO.apply(h_tok, w, y_tok, 1.0 / float(temperature), objective,
                                  need_h, need_w)
    else:
        loss = _FusedGRPO.apply(h_tok, w, y_tok, 1.0 / float(temperature), backend, objective)
    return loss, objective.metrics


class FusedGRPOLoss(nn.Module):
    """``grpo_loss`` holding its options (a ``LossConfig``).

    ``FusedGRPOLoss(beta=0.04, loss_type="grpo")(hidden, lm_head.weight, targets, advantages,
    cu_seqlens=cu, ref_logp=ref)`` returns ``(loss, metrics)``; ``FusedGRPOLoss(config)`` takes
    a ``LossConfig``.  Per-call keyword arguments override the stored options.
    """

    def __init__(self, config: LossConfig | None = None, **options):
        super().__init__()
        self.config = LossConfig(**options) if config is None else config.replace(**options)

    @property
    def options(self) -> dict:
        return dataclasses.asdict(self.config)

    def forward(self, hidden, weight, targets, advantages, **kwargs):
        return grpo_loss(hidden, weight, targets, advantages, config=self.config, **kwargs)

    def extra_repr(self) -> str:
        default = LossConfig()
        return ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(LossConfig)
                         if getattr(self.config, f.name) != getattr(default, f.name))
