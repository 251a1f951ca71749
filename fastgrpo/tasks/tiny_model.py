"""The tiny Llama the built-in tasks warm up (random weights, no download), and where the
shipped warm-up checkpoint lives."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["tiny_config", "build_tiny_model", "WARMUP_DIR"]

WARMUP_DIR = Path(__file__).resolve().parent / "arithmetic" / "checkpoint"  # the default --model


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
    return LlamaForCausalLM(tiny_config(vocab_size, **kw))
