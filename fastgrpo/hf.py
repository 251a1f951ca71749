"""Hugging Face model helpers shared by the trainer and every integration.

Three things, each defined once:

* :func:`unwrap_model`: the ``PreTrainedModel`` inside DDP / DataParallel, ``torch.compile``,
  PEFT and fastgrpo's own policy wrapper.
* :func:`lm_head_weight`: the output projection ``[V, D]`` (the embedding matrix when tied).
* :func:`backbone_hidden_states`: the decoder stack's final hidden states (final norm
  included); the lm_head is never called.

Packed sequences (transformers 5.x): ``position_ids`` restart at 0 for every sequence, *no*
``attention_mask`` and ``use_cache=False``; the mask builder then recognises the packed layout
from the position ids and keeps sequences apart for eager and SDPA attention
(``tests/test_packing.py`` checks packed against per-sequence outputs).  On the flash-attention
path the sequence boundaries go straight to the kernel as ``cu_seq_lens_q/k`` and
``max_length_q/k`` (no host sync per layer).
"""

from __future__ import annotations

import torch

__all__ = ["unwrap_model", "lm_head_weight", "backbone_hidden_states", "backbone_output",
           "packed_attention_kwargs"]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside any stack of wrappers: DDP / DataParallel (``.module``),
    ``torch.compile`` (``._orig_mod``), PEFT (``get_base_model()``, the adapters live inside
    the layers) and ``fastgrpo.trainer.policy.PolicyHiddenStates`` (``.model``)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif getattr(model, "_fastgrpo_wraps_model", False):
            model = model.model
        else:
            return model


def lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The output projection ``[V, D]`` (the embedding matrix itself when tied)."""
    model = unwrap_model(model)
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return head.weight


def packed_attention_kwargs(backend: str, cu_seqlens: torch.Tensor | None,
                            max_len: int | None = None) -> dict:
    """Extra forward kwargs for one packed row (with ``position_ids`` restarting at 0) under the
    attention implementation ``backend``.

    Varlen kernels (flash_attention_2, xformers, ...): ``cu_seq_lens_q/k`` (int32, on the row's
    device) and ``max_length_q/k``.  sdpa / eager: ``{}`` (the mask comes from the position ids).
    """
    if backend in ("sdpa", "eager") or cu_seqlens is None:
        return {}
    cu = cu_seqlens.to(torch.int32)
    if max_len is None:
        max_len = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": int(max_len),
            "max_length_k": int(max_len)}


def backbone_output(model: torch.nn.Module, *, cu_seqlens: torch.Tensor | None = None,
                    max_seqlen: int | None = None, **kwargs):
    """``model.base_model(**kwargs, use_cache=False)``: the decoder stack's output object.

    ``model`` must already be unwrapped (callers that hold a wrapper use
    :func:`backbone_hidden_states`).  With a varlen attention implementation and ``cu_seqlens``
    given, the packed row's sequence boundaries are passed to the kernel directly.
    """
    if cu_seqlens is not None:
        impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
        x = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        kwargs.update(packed_attention_kwargs(impl, cu_seqlens.to(x.device), max_seqlen))
    kwargs["use_cache"] = False
    return model.base_model(**kwargs)


def backbone_hidden_states(model, input_ids: torch.Tensor, attention_mask=None,
                           position_ids=None, *, via_forward: bool = False,
                           cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                           **model_kwargs) -> torch.Tensor:
    """Last hidden states ``[B, T, D]`` of a Hugging Face causal LM, without its lm_head.

    Runs the decoder stack (final norm included) with ``use_cache=False``, through any
    wrapper :func:`unwrap_model` knows.  Padded batches: pass ``attention_mask``.  Packed rows
    (``[1, L]``): pass ``position_ids`` restarting at 0 per sequence, no ``attention_mask``,
    and optionally ``cu_seqlens`` / ``max_seqlen`` (used by flash attention).  Position ``t``
    predicts token ``t + 1``.

    ``via_forward=True`` runs the model's own ``forward`` instead (``output_hidden_states``,
    ``logits_to_keep=1``: the lm_head sees one position per row) so that a wrapper whose
    forward must run (FSDP, DeepSpeed ZeRO-3 gathering the root's parameters) is honoured.
    """
    if attention_mask is not None:
        model_kwargs["attention_mask"] = attention_mask
    if via_forward:
        out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                    output_hidden_states=True, logits_to_keep=1, **model_kwargs)
        return out.hidden_states[-1]
    out = backbone_output(unwrap_model(model), input_ids=input_ids, position_ids=position_ids,
                          cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, **model_kwargs)
    return out.last_hidden_state
