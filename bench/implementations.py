"""The implementations the benchmarks compare, each a fwd+bwd closure over (h, w, y, ...).

* ``fastgrpo``: ``fused_logprobs`` / ``grpo_loss`` (triton on CUDA, torch elsewhere);
  ``fastgrpo_keep_logits``: ``fused_logprobs(keep_logits=True)`` (the logits kept for the
  backward: three GEMMs, N*V*4 bytes; not counted for "least memory").
* ``naive``: full logits + log_softmax in PyTorch (what a plain RL loop does).
* ``liger``: Liger-Kernel's chunked selective log-prob (logp) / LigerFusedLinearGRPOLoss.
* ``liger_triton_grpo``: Liger's Triton ``triton_grpo_loss`` fed with materialized logits
  (CUDA only).
* ``cce``: Apple's Cut Cross-Entropy ``linear_cross_entropy(reduction="none")`` (the log-prob
  of the target, no entropy): its Triton kernels on CUDA, its ``torch_compile`` implementation
  elsewhere.  In the loss table ``cce`` is those log-probs composed with the same GRPO
  objective (``grpo_objective``, plain PyTorch on the ``[N]`` vectors).
* ``floor``: the three matrix products of the same shape that any fwd+bwd must run (logits,
  dH, dW: 6*N*D*V FLOPs) through ``torch.mm`` in the inputs' dtype, each in its fastest layout,
  measured in the same run: the time floor (``floor_fn``).

``fastgrpo`` in the loss table is the automatic choice (one pass on CPU, two passes for bf16
through the native CPU kernels and on CUDA); ``fastgrpo_two_pass`` / ``fastgrpo_one_pass``
force each path.
"""

import torch

from fastgrpo import fused_logprobs, grpo_loss


def _entropy_from_logz(logz):
    return -(logz.exp() * logz).sum(-1)


# ----------------------------------------------------------------------------- log-probs


def logprobs_fastgrpo(h, w, y):
    logp, ent = fused_logprobs(h, w, y, return_entropy=True)
    (logp.sum() + 0.01 * ent.sum()).backward()


def logprobs_fastgrpo_keep_logits(h, w, y):
    """``keep_logits=True``: N*V*4 bytes kept from forward to backward, three GEMMs."""
    logp, ent = fused_logprobs(h, w, y, return_entropy=True, keep_logits=True)
    (logp.sum() + 0.01 * ent.sum()).backward()


def logprobs_naive(h, w, y):
    logz = torch.log_softmax((h @ w.T).float(), dim=-1)
    logp = logz.gather(-1, y[:, None]).squeeze(-1)
    ent = _entropy_from_logz(logz)
    (logp.sum() + 0.01 * ent.sum()).backward()


def logprobs_liger(h, w, y):
    from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase
    logp = LigerFusedLinearPPOBase.chunk_forward(h[None], w, y[None])
    logp.sum().backward()   # Liger's path yields log-probs only (no entropy)


def logprobs_cce(h, w, y):
    from cut_cross_entropy import linear_cross_entropy
    impl = "cce" if h.is_cuda else "torch_compile"
    nll = linear_cross_entropy(h, w, y, reduction="none", impl=impl)
    (-nll).sum().backward()   # CCE gives the target's log-prob only (no entropy)


# The three products in each layout torch.mm offers for them (their speeds differ by up to 1.4x
# on CPU); the floor takes the fastest layout of each, probed once per shape.
FLOOR_LAYOUTS = {
    "logits": {"h @ w.T": lambda h, w, z, dw: h @ w.T,
               "(w @ h.T).T": lambda h, w, z, dw: (w @ h.T).T},
    "dH": {"dz @ w": lambda h, w, z, dw: z @ w,
           "(w.T @ dz.T).T": lambda h, w, z, dw: (w.T @ z.T).T},
    "dW": {"dz.T @ h": lambda h, w, z, dw: z.T @ h,
           "(h.T @ dz).T": lambda h, w, z, dw: torch.mm(h.T, z).T,
           "dW.addmm_(dz.T, h)": lambda h, w, z, dw: dw.addmm_(z.T, h)},
}


def floor_gemms(h, w, z, dw, layouts):
    """logits = h @ w.T, dH = dz @ w, dW = dz.T @ h (6*N*D*V FLOPs), in the given layouts."""
    with torch.no_grad():
        for product, name in layouts.items():
            FLOOR_LAYOUTS[product][name](h, w, z, dw)


def floor_fn(h, w, timer, sync):
    """The floor of (h, w)'s shape and dtype as a callable, each product in the layout that
    measured fastest here (one timed call of each layout after a warm-up)."""
    h, w = h.detach(), w.detach()
    with torch.no_grad():
        z = (h @ w.T) / w.shape[0]   # stands in for dz: any dense [N, V] operand costs the same
    dw = torch.zeros_like(w)
    layouts = {}
    for product, options in FLOOR_LAYOUTS.items():
        times = {}
        for name, fn in options.items():
            with torch.no_grad():
                fn(h, w, z, dw)      # warm
                sync()
                t0 = timer()
                fn(h, w, z, dw)
                sync()
            times[name] = timer() - t0
        layouts[product] = min(times, key=times.get)

    def run():
        floor_gemms(h, w, z, dw, layouts)
    run.layouts = layouts
    return run


