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
  memory (``load_weights``, no disk round-trip).  ``pip install -e ".[vllm]"``.  Under
  ``torchrun`` each rank runs its own engine on its own prompts (colocated, as TRL's
  ``vllm_mode="colocate"``): vLLM's ``external_launcher`` executor joins the trainer's process
  group instead of starting a world of its own, with tensor parallel size 1 (the other ranks
  are vLLM's data-parallel peers, which never talk during generation); seeds differ per rank.

Sampling log-probs (both engines): each token's log-prob under the policy's distribution at the
sampling temperature, *before* top-k / top-p / min-p / repetition penalty, i.e. the distribution
the trainer's loss computes, so that the truncated-IS ratio is 1 on-policy whatever the
truncation.  vLLM 0.32's ``logprobs_mode`` offers the raw logits (before temperature) or the
processed ones (after top-k/top-p: renormalised over the nucleus, biased by log of its mass), so
:func:`_policy_logprobs` hooks vLLM's sampler to record ``log_softmax(logits / T)`` of the raw
logits instead.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time

import torch

from fastgrpo.trainer import rollout as _rollout
from fastgrpo.trainer import vllm_vl

__all__ = ["ENGINES", "HFEngine", "VLLMEngine", "select_engine", "make_engine", "make_eval_engine",
           "close_engines"]

ENGINES = ("hf", "vllm", "auto")
CPU_KV_CACHE_BYTES = 1 << 30  # vLLM's KV cache per engine on CPU


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

    def close(self) -> None:
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


def _policy_logprobs(worker) -> None:
    """Make the worker's vLLM sampler return, for each sampled token, its log-prob under
    ``log_softmax(raw logits / temperature)`` (greedy rows: temperature 1): the policy's
    distribution before penalties, min-p, top-k and top-p (the engine samples from the truncated
    one as before).  Run on the worker (``collective_rpc``); with ``logprobs_mode=
    "processed_logprobs"`` the sampler's ``sample`` returns the log-probs the outputs carry."""
    sampler = worker.model_runner.sampler
    apply, sample, box = sampler.apply_logits_processors, sampler.sample, {}

    def apply_logits_processors(logits, md, *args, **kwargs):
        box["lp"] = None
        if md.max_num_logprobs is not None:
            if md.temperature is None:  # all greedy: temperature 1
                box["lp"] = logits.float().log_softmax(-1)
            else:  # vLLM's greedy rows (temperature < eps) at temperature 1
                t = torch.where(md.temperature < 1e-5, 1.0, md.temperature).float()
                box["lp"] = (logits.float() / t[:, None]).log_softmax(-1)
        return apply(logits, md, *args, **kwargs)

    def sample_(logits, md, *args, **kwargs):
        sampled, lp = sample(logits, md, *args, **kwargs)
        return sampled, lp if box.get("lp") is None else box.pop("lp")

    sampler.apply_logits_processors, sampler.sample = apply_logits_processors, sample_


def _full(t: torch.Tensor) -> torch.Tensor:
    """A parameter as one whole tensor: FSDP2's sharded DTensors all-gathered (collective: every
    rank syncs at the same point), plain tensors as they are."""
    full = getattr(t, "full_tensor", None)
    return (full() if full is not None else t).detach()


class VLLMEngine:
    """vLLM's offline ``LLM`` in this process, built from the trainer's model (config and
    tokenizer written once to a temporary directory; the weights always come from memory).

    ``world_size > 1`` (``torchrun``; the default process group already initialised by the
    trainer): colocated, one engine per rank on vLLM's ``external_launcher`` executor (TRL's
    ``vllm_mode="colocate"``).  On CPU (tests, development) the KV cache takes
    ``CPU_KV_CACHE_BYTES`` (1 GiB) per engine."""

    name = "vllm"

    def __init__(self, model, tokenizer, *, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.3, seed: int = 0, sleep_mode: bool | None = None,
                 world_size: int = 1, vision=None, max_images: int = 1):
        """``vision``: a VL model's ``fastgrpo.vl.VisionAdapter`` (``trainer.vllm_vl``);
        ``max_images`` per prompt."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model in this process
        self.tokenizer, self.vision = tokenizer, vision
        kw = {} if vision is None else vllm_vl.llm_kwargs(vision, max_images)
        from vllm import LLM

        self.world_size = world_size
        cuda = next(model.parameters()).device.type == "cuda"
        self.sleep_mode = cuda if sleep_mode is None else sleep_mode
        self._dir = tempfile.TemporaryDirectory(prefix="fastgrpo-vllm-")
        model.config.save_pretrained(self._dir.name)   # config + tokenizer only: no weights
        tokenizer.save_pretrained(self._dir.name)
        if vision is not None:
            vllm_vl.setup_engine_dir(self._dir.name, vision, model)
        text = getattr(model.config, "text_config", model.config)
        if world_size > 1:  # torchrun: vLLM joins the trainer's process group (RANK, MASTER_*)
            kw["distributed_executor_backend"] = "external_launcher"
        if not cuda:  # vLLM would reserve gpu_memory_utilization x the node's RAM (and refuse to
            # start where less is free: a shared machine, several ranks); VLLM_CPU_KVCACHE_SPACE
            # (GiB) overrides
            kw["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        self.llm = LLM(model=self._dir.name, tokenizer=self._dir.name, load_format="dummy",
                       dtype="bfloat16" if cuda else "float32", seed=seed,
                       max_model_len=max_model_len or text.max_position_embeddings,
                       gpu_memory_utilization=gpu_memory_utilization,
                       enable_sleep_mode=self.sleep_mode, logprobs_mode="processed_logprobs",
                       enable_prefix_caching=True, **kw)
        # a VL model's completions never hold image tokens (computed once: the whole vocabulary)
        self.allowed = None if vision is None else vllm_vl.allowed_token_ids(vision, int(text.vocab_size))
        self.llm.collective_rpc(_policy_logprobs)
        self.asleep = False
        self.sync_weights(model)

    def sync_weights(self, model) -> None:
        """Push the trainer's weights into vLLM's model (in memory, in place); FSDP2's sharded
        parameters are gathered whole first (every rank calls this at the same point)."""
        weights = [(n, _full(p)) for n, p in model.state_dict().items()]
        # the worker's in-place reload (it redoes the post-load weight processing, e.g. the CPU
        # backend's packed linear layers); the engine core is in this process: no copy
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        if self.vision is not None:
            vllm_vl.reset_encoder_cache(self.llm)   # and cached image features

    def sleep(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)   # weights too: sync_weights reloads them after wake()
            self.asleep = True

    def wake(self) -> None:
        if self.sleep_mode and self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Shut the engine down (before the trainer destroys its process group).  Under
        ``torchrun`` vLLM's own groups go, the trainer's default group stays: vLLM's shutdown
        would destroy it too (and, left to run at exit, fails after the trainer destroyed it)."""
        if self.llm is None:
            return
        import vllm.distributed.parallel_state as ps

        keep = ps.destroy_distributed_environment

        def drop_world():  # destroy_distributed_environment but for the default group
            if ps._WORLD:
                ps._WORLD.destroy()
            ps._WORLD = ps._NODE_COUNT = None

        if self.world_size > 1:
            ps.destroy_distributed_environment = drop_world
        try:
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            ps.destroy_distributed_environment = keep
            self.llm = None

    def generate(self, prompt_ids, *, group_size, max_new_tokens, temperature=1.0, top_p=1.0,
                 do_sample=True, rows=None, top_k=0, min_p=0.0, repetition_penalty=1.0, stop=(),
                 prompt_inputs=None, vision=None, images=None):
        """``top_k``, ``min_p``, ``repetition_penalty`` map onto vLLM's SamplingParams of the same
        names; ``stop`` strings onto ``stop`` with the string kept (as the hf engine).  Greedy
        decoding ignores the first three (as the hf engine).  Vision-language prompts:
        ``images[i]`` (PIL) of prompt i (``trainer.vllm_vl``)."""
        from vllm import SamplingParams, TokensPrompt

        mm = self.vision is not None and images is not None
        if prompt_inputs is not None and any(prompt_inputs) and not mm:
            raise ValueError("vision-language prompts need the engine built with vision= and "
                             "the prompts' images")

        stop = list(stop or [])
        if not do_sample:
            min_p, repetition_penalty = 0.0, 1.0
        params = SamplingParams(n=group_size, temperature=temperature if do_sample else 0.0,
                                top_p=top_p if do_sample else 1.0,
                                top_k=(top_k or -1) if do_sample else 1, min_p=min_p,
                                repetition_penalty=repetition_penalty,
                                max_tokens=max_new_tokens, logprobs=0, detokenize=bool(stop),
                                stop=stop or None, include_stop_str_in_output=True,
                                stop_token_ids=[self.tokenizer.eos_token_id], ignore_eos=False,
                                allowed_token_ids=self.allowed if mm else None)
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
    return _build(name, "--rollout", cfg, model, tokenizer, world_size, vision)


def make_eval_engine(cfg, engine, model, tokenizer, device, world_size: int = 1, vision=None):
    """``--eval-rollout``: the engine of the held-out greedy evals (``engine``, the training
    one, unless another is named)."""
    from fastgrpo.trainer.config import ConfigError

    if not cfg.eval_rollout:
        return engine
    try:
        name = select_engine(cfg.eval_rollout, device)
    except ValueError as e:
        raise ConfigError(f"invalid --eval-rollout {cfg.eval_rollout!r}: {e}") from None
    return engine if name == engine.name else _build(name, "--eval-rollout", cfg, model, tokenizer,
                                                     world_size, vision)


def _build(name: str, option: str, cfg, model, tokenizer, world_size: int, vision=None):
    from fastgrpo.trainer.config import ConfigError

    if name == "hf":
        return HFEngine(model, tokenizer, batch_size=cfg.gen_batch_size)
    if not _vllm_available():
        raise ConfigError(f"{option} vllm: vLLM is not installed (pip install -e '.[vllm]'; "
                          "README, Rollouts)")
    rank = int(os.environ.get("RANK", "0"))
    vl = {} if vision is None else {"vision": vision.adapter, "max_images": vision.max_images}
    return VLLMEngine(model, tokenizer, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                      seed=cfg.seed + rank, world_size=world_size, **vl)  # ranks sample differently


def close_engines(*engines) -> None:
    """Close each distinct engine once (the training and the eval engine may be one)."""
    for e in {id(e): e for e in engines if e is not None}.values():
        e.close()
