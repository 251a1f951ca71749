"""The policy model in the trainer: load it, wrap it for data parallelism, run it to hidden states.

The trainer never calls the lm_head.  :func:`policy_hidden_states` runs the decoder stack on a
packed micro-batch and returns ``(hidden [L, D], lm_head weight [V, D])`` for the fused loss.

Why :class:`PolicyHiddenStates` (what :func:`wrap_model` wraps): DDP synchronises gradients only
for a forward that went through the DDP wrapper, and the trainer never calls the lm_head; so the
wrapped module's forward runs the backbone and returns ``(hidden, lm_head.weight)``.  The
lm_head weight is then a forward output of the wrapper, and its gradient (from the fused loss)
is synchronised like any other.  Generation uses the plain model (``fastgrpo.hf.unwrap_model``):
with DDP the parameters are the same tensors; with FSDP2 generate inside
:func:`gather_for_generation`.  ``wrap_model`` uses FSDP2 ``fully_shard`` (per decoder layer,
then the root) on CUDA and DDP elsewhere (or when ``strategy="ddp"``).

LoRA (``--lora-r``): :func:`apply_lora` puts peft adapters into the model (in place) and
freezes the rest; :func:`save_lora` writes the merged model and the adapter.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from fastgrpo.hf import backbone_output, lm_head_weight, unwrap_model
from fastgrpo.tasks.tiny_model import WARMUP_DIR
from fastgrpo.trainer.config import ConfigError
from fastgrpo.trainer.distributed import is_distributed
from fastgrpo.trainer.packing import MicroBatch

__all__ = ["load_model", "PolicyHiddenStates", "wrap_model", "as_policy", "policy_hidden_states",
           "sync_gradients", "gather_for_generation", "apply_lora", "merged_lora_state_dict",
           "save_lora"]


def load_model(path: str | os.PathLike | None = None, *, device=None, dtype=None,
               attn_implementation: str | None = None):
    """``(model, tokenizer)`` from a local Hugging Face model directory (default: the shipped
    warm-up checkpoint).  Errors name the directory when it is missing or incomplete.  A
    vision-language directory (its config has a ``vision_config``) loads as an image-text-to-text
    model; its image processor is loaded by ``fastgrpo.trainer.vision``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path else WARMUP_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {str(path)!r}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(path)!r} has no config.json "
                                f"(expected a Hugging Face causal LM directory)")
    weights = [n for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                           "pytorch_model.bin.index.json") if (path / n).is_file()]
    if not weights and not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"model directory {str(path)!r} has a config.json but no weights "
                                f"(model.safetensors or pytorch_model.bin)")
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
    from transformers import AutoConfig
    if getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None:
        # a vision-language model (fastgrpo.vl): the whole model, vision tower included
        from transformers import AutoModelForImageTextToText as AutoModelForCausalLM  # noqa: N814
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if device is not None:
        model.to(device)
    return model, tokenizer


class PolicyHiddenStates(torch.nn.Module):
    """Forward = backbone hidden states + the lm_head weight, for the fused loss.

    ``forward(input_ids [1, L], position_ids [1, L], cu_seqlens=None, max_seqlen=None,
    **model_inputs) -> (hidden [L, D], weight [V, D])`` (a packed row: the batch dimension of 1
    is dropped, as ``grpo_loss``'s packed layout takes it; ``[B, T, D]`` is returned unchanged
    for B > 1).  Packed rows: ``position_ids`` restart per sequence, no attention mask, no cache.
    """

    _fastgrpo_wraps_model = True  # fastgrpo.hf.unwrap_model looks through it

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids=None, **model_inputs):
        if "image_index" in model_inputs:  # each distinct image once (fastgrpo.vl.attach_vision)
            from fastgrpo.vl import embed_images_once
            names = ("pixel_values", "image_grid_thw", "image_index")
            images = [model_inputs.pop(k) for k in names]
            model_inputs["inputs_embeds"] = embed_images_once(self.model, input_ids, *images)
            input_ids = None
        hidden = backbone_output(self.model, input_ids=input_ids, position_ids=position_ids,
                                 **model_inputs).last_hidden_state
        return (hidden[0] if hidden.shape[0] == 1 else hidden), lm_head_weight(self.model)


def _decoder_layers(model) -> list[torch.nn.Module]:
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    return list(layers) if layers is not None else []


