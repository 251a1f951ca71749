"""Vision-language policies: images into prompts, packed multimodal rows, 3-D rope positions.

The fused loss never changes: it sees the *language model's* final hidden states and its
lm_head weight.  What this module adds is everything before that:

* :class:`VisionAdapter` — one per model family (Qwen2-VL, Qwen2.5-VL, LLaVA), built from the
  model's config, its tokenizer and its PIL image processor.  Loading never needs the full
  ``Processor`` class (transformers 5.x cannot build Qwen2-VL's without torchvision): the image
  processor turns images into ``pixel_values`` (+ ``image_grid_thw``), and each ``<image>``
  placeholder of the prompt becomes the family's image tokens, as many as the vision tower
  yields for that image (Qwen: ``prod(image_grid_thw) / merge_size**2``; LLaVA: the patch count).
* :func:`attach_vision` — the packing step for multimodal rows: a packed micro-batch gets its
  sequences' ``pixel_values`` / ``image_grid_thw`` concatenated in sequence order, and (Qwen)
  position ids ``[4, 1, L]``: row 0 the text positions restarting at 0 per sequence (from them
  transformers builds the block-diagonal causal mask: attention stays inside each sequence), rows
  1-3 the model's own 3-D mrope positions (``get_rope_index``), computed one sequence at a time,
  so they restart per sequence too.
* :func:`load_image_processor` / :func:`is_vision_config` / :func:`freeze_vision`.

Prompt convention: ``<image>`` in the prompt text marks where each image goes, in order.  A row
whose prompt has no ``<image>`` gets its images in front of the text (one placeholder each, as
LLaVA / R1-VL prompts put them).  A prompt with some placeholders but a different number than
images is an error naming the row.  A text-only row in a vision-language run is trained as
text (no pixel values, plain 1-D positions; the loss is the same): no blank image is invented.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

__all__ = ["IMAGE_PLACEHOLDER", "VisionAdapter", "VisionError", "is_vision_config",
           "load_image_processor", "attach_vision", "freeze_vision", "vision_modules",
           "load_images", "concat_inputs", "check_placeholders", "embed_images_once",
           "share_images_enabled"]

IMAGE_PLACEHOLDER = "<image>"
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
FAMILIES = QWEN_FAMILIES + ("llava",)


from fastgrpo.tasks.data import DataError


class VisionError(DataError):
    """An image or a prompt that cannot be given to the model (the message names row and path)."""


def is_vision_config(config) -> bool:
    """Whether a model config is a vision-language one (it has a ``vision_config``)."""
    return getattr(config, "vision_config", None) is not None


def _family(config) -> str:
    mt = getattr(config, "model_type", "")
    if mt in FAMILIES:
        return mt
    raise VisionError(f"vision-language model type {mt!r} is not supported yet (supported: "
                      f"{', '.join(FAMILIES)})")


def load_image_processor(path: str | os.PathLike, *, min_pixels: int = 0, max_pixels: int = 0):
    """The PIL image processor of a model directory (``preprocessor_config.json``), never the
    torchvision one (not installable with the CPU torch).  ``min_pixels`` / ``max_pixels`` (> 0)
    override the Qwen processors' resize bounds."""
    import transformers

    path = Path(path)
    f = path / "preprocessor_config.json"
    if not f.is_file():
        raise FileNotFoundError(f"model directory {str(path)!r} is a vision-language model but has "
                                f"no preprocessor_config.json (its image processor)")
    conf = json.loads(f.read_text(encoding="utf-8-sig"))
    name = conf.get("image_processor_type") or ""
    base = name.removesuffix("Fast").removesuffix("Pil")
    cls = getattr(transformers, base + "Pil", None) or _pil_class(base)
    if cls is None:
        from transformers import AutoImageProcessor
        ip = AutoImageProcessor.from_pretrained(path)
    else:  # from the dict read above (from_pretrained's own reader refuses a UTF-8 BOM)
        ip = cls.from_dict(conf)
    if min_pixels or max_pixels:
        if not hasattr(ip, "max_pixels") and "longest_edge" not in (getattr(ip, "size", None) or {}):
            raise VisionError(f"--min-pixels/--max-pixels: the image processor {type(ip).__name__} "
                              f"has no pixel bounds (they apply to Qwen2-VL-style processors)")
        lo = min_pixels or ip.size.get("shortest_edge")
        hi = max_pixels or ip.size.get("longest_edge")
        ip.size = {"shortest_edge": lo, "longest_edge": hi}
        ip.min_pixels, ip.max_pixels = lo, hi
    return ip


