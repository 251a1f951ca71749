"""Rollout engines (``--rollout hf|vllm|auto``): who samples the G completions of each prompt.

Every engine returns a :class:`~fastgrpo.trainer.rollout.Rollout` of
:class:`~fastgrpo.trainer.sample.Sample` (token ids exactly as generated, grouped by prompt) and
fills ``Sample.sampling_logp`` with its own log-probs of the sampled tokens, at the sampling
temperature.  The trainer calls, around each step's rollout::

    engine.wake()                 # CUDA vLLM: weights and KV cache back on the GPU
    engine.sync_weights(model)    # the trainer's current weights (after each optimizer step)
    engine.generate(...)
    engine.sleep()                # CUDA vLLM: free the GPU memory for training

* ``hf``: :func:`fastgrpo.trainer.rollout.generate` on the trainer's own model (shared prompt
  prefill, finished rows leave the batch); nothing to sync.
* ``vllm``: vLLM's offline ``LLM`` in this process, weights pushed from the trainer's model in
  memory (``load_weights``, no disk round-trip).  ``pip install -e ".[vllm]"``.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time

import torch

from fastgrpo.trainer import rollout as _rollout
from fastgrpo.trainer import vllm_vl

__all__ = ["ENGINES", "HFEngine", "VLLMEngine", "select_engine", "make_engine"]

ENGINES = ("hf", "vllm", "auto")


class HFEngine:
    """The trainer's own transformers model (nothing to sync: it is the same module)."""

    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 128):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def generate(self, prompt_ids, *, group_size, max_new_tokens, temperature=1.0, top_p=1.0,
                 do_sample=True, rows=None, prompt_inputs=None, vision=None, **sampling):
        """``sampling``: top_k, min_p, repetition_penalty, stop (``rollout.generate``)."""
        return _rollout.generate(self.model, self.tokenizer, prompt_ids, group_size=group_size,
                                 max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, do_sample=do_sample, batch_size=self.batch_size,
                                 rows=rows, prompt_inputs=prompt_inputs, vision=vision, **sampling)

    def sync_weights(self, model) -> None:
        self.model = model

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass


def _vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def select_engine(name: str, device) -> str:
    """``auto``: vLLM on CUDA when it is installed, else ``hf``."""
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; choose one of {', '.join(ENGINES)}")
    if name == "auto":
        return "vllm" if torch.device(device).type == "cuda" and _vllm_available() else "hf"
    return name


