"""The trainer's vision-language hooks (``fastgrpo.vl`` does the model-level work).

A run is vision-language when ``--model`` is an image-text-to-text model directory (its config
has a ``vision_config``).  Then :func:`setup_vision` returns a :class:`VisionRun` that the loop
calls at four places, and nothing else in the loop changes:

* prompts: ``encode(row)`` -> ``(ids, inputs)``, the row's images loaded with Pillow, resized by
  the model's PIL image processor (``--min-pixels`` / ``--max-pixels``), each ``<image>``
  expanded into the model's image tokens (cached per row);
* rollouts / greedy eval: ``generate_kwargs(rows)`` -> ``prompt_inputs`` + the adapter for
  ``rollout.generate`` (one prefill per prompt with its images, the KV cache shared by G);
* packing: ``attach(batches, samples, model)`` (pixel values in sequence order, per-sequence
  mrope positions);
* saving: ``save(directory)`` writes ``preprocessor_config.json`` next to the weights, so a
  checkpoint or the final model is a ``--model`` again.

Data: a row's ``image`` is a path or a list of paths, relative to its JSONL file's folder (a
PIL image is taken as it is, for built-in tasks).  Every path is checked when the run starts
(exists, is an image): errors name the row and the path, before any training.  Text-only rows
are trained as text (no blank image).  Images given to a text-only model are an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from fastgrpo.tasks.data import DataError
from fastgrpo.vl import (VisionAdapter, VisionError, attach_vision, check_placeholders, freeze_vision,
                         is_vision_config, load_image_processor, load_images)

__all__ = ["VisionRun", "setup_vision", "row_images", "check_rows"]


def row_images(row: dict) -> list:
    """The row's ``image`` field as a list (paths or PIL images); ``[]`` when absent/null."""
    v = row.get("image")
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def check_rows(rows: Sequence[dict], root: str | os.PathLike | None, what: str,
               file: str = "") -> None:
    """Resolve each row's image paths against ``root`` (in place, as absolute strings) and check
    that each one is a readable image; errors name the row and the path."""
    from PIL import Image, UnidentifiedImageError

    for i, row in enumerate(rows):
        imgs = row_images(row)
        where = f"{what} row {i + 1}" + (f" of {file}" if file else "")
        check_placeholders(row["prompt"], len(imgs), where)
        if not imgs:
            continue
        out = []
        for x in imgs:
            if not isinstance(x, (str, os.PathLike)):
                if hasattr(x, "convert"):  # a PIL image
                    out.append(x)
                    continue
                raise VisionError(f"{where}: field 'image' must be a path or a list of paths, got "
                                  f"{type(x).__name__}")
            p = Path(x)
            if not p.is_absolute() and root is not None:
                p = Path(root) / p
            if p.is_dir():
                raise VisionError(f"{where}: image path {str(p)!r} is a directory, not an image "
                                  f"file")
            if not p.is_file():
                raise VisionError(f"{where}: image not found: {str(p)!r}")
            try:
                with Image.open(p) as im:
                    im.verify()
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise VisionError(f"{where}: image {str(p)!r} is not a readable image ({e})") from None
            out.append(str(p))
        row["image"] = out