def _pil_class(base: str):
    """``<Base>Pil`` from its model module (not every one is exported at the top level)."""
    import importlib
    import transformers.models as tm
    for mod in dir(tm):
        if mod.startswith("_"):
            continue
        if base.lower().startswith(mod.replace("_", "")):
            try:
                m = importlib.import_module(f"transformers.models.{mod}.image_processing_pil_{mod}")
            except ImportError:
                continue
            cls = getattr(m, base + "Pil", None)
            if cls is not None:
                return cls
    return None


def load_images(paths: Sequence[str | os.PathLike], where: str = ""):
    """PIL RGB images; a missing or unreadable file raises :class:`VisionError` naming it."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        p = Path(p)
        pre = f"{where}: " if where else ""
        if p.is_dir():
            raise VisionError(f"{pre}image path {str(p)!r} is a directory, not an image file")
        if not p.is_file():
            raise VisionError(f"{pre}image not found: {str(p)!r}")
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise VisionError(f"{pre}image {str(p)!r} is not a readable image ({e})") from None
    return out


def concat_inputs(parts: Sequence[dict]) -> dict:
    """The model inputs of several sequences, concatenated in order along the image axis."""
    keys = dict.fromkeys(k for p in parts for k in p)
    return {k: torch.cat([p[k] for p in parts if k in p], 0) for k in keys}


def check_placeholders(prompt: str, n_images: int, where: str = "") -> None:
    """The prompt's ``<image>`` count must equal its images (or be 0: the images then go in
    front of the text); else :class:`VisionError` naming ``where``."""
    n_ph = prompt.count(IMAGE_PLACEHOLDER)
    if n_ph and n_ph != n_images:
        pre = f"{where}: " if where else ""
        more = "more images than" if n_images > n_ph else "fewer images than"
        raise VisionError(f"{pre}{more} image placeholders: {n_images} image(s), {n_ph} "
                          f"{IMAGE_PLACEHOLDER!r} in the prompt")


class VisionAdapter:
    """Images -> model inputs and image tokens for one model family.

    ``encode(prompt, images, encode_fn)`` -> ``(ids, inputs)``: ``ids`` the prompt with each
    placeholder expanded into the image's tokens (``encode_fn(tokenizer, text)`` renders the
    text, e.g. the chat template); ``inputs`` the per-prompt model inputs (``pixel_values``,
    ``image_grid_thw`` for Qwen), CPU tensors, ``{}`` for a text-only prompt.
    ``positions(model, ids, inputs)`` -> ``[3, len(ids)]`` mrope positions (Qwen) or None.
    """

    def __init__(self, config, tokenizer, image_processor):
        self.family = _family(config)
        self.config, self.tokenizer, self.image_processor = config, tokenizer, image_processor
        self.image_token_id = int(getattr(config, "image_token_id", None)
                                  if getattr(config, "image_token_id", None) is not None
                                  else config.image_token_index)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        if self.family in QWEN_FAMILIES:
            start = tokenizer.convert_ids_to_tokens(int(config.vision_start_token_id))
            end = tokenizer.convert_ids_to_tokens(int(config.vision_end_token_id))
            self.marker = f"{start}{self.image_token}{end}"
            self.merge = int(config.vision_config.spatial_merge_size)
        else:
            self.marker = self.image_token
        self.mrope = self.family in QWEN_FAMILIES
        # never sampled in a completion: an image token there has no image behind it (the
        # forward would fail on the count of image features)
        names = ("image_token_id", "image_token_index", "video_token_id",
                 "vision_start_token_id", "vision_end_token_id")
        self.banned_token_ids = sorted({int(getattr(config, n)) for n in names
                                        if getattr(config, n, None) is not None
                                        and int(getattr(config, n)) < len(tokenizer)})

    # ------------------------------------------------------------------ images and tokens
    def process(self, images) -> tuple[dict, list[int]]:
        """``(inputs, tokens per image)`` of PIL images."""
        if not images:
            return {}, []
        out = self.image_processor(images=list(images), return_tensors="pt")
        if self.mrope:
            grid = out["image_grid_thw"].long()
            counts = (grid.prod(-1) // self.merge ** 2).tolist()
            return {"pixel_values": out["pixel_values"], "image_grid_thw": grid}, counts
        vc = self.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        if getattr(self.config, "vision_feature_select_strategy", "default") == "full":
            n += 1
        return {"pixel_values": out["pixel_values"]}, [n] * len(images)

    def encode(self, prompt: str, images, encode_fn: Callable, where: str = "") -> tuple[list[int], dict]:
        """Prompt ids with expanded image tokens and the prompt's model inputs."""
        images = list(images or [])
        pre = f"{where}: " if where else ""
        n_ph = prompt.count(IMAGE_PLACEHOLDER)
        if self.image_token in prompt.replace(IMAGE_PLACEHOLDER, "") and self.image_token != IMAGE_PLACEHOLDER:
            raise VisionError(f"{pre}the prompt holds the model's image token {self.image_token!r} "
                              f"itself; mark images with {IMAGE_PLACEHOLDER!r}")
        check_placeholders(prompt, len(images), where)
        if images and n_ph == 0:
            prompt = IMAGE_PLACEHOLDER * len(images) + "\n" + prompt
        inputs, counts = self.process(images)
        text = prompt.replace(IMAGE_PLACEHOLDER, self.marker)
        ids = list(encode_fn(self.tokenizer, text))
        out, k = [], 0
        for t in ids:
            if t == self.image_token_id:
                if k >= len(counts):
                    raise VisionError(f"{pre}the rendered prompt has more image tokens than images "
                                      f"(the chat template adds some?)")
                out += [t] * counts[k]
                k += 1
            else:
                out.append(t)
        if k != len(counts):
            raise VisionError(f"{pre}the tokenizer did not keep {self.marker!r} as image tokens "
                              f"({k} of {len(counts)} found)")
        return out, inputs

    def token_type_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """``mm_token_type_ids``: 1 at image tokens, 0 elsewhere (same shape as ``ids``)."""
        return (ids == self.image_token_id).to(torch.int32)

    # ------------------------------------------------------------------ positions
    def positions(self, model, ids: Sequence[int] | torch.Tensor, inputs: dict) -> torch.Tensor | None:
        """The model's own mrope positions ``[3, L]`` of ONE sequence (starting at 0), or None
        for a family with 1-D positions."""
        if not self.mrope:
            return None
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        if "image_grid_thw" not in inputs:
            return torch.arange(ids.shape[1]).expand(3, -1).clone()
        inner = _inner_model(model)
        grid = inputs["image_grid_thw"].to("cpu")
        pos, _ = inner.get_rope_index(ids.cpu(), mm_token_type_ids=self.token_type_ids(ids.cpu()),
                                      image_grid_thw=grid)
        return pos[:, 0]

    def forward_inputs(self, ids: torch.Tensor, inputs: dict) -> dict:
        """The extra forward kwargs for ``ids`` ``[B, T]`` with ``inputs`` (concatenated in
        order): pixel values, grids and (Qwen) ``mm_token_type_ids``.  transformers 5.25:
        Qwen2-VL raises without ``mm_token_type_ids``; Qwen2.5-VL silently falls back to 1-D
        positions without it (measured), so both get it."""
        out = dict(inputs)
        if self.mrope and "image_grid_thw" in inputs:
            out["mm_token_type_ids"] = self.token_type_ids(ids)
        return out


    def prefill_inputs(self, model, prompts: Sequence[Sequence[int]], inputs: Sequence[dict],
                       ids: torch.Tensor, att: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """The prefill of left-padded prompts ``ids`` ``[B, W]`` (``att`` 1 at real tokens):
        ``(extra forward kwargs, position_ids)``; positions ``[3, B, W]`` for mrope (each
        prompt's own, padding at 0), else ``[B, W]`` counting real tokens.  The next token of
        row b then sits at ``positions[..., b, :].max() + 1`` (text after the prompt)."""
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        if self.mrope:
            width = ids.shape[1]
            pos3 = torch.zeros(3, *ids.shape, dtype=torch.long)
            for b, (p, inp) in enumerate(zip(prompts, inputs)):
                pos3[:, b, width - len(p):] = self.positions(model, p, inp or {})
            pos = pos3.to(ids.device)
        parts = [x for x in inputs if x]
        extra = self.forward_inputs(ids, concat_inputs(parts)) if parts else {}
        return {k: v.to(ids.device) for k, v in extra.items()}, pos


def _inner_model(model):
    """The ``*VLModel`` holding ``get_rope_index`` inside a ``*ForConditionalGeneration``."""
    from fastgrpo.hf import unwrap_model
    m = unwrap_model(model)
    for cand in (m, getattr(m, "model", None)):
        if cand is not None and hasattr(cand, "get_rope_index"):
            return cand
    raise VisionError(f"{type(m).__name__} has no get_rope_index")


def share_images_enabled() -> bool:
    """On unless ``FASTGRPO_SHARE_IMAGES=0`` (for measuring what it saves)."""
    return os.environ.get("FASTGRPO_SHARE_IMAGES", "1") != "0"


def attach_vision(batches, samples, adapter: VisionAdapter, model, *,
                  share_images: bool | None = None) -> None:
    """Give each packed micro-batch (``pack_bins`` output; ``seq_index`` into ``samples``) its
    sequences' images: ``model_inputs`` concatenated in sequence order and, for mrope models,
    position ids ``[4, 1, L]`` (text positions restarting per sequence + per-sequence mrope).

    ``share_images`` (default on, ``FASTGRPO_SHARE_IMAGES=0`` turns it off; mrope models): the
    G samples of a prompt carry the same images, so each distinct image of the row is given
    once (``pixel_values`` / ``image_grid_thw`` of the distinct images) with ``image_index``,
    the distinct image behind each image of the row in order; :func:`embed_images_once` then
    runs the vision tower once per distinct image and hands its output to every sample."""
    if share_images is None:
        share_images = share_images_enabled()
    for mb in batches:
        idx = mb.seq_index.tolist()
        if not idx:
            continue
        parts = [samples[i].prompt_inputs for i in idx]
        if adapter.mrope:
            cu = mb.cu_seqlens.tolist()
            ids = mb.input_ids[0].cpu()
            rows = []
            for k, i in enumerate(idx):
                seq = ids[cu[k]:cu[k + 1]]
                p3 = adapter.positions(model, seq, parts[k])
                rows.append(torch.cat([torch.arange(len(seq))[None], p3], 0))
            mb.position_ids = torch.cat(rows, 1)[:, None].to(mb.input_ids.device)
        inputs = concat_inputs([p for p in parts if p])
        if not inputs:
            continue
        if share_images and adapter.mrope and "image_grid_thw" in inputs:
            inputs = _distinct_images([p for p in parts if p])
        else:
            inputs = adapter.forward_inputs(mb.input_ids.cpu(), inputs)
        mb.model_inputs = {k: v.to(mb.input_ids.device) for k, v in inputs.items()}


def _distinct_images(parts: Sequence[dict]) -> dict:
    """Qwen inputs of a row's sequences -> the distinct images (equal pixels and grid: the
    same image, whichever sample carries it) and ``image_index`` (the distinct image of each
    image of the row, in order)."""
    pix, grids, index = [], [], []
    for p in parts:
        grid = p["image_grid_thw"]
        for pv, g in zip(p["pixel_values"].split(grid.prod(-1).tolist()), grid):
            for j, (q, h) in enumerate(zip(pix, grids)):
                if torch.equal(h, g) and (_same_view(q, pv) or torch.equal(q, pv)):
                    index.append(j)
                    break
            else:
                index.append(len(pix))
                pix.append(pv)
                grids.append(g)
    return {"pixel_values": torch.cat(pix), "image_grid_thw": torch.stack(grids),
            "image_index": torch.tensor(index, dtype=torch.long)}


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


def embed_images_once(model, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                      image_grid_thw: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """``inputs_embeds`` ``[1, L, D]`` of a packed row whose distinct images are given once
    (:func:`attach_vision`): the vision tower runs once over the distinct images, and each
    image of the row takes its image's output (``index_select``: the gradient of an image
    shared by G samples is the sum of theirs, accumulated once in the tower's backward).
    Call it inside the policy's forward (DDP / FSDP2 hooks see the vision tower run)."""
    inner = _inner_model(model)
    out = inner.get_image_features(pixel_values, image_grid_thw)
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, torch.Tensor):  # (older transformers: one tensor of all images)
        merge = int(inner.config.vision_config.spatial_merge_size)
        feats = feats.split((image_grid_thw.prod(-1) // merge ** 2).tolist())
    emb = inner.get_input_embeddings()(input_ids)
    image = torch.cat([feats[j] for j in image_index.tolist()]) if len(feats) else None
    mask = input_ids == int(inner.config.image_token_id)
    n = int(mask.sum())
    if image is None or image.shape[0] != n:
        raise VisionError(f"the row has {n} image tokens but its images give "
                          f"{0 if image is None else image.shape[0]} features")
    return emb.masked_scatter(mask[..., None], image.to(emb.dtype))


def vision_modules(model) -> list[torch.nn.Module]:
    """The vision tower and projector of a VL model (Qwen: ``visual`` incl. its merger;
    LLaVA: ``vision_tower`` + ``multi_modal_projector``)."""
    from fastgrpo.hf import unwrap_model
    m = unwrap_model(model)
    inner = getattr(m, "model", m)
    mods = [getattr(inner, n) for n in ("visual", "vision_tower", "multi_modal_projector")
            if isinstance(getattr(inner, n, None), torch.nn.Module)]
    if not mods:
        raise VisionError(f"{type(m).__name__}: no vision tower found to freeze")
    return mods


def freeze_vision(model) -> int:
    """``--freeze-vision``: the vision tower and projector stop training; returns how many
    parameters were frozen."""
    n = 0
    for mod in vision_modules(model):
        for p in mod.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                n += p.numel()
    return n