class VLLMEngine:
    """vLLM's offline ``LLM`` in this process, built from the trainer's model (config and
    tokenizer written once to a temporary directory; the weights always come from memory)."""

    name = "vllm"

    def __init__(self, model, tokenizer, *, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.3, seed: int = 0, sleep_mode: bool | None = None,
                 vision=None, max_images: int = 1):
        """``vision``: a VL model's ``fastgrpo.vl.VisionAdapter`` (``trainer.vllm_vl``);
        ``max_images`` per prompt."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model in this process
        self.tokenizer, self.vision = tokenizer, vision
        extra = {}
        if vision is not None:
            extra = vllm_vl.llm_kwargs(vision, max_images)
        from vllm import LLM

        cuda = next(model.parameters()).device.type == "cuda"
        self.sleep_mode = cuda if sleep_mode is None else sleep_mode
        self._dir = tempfile.TemporaryDirectory(prefix="fastgrpo-vllm-")
        model.config.save_pretrained(self._dir.name)   # config + tokenizer only: no weights
        tokenizer.save_pretrained(self._dir.name)
        if vision is not None:
            vllm_vl.setup_engine_dir(self._dir.name, vision, model)
        text = getattr(model.config, "text_config", model.config)
        self.llm = LLM(model=self._dir.name, tokenizer=self._dir.name, load_format="dummy",
                       dtype="bfloat16" if cuda else "float32", seed=seed,
                       max_model_len=max_model_len or text.max_position_embeddings,
                       gpu_memory_utilization=gpu_memory_utilization,
                       enable_sleep_mode=self.sleep_mode, logprobs_mode="processed_logprobs",
                       enable_prefix_caching=True, **extra)
        self.vocab_size = int(text.vocab_size)
        self.asleep = False
        self.sync_weights(model)

    def sync_weights(self, model) -> None:
        """Push the trainer's weights into vLLM's model (in memory, in place)."""
        weights = [(n, p.detach()) for n, p in model.state_dict().items()]
        # the worker's in-place reload (it redoes the post-load weight processing, e.g. the CPU
        # backend's packed linear layers); the engine core is in this process: no copy
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        if getattr(self, "vision", None) is not None:
            vllm_vl.reset_encoder_cache(self.llm)   # and cached image features

    def sleep(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)   # weights too: sync_weights reloads them after wake()
            self.asleep = True

    def wake(self) -> None:
        if self.sleep_mode and self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(self, prompt_ids, *, group_size, max_new_tokens, temperature=1.0, top_p=1.0,
                 do_sample=True, rows=None, top_k=0, min_p=0.0, repetition_penalty=1.0, stop=(),
                 prompt_inputs=None, vision=None, images=None):
        """``top_k``, ``min_p``, ``repetition_penalty`` map onto vLLM's SamplingParams of the same
        names; ``stop`` strings onto ``stop`` with the string kept (as the hf engine).
        Vision-language prompts: ``images[i]`` (PIL) of prompt i (``trainer.vllm_vl``)."""
        from vllm import SamplingParams, TokensPrompt

        mm = self.vision is not None and images is not None
        if prompt_inputs is not None and any(prompt_inputs) and not mm:
            raise ValueError("vision-language prompts need the engine built with vision= and "
                             "the prompts' images")

        stop = list(stop or [])
        params = SamplingParams(n=group_size, temperature=temperature if do_sample else 0.0,
                                top_p=top_p if do_sample else 1.0,
                                top_k=(top_k or -1) if do_sample else 1, min_p=min_p,
                                repetition_penalty=repetition_penalty,
                                max_tokens=max_new_tokens, logprobs=0, detokenize=bool(stop),
                                stop=stop or None, include_stop_str_in_output=True,
                                stop_token_ids=[self.tokenizer.eos_token_id], ignore_eos=False,
                                allowed_token_ids=vllm_vl.allowed_token_ids(self.vision, self.vocab_size)
                                if mm else None)
        t0 = time.perf_counter()
        prompts = vllm_vl.vllm_prompts(prompt_ids, images, self.vision) if mm else \
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        if mm:
            vllm_vl.check_prompt_ids(outs, prompt_ids)
        comps, logps = [], []
        for o in outs:  # in prompt order; o.outputs: the n samples
            for c in sorted(o.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                comps.append(ids)
                logps.append([float(lp[t].logprob) for t, lp in zip(ids, c.logprobs)])
        ro = _rollout.make_samples(self.tokenizer, prompt_ids, group_size, comps, logps, rows,
                                   seconds, stop)
        if prompt_inputs is not None:
            for s in ro.samples:
                s.prompt_inputs = prompt_inputs[s.group]
        return ro


def make_engine(cfg, model, tokenizer, device, world_size: int = 1, vision=None):
    """The engine ``cfg.rollout`` names (``auto`` resolved for ``device``); ``vision``: the
    run's ``trainer.vision.VisionRun`` (a VL model)."""
    from fastgrpo.trainer.config import ConfigError

    try:
        name = select_engine(cfg.rollout, device)
    except ValueError as e:
        raise ConfigError(f"invalid --rollout {cfg.rollout!r}: {e}") from None
    if cfg.rollout_is not in ("auto", "on", "off"):
        raise ConfigError(f"invalid --rollout-is {cfg.rollout_is!r}: choose one of auto, on, off")
    if not cfg.rollout_is_cap >= 1:
        raise ConfigError(f"invalid --rollout-is-cap {cfg.rollout_is_cap!r}: must be >= 1")
    if name == "hf":
        return HFEngine(model, tokenizer, batch_size=cfg.gen_batch_size)
    if not _vllm_available():
        raise ConfigError("--rollout vllm: vLLM is not installed (pip install -e '.[vllm]'; "
                          "README, Rollouts)")
    if world_size > 1:
        raise ConfigError("--rollout vllm runs in one process; under torchrun use --rollout hf")
    vl = {} if vision is None else {"vision": vision.adapter, "max_images": vision.max_images}
    return VLLMEngine(model, tokenizer, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                      seed=cfg.seed, **vl)
