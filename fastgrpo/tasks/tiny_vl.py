"""Tiny random vision-language models (no download): Qwen2-VL, Qwen2.5-VL and LLaVA built from
a config, with the built-in word-level tokenizer plus each family's image tokens and the PIL
image processor of the family.  For tests and the built-in chart task.

``build_tiny_vl(family)`` -> ``(model, tokenizer, image_processor)``; ``save_tiny_vl(dir, ...)``
writes a directory that ``--model DIR`` loads (config, weights, tokenizer, the image
processor's ``preprocessor_config.json``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastgrpo.tasks.arithmetic.tokenizer import build_tokenizer

__all__ = ["FAMILIES", "build_tiny_vl", "save_tiny_vl", "tiny_vl_tokenizer", "random_image"]

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava")

# the family's image tokens (added to the tokenizer as special tokens)
_QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
_LLAVA_TOKENS = ["<image>"]


def tiny_vl_tokenizer(family: str, extra_texts: list[str] | None = None):
    """The built-in word-level tokenizer plus ``family``'s image tokens (special tokens)."""
    tok = build_tokenizer(extra_texts)
    extra = _LLAVA_TOKENS if family == "llava" else _QWEN_TOKENS
    tok.add_tokens(extra, special_tokens=True)
    return tok


def _image_processor(family: str, *, min_pixels: int, max_pixels: int, image_size: int):
    if family == "llava":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                     crop_size={"height": image_size, "width": image_size})
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels,
                                    size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


def build_tiny_vl(family: str = "qwen2_vl", *, tokenizer=None, seed: int = 0, hidden_size: int = 64,
                  num_layers: int = 2, num_heads: int = 4, vision_depth: int = 2,
                  vision_dim: int = 32, min_pixels: int = 28 * 28, max_pixels: int = 28 * 28 * 16,
                  image_size: int = 28, attn_implementation: str = "sdpa",
                  vocab_size: int | None = None, tie_word_embeddings: bool = True):
    """A freshly initialised tiny VL model of ``family`` (``FAMILIES``), its tokenizer and its PIL
    image processor.  Qwen: head_dim 16 (mrope sections 2/3/3), 14-pixel patches merged 2x2.
    LLaVA: a 2-layer CLIP vision tower on ``image_size`` pixels, 14-pixel patches, Llama text."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    tok = tokenizer or tiny_vl_tokenizer(family)
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_TOKENS + _LLAVA_TOKENS if t in tok.get_vocab()}
    text = dict(vocab_size=vocab_size or len(tok), hidden_size=hidden_size, num_hidden_layers=num_layers,
                num_attention_heads=num_heads, num_key_value_heads=num_heads // 2,
                intermediate_size=2 * hidden_size, max_position_embeddings=4096,
                rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        half = hidden_size // num_heads // 2
        section = [half - 2 * (half // 3), half // 3, half // 3]
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": section,
                                   "rope_theta": 10000.0}
        vision = dict(depth=vision_depth, hidden_size=hidden_size, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                      vision_start_token_id=ids["<|vision_start|>"],
                      vision_end_token_id=ids["<|vision_end|>"],
                      tie_word_embeddings=tie_word_embeddings)
        if family == "qwen2_vl":
            from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration as M
            vision.update(embed_dim=vision_dim, mlp_ratio=2)
            cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **common)
        else:
            from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration as M
            vision.update(out_hidden_size=hidden_size, hidden_size=vision_dim,
                          intermediate_size=2 * vision_dim, window_size=56,
                          fullatt_block_indexes=[vision_depth - 1])
            cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    else:
        from transformers import LlavaConfig, LlavaForConditionalGeneration as M
        text.pop("max_position_embeddings")
        vision = dict(model_type="clip_vision_model", hidden_size=vision_dim,
                      intermediate_size=2 * vision_dim, num_hidden_layers=vision_depth,
                      num_attention_heads=2, image_size=image_size, patch_size=14,
                      projection_dim=vision_dim)
        cfg = LlavaConfig(text_config={"model_type": "llama", **text, "max_position_embeddings": 4096},
                          vision_config=vision, image_token_index=ids["<image>"],
                          vision_feature_layer=-1, vision_feature_select_strategy="default",
                          image_seq_length=(image_size // 14) ** 2,
                          tie_word_embeddings=tie_word_embeddings)
    cfg._attn_implementation = attn_implementation
    for sub in ("text_config", "vision_config"):
        getattr(cfg, sub)._attn_implementation = attn_implementation
    model = M(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model, tok, _image_processor(family, min_pixels=min_pixels, max_pixels=max_pixels,
                                        image_size=image_size)


def save_tiny_vl(directory, family: str = "qwen2_vl", **kw) -> Path:
    """Build a tiny VL model (:func:`build_tiny_vl`) and save it as a model directory."""
    model, tok, ip = build_tiny_vl(family, **kw)
    d = Path(directory)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    ip.save_pretrained(d)
    return d


def random_image(width: int, height: int, seed: int = 0):
    """A PIL RGB image of random pixels (deterministic in ``seed``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