LOGPROB_IMPLS = {"fastgrpo": logprobs_fastgrpo,
                 "fastgrpo_keep_logits": logprobs_fastgrpo_keep_logits,
                 "naive": logprobs_naive, "liger": logprobs_liger, "cce": logprobs_cce}


# ----------------------------------------------------------------------------- GRPO loss


def loss_inputs(y, seq_len=512, seed=0):
    """Packed batch of N // seq_len sequences, old/ref log-probs near the policy's."""
    n = y.numel()
    g = torch.Generator(device="cpu").manual_seed(seed)
    b = max(1, n // seq_len)
    cu = torch.linspace(0, n, b + 1).round().to(torch.int32).to(y.device)
    adv = torch.randn(b, generator=g).to(y.device)
    noise = (0.1 * torch.randn(n, generator=g)).to(y.device)
    return cu, adv, noise


LOSS_OPTS = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="grpo")


def loss_fastgrpo(h, w, y, cu, adv, old, ref, one_pass=None):
    loss, _ = grpo_loss(h, w, y, adv, cu_seqlens=cu, old_logp=old, ref_logp=ref,
                        one_pass=one_pass, **LOSS_OPTS)
    loss.backward()


def loss_fastgrpo_two_pass(*args):
    loss_fastgrpo(*args, one_pass=False)


def loss_fastgrpo_one_pass(*args):
    loss_fastgrpo(*args, one_pass=True)


def _padded(h, y, cu, old, ref):
    b = cu.numel() - 1
    t = h.shape[0] // b
    return h.view(b, t, -1), y.view(b, t), old.view(b, t), ref.view(b, t)


def grpo_objective(lp, oldp, refp, adv):
    """LOSS_OPTS's objective on padded [B, T] log-probs (equal-length sequences): clipped ratio,
    k3 KL, the grpo loss type's per-sequence mean then mean."""
    ratio = torch.exp(lp - oldp)
    a = adv[:, None]
    per_tok = -torch.min(ratio * a, ratio.clamp(0.8, 1.28) * a)
    d = refp - lp
    per_tok = per_tok + LOSS_OPTS["beta"] * (d.exp() - d - 1)
    return per_tok.mean(1).mean()


def loss_naive(h, w, y, cu, adv, old, ref):
    hp, yp, oldp, refp = _padded(h, y, cu, old, ref)
    logz = torch.log_softmax((hp @ w.T).float(), dim=-1)
    lp = logz.gather(-1, yp[..., None]).squeeze(-1)
    grpo_objective(lp, oldp, refp, adv).backward()


def loss_cce(h, w, y, cu, adv, old, ref):
    """Cut Cross-Entropy's log-probs (the negative of its per-token loss) and the objective."""
    from cut_cross_entropy import linear_cross_entropy
    impl = "cce" if h.is_cuda else "torch_compile"
    lp = -linear_cross_entropy(h, w, y, reduction="none", impl=impl).float()
    _, _, oldp, refp = _padded(h, y, cu, old, ref)
    grpo_objective(lp.view(oldp.shape), oldp, refp, adv).backward()


def loss_liger(h, w, y, cu, adv, old, ref):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    hp, yp, oldp, refp = _padded(h, y, cu, old, ref)
    peer = LigerFusedLinearGRPOLoss(compiled=torch.cuda.is_available(), use_ref_model=True,
                                    **LOSS_OPTS)
    loss, _ = peer(hp, w, yp, torch.ones_like(yp), adv, ref_per_token_logps=refp,
                   old_per_token_logps=oldp)
    loss.backward()


def loss_liger_triton_grpo(h, w, y, cu, adv, old, ref):
    """Liger's Triton GRPO loss takes logits [B, L+1, V] (it drops the last position), so the
    last position of each row stands in as that extra position."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    hp, yp, oldp, refp = _padded(h, y, cu, old, ref)
    logits = hp @ w.T
    loss, _ = triton_grpo_loss(logits, oldp[:, :-1], refp[:, :-1], yp[:, :-1], adv,
                               torch.ones_like(yp[:, :-1]), temperature=1.0, beta=0.04,
                               eps_low=0.2, eps_high=0.28, loss_type="grpo", reduce=True,
                               inplace=True)
    loss.backward()


LOSS_IMPLS = {"fastgrpo": loss_fastgrpo, "fastgrpo_two_pass": loss_fastgrpo_two_pass,
              "fastgrpo_one_pass": loss_fastgrpo_one_pass, "naive": loss_naive,
              "liger": loss_liger, "liger_triton_grpo": loss_liger_triton_grpo, "cce": loss_cce}
OURS = ("fastgrpo", "fastgrpo_two_pass", "fastgrpo_one_pass")