def wrap_model(model: torch.nn.Module, device=None, *, strategy: str = "auto",
               mixed_precision: bool = False) -> torch.nn.Module:
    """Wrap ``model`` (a HF causal LM, or a peft model of one) for data-parallel training.

    Returns a module whose forward gives ``(hidden, lm_head_weight)`` (``PolicyHiddenStates``):
    not distributed -> the plain ``PolicyHiddenStates``; ``strategy="auto"`` -> FSDP2
    ``fully_shard`` on CUDA, DDP on CPU (gloo); ``"ddp"`` / ``"fsdp"`` force one.
    Build the optimizer from ``wrapped.parameters()`` *after* wrapping (FSDP2 replaces the
    parameters by sharded DTensors).  ``mixed_precision`` (FSDP2 only): bf16 compute, fp32
    gradient reduction.
    """
    model = unwrap_model(model)  # a peft model: its adapters live inside the HF model
    policy = PolicyHiddenStates(model)
    if not is_distributed():
        return policy
    device = torch.device(device) if device is not None else \
        (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    if strategy not in ("auto", "ddp", "fsdp"):
        raise ValueError(f"strategy must be auto, ddp or fsdp, got {strategy!r}")
    use_fsdp = strategy == "fsdp" or (strategy == "auto" and device.type == "cuda")
    model.to(device)
    if use_fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        kw = {}
        if mixed_precision:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                   reduce_dtype=torch.float32)
        for layer in _decoder_layers(model):
            fully_shard(layer, **kw)
        fully_shard(policy, **kw)
        # one forward through the root now (every rank, token id 0): FSDP2 initialises lazily
        # at the first forward, and generation later calls the inner layers directly, which
        # would otherwise each initialise as a root of their own.  The root keeps its
        # parameters unsharded after a forward: reshard, so that ``policy.parameters()`` (the
        # optimizer's) are the sharded ones again
        with torch.no_grad():
            one = torch.zeros(1, 1, dtype=torch.long, device=device)
            policy(one, one)
        policy.reshard()
        return policy
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(policy, device_ids=ids)


@contextlib.contextmanager
def sync_gradients(wrapped: torch.nn.Module, last: bool):
    """Gradient accumulation: communicate only on the ``last`` micro-batch of a step.

    DDP: ``no_sync()`` on the others.  FSDP2: ``set_requires_gradient_sync(last)``.
    Otherwise a no-op.  Every rank must run the same number of micro-batches.
    """
    if isinstance(wrapped, DistributedDataParallel):
        ctx = contextlib.nullcontext() if last else wrapped.no_sync()
        with ctx:
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


@contextlib.contextmanager
def gather_for_generation(wrapped: torch.nn.Module):
    """Context in which ``unwrap_model(wrapped).generate(...)`` may run.

    FSDP2: every ``fully_shard``-ed module is all-gathered once (``unshard``) and kept
    unsharded (``set_reshard_after_forward(False)``), so generation runs *no* collectives and
    ranks may generate different numbers of tokens; resharded on exit.  DDP / single process:
    nothing to do (the parameters are the model's own).
    """
    fsdp_mods = [m for m in wrapped.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]
    if not fsdp_mods:
        yield
        return
    for m in fsdp_mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in fsdp_mods:
            # back to FSDP2's own settings: inner modules reshard after forward; the root does
            # not (its lazy init sets that), and must not here since the lm_head weight it
            # returns is used by the loss after the forward
            m.set_reshard_after_forward(m is not wrapped, recurse=False)
            m.reshard()


