"""verl's own actor computing log-probs and entropies through fastgrpo, without editing verl.

verl (0.9.1) has a documented hidden-states path: with ``actor_rollout_ref.model.use_fused_kernels
=True`` its ``apply_monkey_patch`` replaces the model's ``forward`` (dense models:
``verl/models/transformers/dense_common.py``; Qwen2-VL / Qwen2.5-VL: ``qwen2_vl.py``; also
Qwen3-VL, Qwen3.5, GLM-4V) by one that runs the backbone and hands the last hidden state and
``lm_head.weight`` to ``FusedLinearForPPO(impl_backend=...)``, which returns ``log_probs`` and
``entropy``; the engine (``verl/workers/engine/fsdp/transformer_impl.py``) then uses those in
place of logits, in the padded and the remove-padding layouts alike.  Importing this module
registers ``"fastgrpo"`` as one more ``impl_backend``: the same patched forward, with
``fastgrpo.fused_logprobs`` computing the two outputs.  In a verl run, one set of config values::

    actor_rollout_ref.model.external_lib=fastgrpo.integrations.verl   # imported in every worker
    actor_rollout_ref.model.use_fused_kernels=True
    actor_rollout_ref.model.fused_kernel_options.impl_backend=fastgrpo

(or ``import fastgrpo.integrations.verl`` / :func:`install` in a process that builds verl's
engine itself).  Tested with verl's FSDP2 engine on a dense model (``tests/test_verl_actor.py``);
the VL forwards make the same ``FusedLinearForPPO`` call, but verl 0.9.1's ``qwen2_vl.py`` fails
to import with transformers 5.25 (``ImportError: cannot import name
'Qwen2VLCausalLMOutputWithPast'``; verl 0.9.1 declares transformers<5.11, fastgrpo >=5.25), for
every backend, so they are untested here (docs/scaling.md).  Everything else, the policy loss included, is verl's own code.  verl's other
backends (``torch``, ``triton``, ``liger``) are untouched.

Refused: the triton-only ``calculate_sum_pi_squared`` and per-sample temperatures are refused by
verl itself for every fused backend; the Megatron engine has its own fused path and is not
patched.
"""

from __future__ import annotations

import functools

import torch

from fastgrpo.ops.logprobs import fused_logprobs

__all__ = ["BACKEND", "install", "fastgrpo_logprobs_entropy"]

BACKEND = "fastgrpo"


def fastgrpo_logprobs_entropy(hidden_states, vocab_weights, input_ids, temperature=1.0):
    """``FusedLinearForPPO.forward``'s contract: float32 ``(log_probs, entropy)`` shaped like
    ``input_ids``, differentiable in both tensors."""
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"impl_backend='{BACKEND}' takes one temperature for the batch, got "
                             f"a tensor of shape {tuple(temperature.shape)}")
        temperature = float(temperature)
    if hidden_states.dtype != vocab_weights.dtype:   # autocast: the matmul runs in hidden's dtype
        vocab_weights = vocab_weights.to(hidden_states.dtype)
    return fused_logprobs(hidden_states, vocab_weights, input_ids.to(torch.int64),
                          temperature=float(temperature), return_entropy=True)


def _with_sharded_head(forward):
    """verl's FSDP2 engine shards an untied lm_head as an FSDP unit of its own, which the
    fused forward never calls: its weight reaches the op as a sharded DTensor, which
    ``fused_logprobs`` gathers per pass (``fastgrpo.ops.sharded``; verl's own ``torch`` backend
    fails there with "mixed torch.Tensor and DTensor").  FSDP2 allocates a unit's unsharded
    parameter on its first unshard only, and its post-backward reads it when gradients are
    accumulated without sync in reduced precision: unshard + reshard the head once (one
    all-gather, on every rank alike) so that state exists."""
    @functools.wraps(forward)     # verl and transformers read the forward's signature
    def wrapped(self, *args, **kwargs):
        head = self.get_output_embeddings()
        if hasattr(head, "unshard") and not getattr(head, "_fastgrpo_unsharded_once", False):
            head.unshard()
            head.reshard()
            head._fastgrpo_unsharded_once = True
        return forward(self, *args, **kwargs)
    wrapped._fastgrpo_head = True
    return wrapped


def install() -> None:
    """Register ``impl_backend="fastgrpo"`` with verl (idempotent)."""
    from verl.models.transformers import monkey_patch
    from verl.utils.experimental import torch_functional

    fused = torch_functional.FusedLinearForPPO
    if getattr(fused, "_fastgrpo_installed", False):
        return
    init, forward = fused.__init__, fused.forward

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        init(self, chunk_size, "torch" if impl_backend == BACKEND else impl_backend)
        self.impl_backend = impl_backend

    def forward_(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
        if self.impl_backend != BACKEND:
            return forward(self, hidden_states, vocab_weights, input_ids, temperature)
        return fastgrpo_logprobs_entropy(hidden_states, vocab_weights, input_ids, temperature)

    fused.__init__, fused.forward, fused._fastgrpo_installed = __init__, forward_, True

    patch = monkey_patch.patch_forward_with_backends

    def patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend=None):
        if use_fused_kernels and fused_kernels_backend == BACKEND:
            # verl's own torch-backend forward (it builds FusedLinearForPPO with the backend
            # named by model._verl_fused_kernels_backend), then name fastgrpo as that backend
            patch(model, use_fused_kernels=True, fused_kernels_backend="torch")
            model._verl_fused_kernels_backend = BACKEND
            cls = model.__class__
            if not getattr(cls.forward, "_fastgrpo_head", False):
                cls.forward = _with_sharded_head(cls.forward)
            return None
        return patch(model, use_fused_kernels=use_fused_kernels,
                     fused_kernels_backend=fused_kernels_backend)

    monkey_patch.patch_forward_with_backends = patch_forward_with_backends


install()