class VisionRun:
    def __init__(self, adapter: VisionAdapter, model_dir: str | os.PathLike | None):
        self.adapter = adapter
        self.model_dir = model_dir
        self._cache: dict[int, tuple[tuple[list[int], dict], dict]] = {}
        self.max_images = 1   # images in one prompt, at most (the vLLM engine's limit)

    def encode(self, row: dict, encode_fn: Callable, where: str = "") -> tuple[list[int], dict]:
        """``(prompt ids with image tokens, model inputs)`` of a row (cached per row object)."""
        key = id(row)
        if key not in self._cache:
            images = self.images(row, where)
            self._cache[key] = (self.adapter.encode(row["prompt"], images, encode_fn, where), row)
        return self._cache[key][0]

    @staticmethod
    def images(row: dict, where: str = "") -> list:
        """The row's images as PIL images (paths loaded, in order)."""
        imgs = row_images(row)
        paths = [x for x in imgs if isinstance(x, (str, os.PathLike))]
        loaded = iter(load_images(paths, where) if paths else [])
        return [next(loaded) if isinstance(x, (str, os.PathLike)) else x for x in imgs]

    def generate_kwargs(self, rows: Sequence[dict], encode_fn: Callable, what: str = "train", *,
                        images: bool = False) -> tuple[list, dict]:
        """``(prompt ids, kwargs for rollout.generate)`` of ``rows``; ``images``: the rows' PIL
        images too (``images=``, for the vLLM engine; loaded again, not cached)."""
        enc = [self.encode(r, encode_fn, f"{what} row") for r in rows]
        kw = {"prompt_inputs": [e[1] for e in enc], "vision": self.adapter}
        if images:
            kw["images"] = [self.images(r, f"{what} row") for r in rows]
        return [e[0] for e in enc], kw

    def attach(self, batches, samples, model) -> None:
        attach_vision(batches, samples, self.adapter, model)

    def save(self, directory) -> None:
        self.adapter.image_processor.save_pretrained(directory)


def setup_vision(cfg, model, tokenizer, train_rows: list[dict], eval_rows: list[dict],
                 image_processor=None, device="cpu") -> VisionRun | None:
    """The run's :class:`VisionRun` (None for a text-only model).  Checks the rows' images
    first: images given to a text-only model raise ``DataError`` naming the row."""
    vl = is_vision_config(getattr(model, "config", None))
    if vl:  # (images given to a text-only model are refused below, Pillow or not)
        from fastgrpo.trainer.requirements import require
        require("Pillow", "a vision-language model (its images)")
    for what, rows, file in (("train", train_rows, cfg.train_file), ("eval", eval_rows, cfg.eval_file)):
        root = Path(file).resolve().parent if file else None
        if not vl:
            for i, row in enumerate(rows):
                if row_images(row):
                    where = f"{what} row {i + 1}" + (f" of {file}" if file else "")
                    raise DataError(f"{where} has an image, but the model "
                                    f"({cfg.model or 'the built-in text model'}) is text-only; "
                                    f"give --model a vision-language model directory")
            continue
        check_rows(rows, root, what, file)
    if not vl:
        if cfg.freeze_vision:
            raise DataError("--freeze-vision: the model is text-only (it has no vision tower)")
        return None
    from fastgrpo.trainer.engines import select_engine
    from fastgrpo.vl import QWEN_FAMILIES
    family = getattr(model.config, "model_type", "")
    if select_engine(cfg.rollout, device) == "vllm" and family not in QWEN_FAMILIES:
        from fastgrpo.trainer.config import ConfigError
        raise ConfigError(f"--rollout {cfg.rollout}: vision-language rollouts on vLLM support "
                          f"Qwen2-VL / Qwen2.5-VL; the model is {family!r} (give --rollout hf)")
    if image_processor is None:
        if not cfg.model:
            raise DataError("a vision-language model given in code needs its image processor "
                            "(run(..., image_processor=...)) or --model DIR")
        image_processor = _image_processor(cfg)
    try:
        adapter = VisionAdapter(model.config, tokenizer, image_processor)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise VisionError(f"--model {cfg.model}: cannot build the vision-language processor from "
                          f"its tokenizer and image processor ({type(e).__name__}: {e})") from None
    if cfg.freeze_vision:
        freeze_vision(model)
    run = VisionRun(adapter, cfg.model)
    run.max_images = max((len(row_images(r)) for r in train_rows + eval_rows), default=1)
    return run


def _image_processor(cfg):
    """The model directory's image processor; errors name preprocessor_config.json."""
    f = Path(cfg.model) / "preprocessor_config.json"
    try:
        return load_image_processor(cfg.model, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    except (VisionError, FileNotFoundError):
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise VisionError(f"--model {cfg.model}: cannot build its image processor from {str(f)!r} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the "
                          f"file must be a Hugging Face image processor config (e.g. "
                          f"image_processor_type Qwen2VLImageProcessor)") from None