def as_policy(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` as a module whose forward gives ``(hidden, lm_head weight)``: the result of
    :func:`wrap_model` as it is, a plain causal LM wrapped (no copy) on the fly."""
    if isinstance(model, (PolicyHiddenStates, DistributedDataParallel)):
        return model
    return PolicyHiddenStates(unwrap_model(model))


def bf16_autocast(device, *, bf16: bool = False, cpu_bf16: bool = False):
    """bf16 autocast on ``device``: CUDA when ``bf16`` (``--bf16``), CPU when ``cpu_bf16``
    (``--cpu-bf16``); otherwise a no-op context."""
    device = torch.device(device)
    on = (bf16 and device.type == "cuda") or (cpu_bf16 and device.type == "cpu")
    return torch.autocast(device.type if device.type in ("cuda", "cpu") else "cpu",
                          dtype=torch.bfloat16, enabled=on)


def policy_hidden_states(model: torch.nn.Module, mb: MicroBatch, *, bf16: bool = False,
                         cpu_bf16: bool = False):
    """``(hidden [L, D], lm_head weight [V, D])`` of a packed micro-batch, the weight in the
    hidden states' dtype.  ``model``: a causal LM, or the result of :func:`wrap_model` (its
    forward must run, so that DDP / FSDP2 see it).  ``bf16``: autocast the backbone (CUDA);
    ``cpu_bf16``: the same on CPU."""
    policy = as_policy(model)
    device = mb.input_ids.device
    shared = _shared_row(policy, mb)
    with bf16_autocast(device, bf16=bf16, cpu_bf16=cpu_bf16):
        if shared is not None:  # each prompt once, its completions after it (trainer.prefix)
            hidden, weight = policy(shared.input_ids, shared.position_ids,
                                    shared_prefix_groups=shared.groups)
            hidden = hidden.index_select(0, shared.expand)
        else:
            hidden, weight = policy(mb.input_ids, mb.position_ids, cu_seqlens=mb.cu_seqlens,
                                    max_seqlen=mb.max_seqlen, **mb.model_inputs)
    return hidden, weight.to(hidden.dtype)


def _shared_row(policy, mb: MicroBatch):
    """The micro-batch's shared-prompt layout (``fastgrpo.trainer.prefix``, computed once and
    kept on ``mb``) when the attention is ``sdpa_varlen`` and two sequences share a prompt."""
    from fastgrpo.trainer import prefix
    model = unwrap_model(policy)
    if getattr(model.config, "_attn_implementation", None) != "sdpa_varlen" or not prefix.enabled():
        return None
    if not hasattr(mb, "_shared_row"):
        mb._shared_row = prefix.share_prompts(mb, getattr(model.config, "text_config", model.config))
    return mb._shared_row


# ----------------------------------------------------------------------------- LoRA (peft)


def apply_lora(model: torch.nn.Module, *, r: int, alpha: float, target: str, dropout: float = 0.0):
    """``model`` (a HF causal LM) with LoRA adapters of rank ``r`` in the modules named in
    ``target`` (comma-separated last name components, e.g. ``"q_proj,v_proj"``): a peft
    ``PeftModelForCausalLM``.  Only the adapters train; every base weight, the lm_head
    included, is frozen.  The adapters are injected into ``model`` itself (no copy):
    ``unwrap_model(result) is model``, and ``result.disable_adapter()`` gives the base model.

    ``ConfigError`` (naming the value) when a name in ``target`` matches no module of ``model``.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError(f"--lora-r {r} needs peft: pip install 'fastgrpo[lora]'") from None
    names = [t.strip() for t in target.split(",") if t.strip()]
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}
    missing = [t for t in names if t not in present]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"invalid --lora-target {target!r}: no module named "
                          f"{', '.join(map(repr, missing))} in {type(model).__name__} "
                          f"(its linear layers: {', '.join(linear)})")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                        bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. a target of a type peft cannot adapt
        raise ConfigError(f"invalid --lora-target {target!r}: {e}") from None


def merged_lora_state_dict(peft_model, state_dict: dict | None = None) -> dict:
    """The plain model's state dict with each LoRA adapter merged into its base weight
    (``W + scaling * B @ A``, computed in float32): the keys and weights a model without
    adapters loads.  ``state_dict``: ``peft_model``'s own (default), or its gathered full
    state dict under FSDP2.  Leaves the model untouched."""
    from peft.tuners.lora import LoraLayer

    sd = dict(peft_model.state_dict() if state_dict is None else state_dict)
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for adapter in layer.active_adapters:
            a = sd[f"{name}.lora_A.{adapter}.weight"].float()
            b = sd[f"{name}.lora_B.{adapter}.weight"].float()
            delta = (b @ a) * layer.scaling[adapter]
            key = f"{name}.base_layer.weight"
            w = sd[key]
            sd[key] = (w.float() + (delta.T if layer.fan_in_fan_out else delta)).to(w.dtype)
    prefix = "base_model.model."
    return {k.removeprefix(prefix).replace(".base_layer.", "."): v
            for k, v in sd.items() if ".lora_" not in k}


def save_lora(peft_model, directory, state_dict: dict | None = None) -> None:
    """A LoRA run's final model: ``directory`` holds the *merged* full model (what
    ``--model`` and ``AutoModelForCausalLM.from_pretrained`` load) and ``directory/adapter``
    the adapter alone (peft's ``save_pretrained``: ``PeftModel.from_pretrained(base, ...)``).
    ``state_dict``: the gathered full state dict under FSDP2 (else the model's own)."""
    directory = Path(directory)
    unwrap_model(peft_model).save_pretrained(directory,
                                             state_dict=merged_lora_state_dict(peft_model, state_dict))
    peft_model.save_pretrained(directory / "adapter", save_embedding_layers=False,
                               **({} if state_dict is None else {"state_dict": state_dict}))
