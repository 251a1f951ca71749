"""Model helpers: the tiny built-in Llama, loading, and the backbone-only forward.

The trainer never calls the lm_head.  ``backbone_hidden`` runs the decoder stack
(``model.base_model``) on a packed row and returns the final hidden states; the fused loss
takes them together with ``lm_head_weight(model)``.

Packed sequences (transformers 5.x): ``position_ids`` restart at 0 for every sequence, *no*
``attention_mask`` and ``use_cache=False``; the mask builder then recognises the packed
layout from the position ids and keeps sequences apart for eager and SDPA attention
(``tests/test_packing.py`` checks packed against per-sequence outputs).  On the flash-attention
path the sequence boundaries are passed directly as ``cu_seq_lens_q/k`` and ``max_length_q/k``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["tiny_config", "build_tiny_model", "load_model", "lm_head_weight", "backbone_hidden",
           "DEFAULT_MODEL_DIR", "default_device"]

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "warmup"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tiny_config(vocab_size: int, *, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                intermediate_size: int | None = None, max_position_embeddings: int = 512,
                tie_word_embeddings: bool = True, bos_token_id=None, eos_token_id=None,
                pad_token_id=None, attn_implementation: str = "sdpa"):
    """A small ``LlamaConfig`` (default ~0.7M parameters at the task's vocabulary)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
        intermediate_size=intermediate_size or 2 * hidden_size,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        rms_norm_eps=1e-5, attention_dropout=0.0,
    )
    cfg._attn_implementation = attn_implementation
    return cfg


def build_tiny_model(tokenizer=None, *, vocab_size: int | None = None, seed: int = 0, **kw):
    """A freshly initialised tiny ``LlamaForCausalLM`` (random weights, no download)."""
    from transformers import LlamaForCausalLM

    if vocab_size is None:
        vocab_size = len(tokenizer)
    if tokenizer is not None:
        kw.setdefault("bos_token_id", tokenizer.bos_token_id)
        kw.setdefault("eos_token_id", tokenizer.eos_token_id)
        kw.setdefault("pad_token_id", tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(vocab_size, **kw))
    return model


def load_model(path: str | os.PathLike | None = None, *, device=None, dtype=None,
               attn_implementation: str | None = None):
    """``(model, tokenizer)`` from a local Hugging Face model directory (default: the shipped
    warm-up checkpoint).  Errors name the directory when it is missing or incomplete."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path else DEFAULT_MODEL_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {str(path)!r}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(path)!r} has no config.json "
                                f"(expected a Hugging Face causal LM directory)")
    kw = {}
    if dtype is not None:
        kw["dtype"] = dtype
    if attn_implementation is None:
        attn_implementation = "sdpa"
        try:  # flash-attn only where it is installed and usable
            import flash_attn  # noqa: F401
            if device is not None and torch.device(device).type == "cuda":
                attn_implementation = "flash_attention_2"
        except Exception:
            pass
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if device is not None:
        model.to(device)
    return model, tokenizer


def lm_head_weight(model) -> torch.Tensor:
    """The output projection ``[V, D]`` (the embedding matrix itself when tied)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return head.weight


def _uses_flash(model) -> bool:
    impl = getattr(model.config, "_attn_implementation", "") or ""
    return "flash" in impl


def backbone_hidden(model, input_ids: torch.Tensor, position_ids: torch.Tensor,
                    cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                    **attn_kwargs) -> torch.Tensor:
    """Final hidden states ``[1, L, D]`` of a packed row, from the decoder stack only.

    ``position_ids`` restart at 0 per sequence; no attention mask is passed (see the module
    docstring).  With a flash-attention implementation and ``cu_seqlens`` given, the sequence
    boundaries go straight to the kernel.
    """
    if cu_seqlens is not None and _uses_flash(model):
        cu = cu_seqlens.to(device=input_ids.device, dtype=torch.int32)
        ms = int(max_seqlen) if max_seqlen is not None else int((cu[1:] - cu[:-1]).max())
        attn_kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=ms, max_length_k=ms)
    out = model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                           **attn_kwargs)
    return out.last_hidden_state
