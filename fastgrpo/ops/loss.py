"""The clipped StepGRPO / GRPO objective, fused with the log-prob kernel.

Per completion token ``t`` of sequence ``i`` (``A`` its advantage)::

    log_ratio_t = logp_t - old_t                       (old = logp.detach(): on-policy)
    rho         = exp(log_ratio_t)                     token level
                = exp(mean_{t' in i} log_ratio_t')     sequence level (GSPO)
    obj_t       = min(min(rho, delta) * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)
    KL_t        = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (k3)
    loss_t      = -obj_t + beta * KL_t - entropy_coef * H_t

and the batch loss is ``sum_t w_t * omega_i * loss_t`` with the normalization ``w_t`` of the
loss type (``omega_i`` = 1, or the EGSW sequence weight):

=========  ====================================  =================================
loss_type  w_t                                   ``num_items_in_batch`` replaces
=========  ====================================  =================================
grpo       1 / (n_tokens(i) * n_sequences)       n_sequences (whole batch)
bnpo       1 / n_tokens                          n_tokens (this rank's batch)
dapo       1 / n_tokens                          n_tokens (global batch, all ranks)
dr_grpo    1 / (n_sequences * max_length)        n_sequences * max_length
=========  ====================================  =================================

Passing the whole batch's normalizer as ``num_items_in_batch`` makes the losses of
micro-batches add up to the loss of the whole batch, so gradient accumulation gives the
gradient of one big batch whatever the packing.

Fusion.  One autograd function runs the log-prob kernel's forward (three floats per token
saved, no logits), evaluates the objective above on the ``[N]`` vectors and differentiates it
right there, so only ``dloss/dlogp`` and ``dloss/dentropy`` (``[N]`` each) are kept.  Its
backward is the log-prob kernel's tiled recompute fed with those two vectors.  The
per-token math is O(N) elementwise work: for N = 8192 about 30 small launches on ~32 KiB
vectors, against ~4 x 10 TFLOP of matrix work at V = 152k, D = 4096; so it is written in plain
torch rather than inside the Triton kernel's epilogue (sequence-level ratios, EGSW weights
and batch normalizers need the whole forward first anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from fastgrpo.ops.logprobs import linear_backward, linear_forward, resolve_backend, validate_inputs

__all__ = ["grpo_loss", "FusedGRPOLoss", "LOSS_TYPES", "IS_LEVELS"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence")


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


def _check_finite(name, x):
    if x is not None and not torch.isfinite(x).all():
        bad = torch.nonzero(~torch.isfinite(x))[0].tolist()
        raise ValueError(f"{name} has a non-finite value {x[tuple(bad)].item()} at index {bad}")


def _flatten(hidden, targets, advantages, completion_mask, cu_seqlens, old_logp, ref_logp,
             ignore_index) -> tuple[torch.Tensor, torch.Tensor, _Tokens]:
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

    def per_token(name, x):
        if x is None:
            return None
        x = torch.as_tensor(x, device=dev)
        if x.numel() != y.numel():
            raise ValueError(f"{name} must be per token, shaped like targets "
                             f"{tuple(targets.shape)}, got {tuple(x.shape)}")
        x = x.reshape(-1)[rows].float()
        _check_finite(name, x)
        return x

    tok = _Tokens(rows, seq, n_seq, counts, tok_adv,
                  per_token("old_logp", old_logp), per_token("ref_logp", ref_logp))
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
    metrics: dict = field(default_factory=dict)

    def __call__(self, logp: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
        tok = self.tok
        adv, old, ref = tok.adv, tok.old_logp, tok.ref_logp
        old = logp.detach() if old is None else old
        log_ratio = logp - old
        if self.is_level == "sequence":
            log_ratio = _segment_mean(log_ratio, tok.seq, tok.per_seq_tokens)[tok.seq]
        ratio = torch.exp(log_ratio)
        clipped = torch.clamp(ratio, 1 - self.eps_low, 1 + self.eps_high)
        capped = ratio if self.delta is None else torch.clamp(ratio, max=self.delta)
        per_tok = -torch.minimum(capped * adv, clipped * adv)
        kl = None
        aux = per_tok.new_zeros(()) if self.kl_entropy_normalizer is not None else per_tok
        if ref is not None:
            d = ref - logp
            if self.kl_clamp is not None:   # k3(+-(c + 1)) > c: same values, no exp overflow
                d = d.clamp(-self.kl_clamp - 1, self.kl_clamp + 1)
            kl = torch.exp(d) - d - 1
            if self.kl_clamp is not None:
                kl = kl.clamp(max=self.kl_clamp)
            if self.beta:
                aux = aux + self.beta * kl
        if self.entropy_coef:
            aux = aux - self.entropy_coef * ent
        if self.kl_entropy_normalizer is None:
            per_tok, aux = aux, None
        if self.egsw is not None:
            per_tok = per_tok * self._egsw_weights(adv, ent)[tok.seq]
        loss = (per_tok * self._token_weights()).sum()
        if aux is not None:
            loss = loss + aux.sum() / self.kl_entropy_normalizer
        self._record_metrics(logp, ent, ratio, adv, kl)
        return loss

    def _token_weights(self) -> torch.Tensor:
        tok, norm = self.tok, self.normalizer
        m = tok.seq.numel()
        if self.loss_type == "grpo":
            n = norm if norm is not None else tok.n_seq
            return 1.0 / (tok.per_seq_tokens[tok.seq] * n)
        if self.loss_type in ("bnpo", "dapo"):
            n = norm if norm is not None else max(m, 1)
        else:  # dr_grpo
            n = norm if norm is not None else tok.n_seq * self.max_completion_length
        return torch.full((m,), 1.0 / n, device=tok.seq.device)

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
        empty = logp.numel() == 0
        mt["ratio/min"] = ratio.new_tensor(1.0) if empty else ratio.min()
        mt["ratio/mean"] = ratio.sum() / m if not empty else ratio.new_tensor(1.0)
        mt["ratio/max"] = ratio.new_tensor(1.0) if empty else ratio.max()
        if kl is not None:
            mt["kl"] = kl.sum() / m
        for k, v in mt.items():
            mt[k] = v.detach().float().cpu() if v.is_cuda else v.detach().float()


class _FusedGRPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, y, inv_t, backend, objective):
        logp, ent, lse = linear_forward(h, w, y, inv_t, backend)
        with torch.enable_grad():
            lp = logp.detach().requires_grad_()
            en = ent.detach().requires_grad_()
            loss = objective(lp, en)
            gl, ge = torch.autograd.grad(loss, (lp, en), allow_unused=True,
                                         materialize_grads=True)
        ctx.save_for_backward(h, w, y, lse, ent, gl, ge)
        ctx.inv_t, ctx.backend = inv_t, backend
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_loss):
        h, w, y, lse, ent, gl, ge = ctx.saved_tensors
        g = grad_loss.float()
        dh, dw = linear_backward(h, w, y, lse, ent, gl * g, ge * g, ctx.inv_t, ctx.backend,
                                 ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dh, dw, None, None, None, None


# ----------------------------------------------------------------------------- public API


def grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              advantages, *, completion_mask=None, cu_seqlens=None,
              old_logp=None, ref_logp=None, beta: float = 0.0,
              epsilon_low: float = 0.2, epsilon_high: float | None = None,
              delta: float | None = None, temperature: float = 1.0,
              entropy_coef: float = 0.0, importance_sampling_level: str = "token",
              loss_type: str = "grpo", num_items_in_batch: float | None = None,
              max_completion_length: int | None = None,
              egsw_alpha: float | None = None, egsw_temperature: float = 1.0,
              group_size: int | None = None, group_ids=None,
              kl_clamp: float | None = None, kl_entropy_normalizer: float | None = None,
              ignore_index: int = -100, backend: str = "auto"):
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
        epsilon_low / epsilon_high: clip range ``[1 - eps_low, 1 + eps_high]``
            (``epsilon_high`` defaults to ``epsilon_low``).
        delta: dual-clip bound, caps the unclipped ratio (for negative advantages).
        entropy_coef: weight of an entropy bonus (its gradient included).
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO).
        loss_type: ``grpo`` (sequence mean, then mean: the published StepGRPO), ``bnpo``,
            ``dapo``, ``dr_grpo`` (see the module docstring for the normalizers).
        num_items_in_batch: the whole batch's normalizer, for gradient accumulation.
        max_completion_length: ``dr_grpo``'s constant (unless ``num_items_in_batch`` is given).
        egsw_alpha / egsw_temperature: entropy-guided sequence weighting; needs
            ``group_size`` or ``group_ids`` (per sequence).
        kl_clamp: caps the k3 KL per token at this value (no gradient where capped), as
            verl's ``low_var_kl`` and OpenRLHF's ``k3`` do with 10; ``None`` = no cap.
        kl_entropy_normalizer: when given, the KL and entropy terms are a token sum divided
            by this number (a token mean, as OpenRLHF aggregates them) instead of sharing the
            policy term's ``loss_type`` weights; EGSW weights then scale the policy term only.

    Returns:
        ``(loss, metrics)``: a float32 scalar differentiable w.r.t. ``hidden`` and ``weight``,
        and a dict of detached float32 scalars (means over this call's completion tokens):
        ``logp``, ``entropy``, ``kl`` (when ``ref_logp`` is given), ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``ratio/min|mean|max`` and
        ``num_tokens``.
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, got "
                         f"{importance_sampling_level!r}")
    for name, val in (("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high),
                      ("beta", beta)):
        if not (isinstance(val, (int, float)) and math.isfinite(val) and val >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {val!r}")
    if epsilon_low >= 1:
        raise ValueError(f"epsilon_low must be < 1 (the ratio's lower bound 1 - epsilon_low "
                         f"must stay positive), got {epsilon_low!r}")
    if delta is not None and not delta > 1:
        raise ValueError(f"delta (dual-clip bound) must be > 1, got {delta!r}")
    if not math.isfinite(entropy_coef):
        raise ValueError(f"entropy_coef must be finite, got {entropy_coef!r}")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (reference log-probs) for the KL term")
    if num_items_in_batch is not None and not float(num_items_in_batch) > 0:
        raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch!r}")
    if loss_type == "dr_grpo" and num_items_in_batch is None:
        if not (isinstance(max_completion_length, int) and max_completion_length > 0):
            raise ValueError(f"loss_type='dr_grpo' needs max_completion_length (a positive int) "
                             f"or num_items_in_batch, got {max_completion_length!r}")
    if egsw_alpha is not None and not egsw_temperature > 0:
        raise ValueError(f"egsw_temperature must be > 0, got {egsw_temperature!r}")
    if kl_clamp is not None and not (math.isfinite(kl_clamp) and kl_clamp > 0):
        raise ValueError(f"kl_clamp must be a finite number > 0, got {kl_clamp!r}")
    if kl_entropy_normalizer is not None and not float(kl_entropy_normalizer) > 0:
        raise ValueError(f"kl_entropy_normalizer must be > 0, got {kl_entropy_normalizer!r}")

    validate_inputs(hidden, weight, targets, temperature, ignore_index, backend)
    backend = resolve_backend(backend, hidden.device)
    if backend == "reference":
        backend = "torch"  # the reference is a test oracle for fused_logprobs only
    h, y, tok = _flatten(hidden, targets, advantages, completion_mask, cu_seqlens,
                         old_logp, ref_logp, ignore_index)
    egsw = None
    if egsw_alpha is not None:
        from fastgrpo.ops.advantages import group_index
        group = group_index(tok.n_seq, group_size, group_ids, h.device)
        egsw = (float(egsw_alpha), float(egsw_temperature), group)
    objective = _Objective(tok, loss_type, float(beta), float(epsilon_low), float(epsilon_high),
                           delta, float(entropy_coef), importance_sampling_level,
                           None if num_items_in_batch is None else float(num_items_in_batch),
                           max_completion_length, egsw,
                           None if kl_clamp is None else float(kl_clamp),
                           None if kl_entropy_normalizer is None
                           else float(kl_entropy_normalizer))
    # completion rows only (padding and prompts cost no FLOPs); no copy when all rows count
    h_tok = h if tok.rows.numel() == h.shape[0] else h.index_select(0, tok.rows)
    h_tok = h_tok if h_tok.stride(-1) == 1 else h_tok.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    loss = _FusedGRPO.apply(h_tok, w, y[tok.rows].long(), 1.0 / float(temperature), backend,
                            objective)
    return loss, objective.metrics


class FusedGRPOLoss(nn.Module):
    """``grpo_loss`` holding its hyper-parameters.

    ``FusedGRPOLoss(beta=0.04, loss_type="grpo")(hidden, lm_head.weight, targets, advantages,
    cu_seqlens=cu, ref_logp=ref)`` returns ``(loss, metrics)``.  Per-call keyword arguments
    override the stored ones.
    """

    def __init__(self, *, beta: float = 0.0, epsilon_low: float = 0.2,
                 epsilon_high: float | None = None, delta: float | None = None,
                 temperature: float = 1.0, entropy_coef: float = 0.0,
                 importance_sampling_level: str = "token", loss_type: str = "grpo",
                 max_completion_length: int | None = None, egsw_alpha: float | None = None,
                 egsw_temperature: float = 1.0, ignore_index: int = -100,
                 backend: str = "auto"):
        super().__init__()
        self.options = dict(beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                            delta=delta, temperature=temperature, entropy_coef=entropy_coef,
                            importance_sampling_level=importance_sampling_level,
                            loss_type=loss_type, max_completion_length=max_completion_length,
                            egsw_alpha=egsw_alpha, egsw_temperature=egsw_temperature,
                            ignore_index=ignore_index, backend=backend)
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")

    def forward(self, hidden, weight, targets, advantages, **kwargs):
        return grpo_loss(hidden, weight, targets, advantages, **{**self.options, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None)
