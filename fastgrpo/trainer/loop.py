"""StepGRPO training loop: ``python -m fastgrpo.train [--flags]`` (``--help`` lists them all).

One step (:func:`_train`), as ``STEPGRPO.md`` describes the method::

    rollout      G samples for each of prompts_per_step prompts (each rank: whole groups)
    score        the reward set (StepRAR + StepRVR by default) on every sample
    advantages   group-normalised; groups without signal, truncated and empty samples dropped
    gather       every rank's kept samples and statistics (rank order = global order)
    pack         length-balanced first-fit-decreasing micro-batches, restarting position ids
    learn        backbone hidden states -> fused loss -> backward -> optimizer step (learn.py)
    log / evaluate / checkpoint

The pieces around it live in their own modules: the sample type (``sample.py``), generation
(``rollout.py``), packing, the learning step (``learn.py``), the policy model and its wrapping
for data parallelism (``policy.py``), collectives (``distributed.py``), checkpoints
(``checkpoint.py``) and logs (``logs.py``).

Robustness and scale (all off or automatic by default):

* ``--save-every N`` writes an atomic, verified checkpoint (weights, optimizer, RNG states, data
  position) to ``<out-dir>/checkpoints/step-N`` (``--keep-last`` of them are kept);
  ``--resume auto`` (or a directory) continues a killed run exactly where it stopped: the
  same LR schedule, data order and random numbers, metrics appended to ``metrics.jsonl``;
  checkpoints hold ``config.json`` and the tokenizer too, so each one loads as ``--model``.
* A NaN/inf loss or gradient norm stops the run before the optimizer step with an error naming
  the step (exit code 3); when the parameters are still finite, a checkpoint of the last
  completed step is written first (its ``extra["stopped"]`` says why).
* ``torchrun --nproc-per-node K -m fastgrpo.train ...``: data parallel (DDP on CPU/gloo, FSDP2
  on CUDA; ``--dp-strategy``).  Each rank generates whole prompt groups; the kept samples are
  gathered and length-balanced over the ranks; the loss is normalised over the global batch,
  so K processes compute the same update as one process given the same rollouts.
* ``--task routing`` (``tasks.py``): R1-Router's Step-GRPO -- offline step states, or with
  ``--rollout-mode online`` multi-turn rollouts against the knowledge bases (``multiturn.py``);
  the task supplies the data, rewards and held-out eval and may replace the rollout, score and
  advantage stages (one hook call at the top of each).
* ``--attn-implementation`` picks the packed-row attention backend; ``--preset`` loads a named
  model + hyper-parameter set (``fastgrpo.trainer.presets``), explicit options still win.

Defaults: the shipped warm-up checkpoint (``fastgrpo/tasks/assets/warmup``) on the built-in
arithmetic task; runs on a 2-core CPU in a few minutes and prints held-out greedy accuracy and
validity before and after.  ``--task charts``: the shipped tiny Qwen2-VL chart warm-up
(``fastgrpo/tasks/assets/charts_warmup``) with ``fastgrpo.tasks.charts.CHARTS_TRAIN_DEFAULTS``
for the options not given explicitly.  Outputs in ``--out-dir``: ``metrics.jsonl`` (one strict JSON line
per step, NaN/inf as null; stdout gets a short human line under ``--no-progress``),
``samples.jsonl``, ``curves.png``, ``summary.json`` and ``model/``.

The run owns ``--out-dir`` (``outdir.py``: a pid lock file; a fresh run refuses an earlier
run's outputs unless ``--overwrite``); a resume must match the checkpoint's run identity
(``run_identity``, or ``--resume-force``); SIGINT/SIGTERM keep the promise their message
makes in each phase (``_Signals``): set-up and the initial eval stop at once without training,
a step finishes and is checkpointed, a periodic eval stops and its step is checkpointed, the
final eval stops after the model is saved; exit 130/143 (a second signal exits at once).  The
finish (``_finish``) goes in order of importance: ``model/`` written like a checkpoint
(temporary directory, verified, renamed), the final eval, ``summary.json``, the plot, the
report; a failure of the last three is a warning.  A failed write (disk full) is a
``diskio.WriteError``: ``error:`` naming the file and the bytes it needed, the newest
checkpoint and the ``--resume`` command, exit 2.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from fastgrpo.ops.advantages import constant_groups, group_advantages
from fastgrpo.rewards import (RewardError, RewardResult, RewardSet, default_reward_set,
                              load_reward_function, reward_set_from_spec)
from fastgrpo.rewards.free import FREE, free_reward_set
from fastgrpo.tasks.arithmetic import make_splits
from fastgrpo.tasks.data import DataError, load_jsonl
from fastgrpo.tasks.tokenizer import encode_prompt
from fastgrpo.trainer import distributed as dist_
from fastgrpo.trainer.attention import AttentionBackendError, apply_attention, select_attention
from fastgrpo.trainer.checkpoint import (CHECKPOINT_DIR, CheckpointError, CheckpointMismatchError,
                                         NonFiniteLossError, capture_rng_state, find_latest_valid,
                                         load_checkpoint, params_are_finite, resolve_resume,
                                         save_checkpoint)
from fastgrpo.trainer.config import (ConfigError, TrainConfig, explicit_fields, parse_args,
                                     report_targets)
from fastgrpo.trainer.diskio import (WriteError, check_safetensors, tensor_bytes, write_directory,
                                     write_file, writing)
from fastgrpo.trainer.learn import NO_UPDATE_METRICS, batch_logprobs, lr_at, optimize
from fastgrpo.trainer.logs import Progress, RunLog, json_safe, peak_memory_mb
from fastgrpo.trainer.outdir import OutDirLock, check_fresh, check_writable
from fastgrpo.trainer.packing import MicroBatch, balance_microbatches, pack_bins
from fastgrpo.trainer.policy import apply_lora, gather_for_generation, load_model, save_lora, wrap_model
from fastgrpo.trainer.prompts import PromptOrder
from fastgrpo.trainer.requirements import check_dependencies
from fastgrpo.trainer.rollout import Rollout, generate
from fastgrpo.trainer.engines import make_engine
from fastgrpo.trainer.sample import Sample
from fastgrpo.trainer.tasks import Task, get_task

__all__ = ["main", "run", "optimize", "compute_advantages", "batch_logprobs", "evaluate",
           "build_reward_set", "load_data", "lr_at", "run_identity", "TrainingInterrupted"]

# options that may change between a run and its resume; every other field (and the seed among
# them) defines the run: its hash is the run identity a resume must match (run_identity)
_RUNTIME_FIELDS = {"resume", "out_dir", "save_every", "keep_last", "progress", "threads", "device",
                   "plot", "save", "sample_every", "eval_every", "eval_size", "gen_batch_size",
                   "micro_batch_tokens", "attn_implementation", "dp_strategy", "backend",
                   "resume_force", "overwrite", "report_to", "collapse_warn_steps"}


def _identity_fields(config: dict) -> dict:
    """The run-defining options of a config dict; one saved before an option existed counts
    as having had its default."""
    full = {**dataclasses.asdict(TrainConfig()), **config}
    return {k: v for k, v in full.items() if k not in _RUNTIME_FIELDS}


def run_identity(config: TrainConfig | dict) -> str:
    """A short hash of the options that define a run (all but ``_RUNTIME_FIELDS``)."""
    d = dataclasses.asdict(config) if isinstance(config, TrainConfig) else config
    blob = json.dumps(_identity_fields(d), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run after a completed step (``.exit_code``: 128 + signal)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# ----------------------------------------------------------------------------- data and rewards


def load_data(cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """Train and eval rows: JSONL files when given, else the built-in task's splits."""
    if cfg.task == "charts" and not (cfg.train_file or cfg.eval_file):
        from fastgrpo.tasks.charts import make_splits as chart_splits
        train, evals = chart_splits(0)  # images as PIL objects in each row's "image"
        return train, evals[:cfg.eval_size]
    if cfg.train_file or cfg.eval_file:
        cols = cfg.columns()
        train = load_jsonl(cfg.train_file, columns=cols) if cfg.train_file else make_splits(cfg.seed)[0]
        evals = load_jsonl(cfg.eval_file, columns=cols) if cfg.eval_file else []
    else:
        train, evals = make_splits(0)  # the warm-up model was trained on split seed 0
    return train, evals[:cfg.eval_size]


def build_reward_set(cfg: TrainConfig, layout=None) -> RewardSet:
    """The reward set: ``--rewards`` when given, else the default StepGRPO set (in ``layout``;
    default R1-VL ``### Step k:``), plus ``--reward module:function[=weight]`` extras.

    ``accuracy``, ``step_rvr`` and ``step_k`` are always computed (weight 0 when the set lacks
    them): the logs and the held-out evaluation read them, whatever the training reward."""
    if layout == FREE:  # no steps: accuracy (+ answer_found, logged), rewards/free.py
        default = free_reward_set()
        base = free_reward_set(cfg.rewards) if cfg.rewards else default
    else:
        default = default_reward_set() if layout is None else default_reward_set(layout=layout)
        base = reward_set_from_spec(cfg.rewards, layout) if cfg.rewards else default
    funcs, weights = dict(base.funcs), dict(base.weights)
    logged = ("accuracy", "answer_found") if layout == FREE else ("accuracy", "step_rvr", "step_k")
    for name in logged:  # always computed: the logs and the held-out eval read them
        if name not in funcs:
            funcs[name], weights[name] = default.funcs[name], 0.0
    for spec in cfg.reward:
        target, _, w = spec.partition("=")
        fn = load_reward_function(target)
        name = target.split(":")[-1]
        while name in funcs:
            name += "_"
        funcs[name], weights[name] = fn, float(w) if w else 1.0
    return RewardSet(funcs, weights)


def _columns(rows: list[dict], index: list[int]) -> dict:
    """Every dataset column but the prompt, one value per sample (as TRL passes them); a row
    without a column gets None there ("not applicable" to the reward functions)."""
    names = dict.fromkeys(k for i in index for k in rows[i]
                          if k not in ("prompt", "prompts", "completions"))
    return {k: [rows[i].get(k) for i in index] for k in names}


def compute_advantages(rewards: list[float], group_size: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-completion advantages and a keep mask (False for groups whose rewards are all
    equal when ``cfg.drop_zero_std_groups``: their advantages are exactly 0)."""
    r = torch.tensor(rewards, dtype=torch.float32)
    adv = group_advantages(r, group_size=group_size, scale=cfg.scale_rewards)
    keep = torch.ones(len(rewards), dtype=torch.bool)
    if cfg.drop_zero_std_groups:
        keep = ~constant_groups(r, group_size=group_size)
    return adv, keep


def evaluate(model, tokenizer, rows: list[dict], reward_set: RewardSet, cfg: TrainConfig,
             encode=None, vision=None) -> dict:
    """Greedy held-out accuracy and layout validity (the reward set's accuracy / step_rvr).
    ``encode(tokenizer, prompt) -> ids`` (default ``tasks.tokenizer.encode_prompt``);
    ``vision``: the run's ``trainer.vision.VisionRun`` (the rows' images in the prompts)."""
    if not rows:
        return {"accuracy": math.nan, "validity": math.nan}
    encode = encode or encode_prompt
    vkw = {}
    if vision is not None:
        prompts, vkw = vision.generate_kwargs(rows, encode, "eval")
    else:
        prompts = [encode(tokenizer, r["prompt"]) for r in rows]
    ro = generate(model, tokenizer, prompts, group_size=1, do_sample=False,
                  max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size,
                  stop=cfg.stop, **vkw)
    res = reward_set([r["prompt"] for r in rows], ro.texts, **_columns(rows, list(range(len(rows)))))
    stats = res.stats()
    valid = stats.get("step_rvr") or stats["answer_found"]  # the free layout: an answer was found
    return {"accuracy": stats["accuracy"]["mean"], "validity": valid["mean"]}


# ----------------------------------------------------------------------------- one run's state


@dataclass
class _Run:
    """Everything a run holds between steps."""
    cfg: TrainConfig
    info: dist_.DistInfo
    device: torch.device
    out_dir: Path
    model: torch.nn.Module                 # the plain causal LM, or its peft model (LoRA)
    policy: torch.nn.Module                # the same, wrapped for data parallelism
    ref_model: torch.nn.Module | None
    tokenizer: object
    optimizer: torch.optim.Optimizer
    reward_set: RewardSet
    train_rows: list[dict]
    eval_rows: list[dict]
    encode: Callable
    prompts: PromptOrder
    evaluator: bool                        # runs the greedy evals (rank 0; every rank under FSDP2)
    start: int = 0                         # completed steps at the start (resume)
    before: dict | None = None             # held-out eval of the initial model
    t_start: float = 0.0
    prompt_cache: dict = field(default_factory=dict)
    run_id: str = ""                       # the run identity its checkpoints record
    engine: object = None                  # the rollout engine (engines.py)
    vision: object = None                  # vision-language hooks (trainer/vision.py), or None
    task: Task = field(default_factory=Task)  # --task: data, rewards, eval, stage hooks (tasks.py)

    @property
    def main(self) -> bool:
        return self.info.is_main

    def prompt_ids(self, i: int) -> list[int]:
        if i not in self.prompt_cache:
            if self.vision is not None:  # image tokens expanded; pixel values in prompt_inputs
                self.prompt_cache[i] = self.vision.encode(self.train_rows[i], self.encode,
                                                          f"train row {i + 1}")[0]
            else:
                self.prompt_cache[i] = self.encode(self.tokenizer, self.train_rows[i]["prompt"])
        return self.prompt_cache[i]

    def evaluate(self) -> dict:
        with gather_for_generation(self.policy):
            if not self.evaluator:
                return {}
            return self.task.evaluate(self.model, self.tokenizer, self.eval_rows, self.reward_set,
                                      self.cfg, self.encode, self.vision)

    def checkpoint(self, done: int, data_state: dict, rng_states: list[dict], **more) -> Path | None:
        extra = {"data": data_state, "config": dataclasses.asdict(self.cfg),
                 "eval_before": self.before, "seconds": time.perf_counter() - self.t_start, **more}
        extra["run_id"] = run_id = self.run_id or run_identity(self.cfg)
        saved = save_checkpoint(self.out_dir, done, self.model, self.optimizer, None, extra=extra,
                                keep_last=self.cfg.keep_last, rng_states=rng_states,
                                write=self.main, trainable_only=self.cfg.lora_r > 0, run_id=run_id,
                                save_extra=self._save_model_files)
        dist_.barrier()
        return saved

    def _save_model_files(self, directory: Path) -> None:
        """config.json (+ generation config) and the tokenizer: a checkpoint is a --model."""
        self.model.config.save_pretrained(directory)
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.vision is not None:
            self.vision.save(directory)


def _device(cfg: TrainConfig, info: dist_.DistInfo) -> torch.device:
    if info.world_size > 1:
        if cfg.prompts_per_step < info.world_size:
            raise ConfigError(f"invalid --prompts-per-step {cfg.prompts_per_step}: must be >= the "
                              f"number of processes ({info.world_size}); each rank generates "
                              f"whole groups")
        return info.device
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _check_device(name: str) -> None:
    """``--device`` names hardware this process has (before anything touches it)."""
    if name == "auto":
        return
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"invalid --device {name!r}: CUDA is not available (torch "
                          f"{torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"invalid --device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"invalid --device {name!r}: MPS is not available")


def _apply_preset(cfg: TrainConfig, main: bool, resolve_model: bool):
    """The preset's model and hyper-parameters, except what the user set explicitly."""
    from fastgrpo.trainer.presets import apply_preset, get_preset
    preset = get_preset(cfg.preset)
    explicit = explicit_fields(cfg)
    for first in (True, False):  # rank 0 first: it may convert the model once, the others reuse it
        if main == first:
            cfg = apply_preset(cfg, cfg.preset, explicit=explicit, resolve_model=resolve_model)
        dist_.barrier()
    return cfg.validate(), preset


def _setup(cfg: TrainConfig, model, tokenizer, info: dist_.DistInfo) -> _Run:
    device = _device(cfg, info)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + info.rank)  # ranks sample different completions
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preset = None
    if cfg.preset:
        cfg, preset = _apply_preset(cfg, info.is_main, resolve_model=model is None)
    task = get_task(cfg)
    cfg = task.configure(cfg)
    train_rows, eval_rows = task.load_data(cfg)
    if model is None:
        backend = select_attention(cfg.attn_implementation, device)
        model, tokenizer = _load_model(cfg, device, backend)
    elif cfg.attn_implementation != "auto":
        apply_attention(model, select_attention(cfg.attn_implementation, device))
    model.to(device)
    from fastgrpo.trainer.vision import setup_vision
    vision = setup_vision(cfg, model, tokenizer, train_rows, eval_rows, device=device)  # None: text-only
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.config.use_cache = True  # generation still uses the KV cache
    if cfg.lora_r:  # model: the peft model; only its adapters train
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, target=cfg.lora_target,
                           dropout=cfg.lora_dropout)
    ref_model = None  # the KL reference: a frozen copy of the initial model, or (LoRA) the
    if cfg.beta > 0:  # peft model: learn.optimize disables its adapters (no copy)
        ref_model = model if cfg.lora_r else copy.deepcopy(model).eval().requires_grad_(False)
    policy = wrap_model(model, device, strategy=cfg.dp_strategy)
    from fastgrpo.trainer.prompting import make_encoder, resolve_layout, system_prompt
    layout = resolve_layout(cfg.layout, preset, vision is not None)  # r1vl | tags | free
    if layout == FREE and task.name != "routing":
        task.metric_aliases = {**task.metric_aliases, "validity": "answer_found"}
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    encode = make_encoder(system_prompt(cfg, preset))  # --system-prompt, a preset's, chat rows
    if info.is_main:  # the resolved options this run trains with (a preset's, a task's applied)
        (out_dir / "args.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    # greedy eval: rank 0 alone, except under FSDP2 where every rank runs it (forwards of
    # sharded modules must stay in step across ranks)
    fsdp = any(hasattr(m, "unshard") and hasattr(m, "reshard") for m in policy.modules())
    r = _Run(cfg, info, device, out_dir, model, policy, ref_model, tokenizer, optimizer,
             task.reward_set(cfg, layout), train_rows, eval_rows, encode,
             PromptOrder(len(train_rows), cfg.seed), evaluator=info.is_main or fsdp,
             engine=make_engine(cfg, model, tokenizer, device, info.world_size), vision=vision,
             task=task)
    task.bind(r)
    return r


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "vocab.txt", "spiece.model")


def _load_model(cfg: TrainConfig, device, backend):
    """``policy.load_model``; a model directory whose tokenizer cannot be loaded is a
    ``ConfigError`` naming the directory and the files looked for."""
    try:
        return load_model(cfg.model or None, device=device, attn_implementation=backend)
    except (ValueError, OSError, TypeError, KeyError) as e:
        if isinstance(e, FileNotFoundError) or not cfg.model:
            raise
        from transformers import AutoTokenizer
        try:
            AutoTokenizer.from_pretrained(cfg.model)
        except Exception as te:  # noqa: BLE001 - any failure of the tokenizer is the diagnosis
            found = [n for n in TOKENIZER_FILES if (Path(cfg.model) / n).is_file()]
            raise ConfigError(
                f"--model {cfg.model}: its tokenizer cannot be loaded ({type(te).__name__}: "
                f"{str(te).splitlines()[0][:200] if str(te) else ''}); looked for "
                f"{', '.join(TOKENIZER_FILES)} and found "
                f"{', '.join(found) if found else 'none of them'}. Copy the tokenizer files of "
                f"the model it was trained from into that directory") from None
        raise


def _resume(r: _Run) -> dict:
    """Restore the checkpoint ``--resume`` names (after every set-up step, so the restored RNG
    states are the next ones drawn); returns its extra state (``{}`` when starting fresh)."""
    cfg = r.cfg
    path = dist_.broadcast_object(resolve_resume(cfg.resume, r.out_dir) if r.main else None)
    if path is None:
        if cfg.resume == "auto":  # never start fresh over an earlier run's outputs
            _on_main(r, lambda: check_fresh(r.out_dir, False, why=" but no valid checkpoint "
                                            f"under {r.out_dir / CHECKPOINT_DIR} to resume from",
                                            resumable=False))
            if r.main:
                print(f"--resume auto: no checkpoint under {r.out_dir / CHECKPOINT_DIR}; starting "
                      f"fresh", file=sys.stderr)
        return {}
    if Path(path).resolve().parent != (r.out_dir / CHECKPOINT_DIR).resolve():
        # another directory's checkpoint: this --out-dir must not hold a run of its own
        _on_main(r, lambda: check_fresh(r.out_dir, False, why=f" (resuming from {path}, which "
                                        f"lies elsewhere)"))
    try:
        extra = load_checkpoint(path, r.model, r.optimizer, None, rank=r.info.rank)
    except CheckpointMismatchError as e:
        theirs = (e.extra.get("config") or {}).get("model") or "the built-in model"
        raise CheckpointError(
            f"{e}. It was written by a run with --model {theirs!r}; this run has --model "
            f"{cfg.model or 'the built-in model'!r}. No option (--resume-force neither) continues "
            f"a checkpoint with a model of other shapes: resume with that run's --model, or start "
            f"fresh without --resume") from None
    data = extra.get("data")
    if not isinstance(data, dict) or "rng" not in data or "order" not in data:
        raise CheckpointError(f"checkpoint {path} holds no data position (not written by "
                              f"fastgrpo.train); cannot resume from it")
    saved, now = extra.get("config") or {}, dataclasses.asdict(cfg)
    saved_id = extra.get("run_id") or run_identity(saved)
    a, b = _identity_fields(saved), _identity_fields(now)
    diff = ", ".join(f"--{k.replace('_', '-')} {a[k]!r} -> {b[k]!r}" for k in sorted(b) if a[k] != b[k])
    if diff:
        msg = (f"checkpoint {path} is of another run (identity {saved_id}, this run's is "
               f"{run_identity(now)}): {diff}")
        if not cfg.resume_force:
            raise CheckpointError(msg + "; resume with that run's options, or pass --resume-force "
                                        "to continue it under these")
        if r.main:
            print(f"warning: {msg}; continuing under the new options (--resume-force)", file=sys.stderr)
    else:
        r.run_id = saved_id  # the same run (a saved config may predate an option): keep its id
    r.prompts.load_state_dict(data)
    r.start, r.before = int(extra["step"]), extra.get("eval_before")
    if r.main:
        print(f"resuming from checkpoint {path} (step {r.start} of {cfg.steps})", file=sys.stderr)
        if extra.get("stopped"):
            print(f"note: that run stopped after it: {extra['stopped']}", file=sys.stderr)
    return extra


def _on_main(r: _Run, check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0; its ConfigError is raised on every rank (none waits forever)."""
    error = None
    if r.main:
        try:
            check()
        except ConfigError as e:
            error = str(e)
    error = dist_.broadcast_object(error)
    if error is not None:
        raise ConfigError(error)


def _claim_out_dir(cfg: TrainConfig, info: dist_.DistInfo) -> OutDirLock | None:
    """Rank 0 makes --out-dir its own before any work: every output path writable, the lock
    taken, and (not resuming) no earlier run's outputs left, or --overwrite deleted them."""
    lock, error = None, None
    if info.is_main:
        try:
            dirs = ["model"] * cfg.save + [CHECKPOINT_DIR] + [
                {"tensorboard": "tb", "wandb": "wandb"}[t] for t in report_targets(cfg.report_to)]
            check_writable(cfg.out_dir, dirs=dirs)
            lock = OutDirLock(cfg.out_dir).acquire()
            if not cfg.resume:
                check_fresh(cfg.out_dir, cfg.overwrite)
        except ConfigError as e:
            error = str(e)
            if lock is not None:
                lock.release()
    error = dist_.broadcast_object(error)
    if error is not None:
        raise ConfigError(error)
    return lock


def _preflight(r: _Run) -> None:
    """Checks that would otherwise fail (or mislead) only after minutes of work: the kernel
    backend on this device, prompt lengths against the model's positions, the step's size."""
    from fastgrpo.ops.logprobs import resolve_backend
    cfg = r.cfg
    try:
        resolve_backend(cfg.backend, r.device)
    except RuntimeError as e:
        raise ConfigError(f"invalid --backend {cfg.backend!r} on device {r.device}: {e}") from None
    limit = getattr(getattr(r.model, "config", None), "max_position_embeddings", None)
    if limit:
        near = []
        for what, rows, file in (("train", r.train_rows, cfg.train_file), ("eval", r.eval_rows, cfg.eval_file)):
            for i, row in enumerate(rows):
                ids = r.prompt_ids(i) if what == "train" else r.encode(r.tokenizer, row["prompt"])
                where = f"{what} row {i + 1}" + (f" of {file}" if file else "")
                if len(ids) >= limit:
                    raise DataError(f"{where}: the prompt has {len(ids)} tokens; the model takes "
                                    f"at most {limit} positions (max_position_embeddings)")
                if len(ids) + cfg.max_new_tokens > limit:
                    near.append(where)
        if near and r.main:
            print(f"warning: {len(near)} prompt(s) leave less than --max-new-tokens "
                  f"{cfg.max_new_tokens} positions of the model's {limit} (first: {near[0]}); "
                  f"their completions are cut short", file=sys.stderr)
    if cfg.prompts_per_step > len(r.train_rows) and r.main:
        print(f"warning: --prompts-per-step {cfg.prompts_per_step} is more than the "
              f"{len(r.train_rows)} training rows: each step repeats rows", file=sys.stderr)


# ----------------------------------------------------------------------------- the step's stages


def _rollout(r: _Run, step: int) -> Rollout:
    """G samples for each of this step's prompts from the rollout engine (``--rollout``); this
    rank generates whole groups only."""
    if r.task.rollout is not None:  # e.g. multi-turn tool rollouts (--rollout-mode online)
        return r.task.rollout(r, step)
    cfg = r.cfg
    idx = r.prompts.take(cfg.prompts_per_step)
    mine = [idx[g] for g in dist_.groups_for_rank(len(idx), r.info.rank, r.info.world_size)]
    error = None
    with gather_for_generation(r.policy):
        try:
            r.engine.wake()
            r.engine.sync_weights(r.model)  # the weights after the last optimizer step
            vkw = {} if r.vision is None else r.vision.generate_kwargs(
                [r.train_rows[i] for i in mine], r.encode)[1]
            ro = r.engine.generate([r.prompt_ids(i) for i in mine], group_size=cfg.group_size,
                                   max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                   top_p=cfg.top_p, do_sample=True, **_sampling(cfg), **vkw)
            r.engine.sleep()
        except RuntimeError as e:  # torch.multinomial on NaN/inf probabilities
            if "probability tensor contains" not in str(e):
                raise
            error = str(e)
    if dist_.is_distributed():  # every rank stops together
        error = next((x for x in dist_.all_gather_objects(error) if x), None)
    if error is not None:
        raise NonFiniteLossError(
            f"non-finite logits while sampling the rollouts of step {step + 1} ({error}): the "
            f"parameters after step {step} already diverge; the run stops here. Resume from an "
            f"earlier checkpoint (--resume DIR) with a lower --lr or --grad-clip.", step=step + 1)
    for s in ro.samples:
        s.row = mine[s.group]
    return ro


def _sampling(cfg: TrainConfig) -> dict:
    """The sampling options besides temperature / top-p (only those set: every engine takes
    the defaults)."""
    out = {"top_k": cfg.top_k, "min_p": cfg.min_p, "repetition_penalty": cfg.repetition_penalty,
           "stop": cfg.stop}
    off = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "stop": []}
    return {k: v for k, v in out.items() if v != off[k]}


def _importance_weights(r: _Run, batches: list[MicroBatch], kept: list[Sample]) -> dict:
    """``--rollout-is``: truncated importance weights on the engine's log-probs (in the
    batches' advantages) and the log-prob mismatch metrics; ``{}`` when off."""
    on = {"on": True, "off": False}.get(r.cfg.rollout_is, r.engine.name != "hf")
    if not on or not batches or any(s.sampling_logp is None for s in kept):
        return {}
    from fastgrpo.trainer.correction import apply_tis
    return apply_tis(batches, kept, batch_logprobs(r.policy, batches, r.cfg), r.cfg.rollout_is_cap)


def _score(r: _Run, samples: list[Sample]) -> RewardResult:
    """The reward set on every sample (local: groups are whole)."""
    if r.task.score is not None:
        return r.task.score(r, samples)
    rows = [s.row for s in samples]
    res = r.reward_set([r.train_rows[i]["prompt"] for i in rows], [s.text for s in samples],
                       **_columns(r.train_rows, rows))
    for s, total in zip(samples, res.total):
        s.reward = total
    return res


def _advantages(r: _Run, samples: list[Sample], rewards: list[float]) -> list[Sample]:
    """Group advantages; returns the samples that enter the loss."""
    if r.task.advantages is not None:  # e.g. per-step rewards -> per-token advantages
        return r.task.advantages(r, samples, rewards)
    adv, keep = compute_advantages(rewards, r.cfg.group_size, r.cfg)
    for s, a in zip(samples, adv.tolist()):
        s.advantage = a
    if r.cfg.mask_truncated:
        keep &= ~torch.tensor([s.truncated for s in samples], dtype=torch.bool)
    keep &= torch.tensor([len(s.completion_ids) > 0 for s in samples], dtype=torch.bool)
    return [samples[i] for i in keep.nonzero().flatten().tolist()]


@dataclass
class _Gathered:
    """The global batch: every rank's kept samples and the statistics of all samples."""
    kept: list[Sample]
    rewards: RewardResult
    lengths: list[int]
    truncated: list[bool]
    gen_tokens: int
    gen_seconds: float


def _gather(kept: list[Sample], ro: Rollout, res: RewardResult) -> _Gathered:
    parts = dist_.all_gather_objects({
        "kept": kept, "total": res.total, "per_function": res.per_function,
        "lens": [len(s.completion_ids) for s in ro.samples],
        "truncated": [s.truncated for s in ro.samples],
        "gen_tokens": ro.generated_tokens, "gen_seconds": ro.seconds})
    flat = lambda key: [x for p in parts for x in p[key]]  # noqa: E731
    rewards = RewardResult(flat("total"), {k: [x for p in parts for x in p["per_function"][k]]
                                           for k in res.per_function}, res.weights)
    return _Gathered(flat("kept"), rewards, flat("lens"), flat("truncated"),
                     sum(p["gen_tokens"] for p in parts), max(p["gen_seconds"] for p in parts))


def _pack(r: _Run, samples: list[Sample]) -> list[MicroBatch]:
    """This rank's micro-batches of the length-balanced plan for the global batch."""
    if not samples:
        return []
    tok = r.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    plan = balance_microbatches([s.num_tokens for s in samples], r.cfg.micro_batch_tokens,
                                r.info.world_size)
    batches = pack_bins(plan[r.info.rank], samples, pad_token_id=pad)
    if r.vision is not None:  # pixel values in sequence order, per-sequence mrope positions
        r.vision.attach(batches, samples, r.model)
    return [mb.to(r.device) for mb in batches]


def _learn(r: _Run, batches: list[MicroBatch], step: int, at_start: dict) -> dict:
    """One optimizer step on the batch; a non-finite loss writes an emergency checkpoint of the
    last completed step (when the parameters are still finite) and stops the run."""
    if not batches:  # every group had equal rewards: nothing to learn from this batch
        return dict(NO_UPDATE_METRICS)
    try:
        return optimize(r.policy, r.optimizer, batches, r.cfg, r.ref_model, step=step + 1)
    except NonFiniteLossError as e:
        e.step = step + 1
        ok = step > 0 and not getattr(e, "params_updated", False)
        ok = ok and dist_.global_sum(0.0 if params_are_finite(r.model) else 1.0) == 0
        if ok:
            saved = r.checkpoint(step, at_start["data"], dist_.all_gather_objects(at_start["rng"]),
                                 stopped=str(e))
            if r.main:
                print(f"saved the last completed step ({step}) to {saved} before stopping",
                      file=sys.stderr)
        elif r.main:
            print("no checkpoint written for the failed step (the parameters were already "
                  "changed or are not finite); resume from the last periodic checkpoint",
                  file=sys.stderr)
        raise


def _step_metrics(r: _Run, step: int, g: _Gathered, lm: dict, batches: list[MicroBatch],
                  train_seconds: float) -> dict:
    """The step's line of ``metrics.jsonl``."""
    rew = torch.tensor(g.rewards.total)
    m = {"step": step + 1, "lr": lr_at(step, r.cfg),
         "reward/mean": float(rew.mean()), "reward/std": float(rew.std()) if len(rew) > 1 else 0.0}
    for name, s in g.rewards.stats().items():
        m[f"rewards/{name}/mean"] = s["mean"] if s["count"] else 0.0
        m[f"rewards/{name}/std"] = s["std"] if s["count"] > 1 else 0.0
    for key, name in r.task.metric_aliases.items():  # accuracy, step_k, validity (arithmetic)
        m[key] = m.get(f"rewards/{name}/mean", 0.0)
    train_tokens = sum(s.num_tokens for s in g.kept) * r.cfg.ppo_epochs
    m.update({
        "kl": lm["kl"], "clip_ratio/low": lm["clip_ratio/low_mean"],
        "clip_ratio/high": lm["clip_ratio/high_mean"], "clip_ratio/region": lm["clip_ratio/region_mean"],
        "entropy": lm["entropy"], "ratio/min": lm["ratio/min"], "ratio/mean": lm["ratio/mean"],
        "ratio/max": lm["ratio/max"], "loss": lm["loss"], "grad_norm": lm["grad_norm"],
        "completion_len/mean": sum(g.lengths) / len(g.lengths), "completion_len/max": max(g.lengths),
        "truncated_frac": sum(g.truncated) / len(g.truncated),
        "kept_frac": len(g.kept) / len(g.rewards.total), "micro_batches": len(batches),
        "gen_tokens_per_s": g.gen_tokens / max(g.gen_seconds, 1e-9),
        "train_tokens_per_s": train_tokens / max(train_seconds, 1e-9),
        "gen_seconds": g.gen_seconds, "train_seconds": train_seconds,
        "peak_mem_mb": peak_memory_mb(r.device),
    })
    return m


# ----------------------------------------------------------------------------- the loop


def _train(r: _Run, signals: "_Signals") -> dict:
    cfg = r.cfg
    with signals.phase("stopping the set-up; the run ends before training (nothing is "
                       "trained or written)", interrupt=True):
        extra = _resume(r)
    if r.before is None:
        with signals.phase("stopping the initial evaluation; the run ends before training "
                           "(nothing is trained or written)", interrupt=True):
            r.before = r.evaluate()
        if r.main:
            print(f"eval before: {r.task.eval_line(r.before)}", file=sys.stderr)
    log = RunLog(r.out_dir, r.start, r.main, total=cfg.steps, report_to=cfg.report_to,
                 stdout=not cfg.progress, config=dataclasses.asdict(cfg))
    progress = Progress(cfg.steps, cfg.progress and r.main, initial=r.start)
    r.t_start = time.perf_counter() - float(extra.get("seconds", 0.0))
    exit_code = 1  # a failure, a signal or a second signal's SystemExit: the loggers say failed
    try:
        _loop(r, log, progress, signals)
        exit_code = 0
    except TrainingInterrupted as e:
        exit_code = e.exit_code
        raise
    finally:
        progress.close()
        try:
            log.close(exit_code)
        except Exception as e:  # noqa: BLE001 - a logger must not decide the run's fate
            if exit_code != 0:
                raise
            _warn_piece("the loggers (closing metrics.jsonl / --report-to)", e, r)
    return _finish(r, log.history, signals)


class _StopPhase(BaseException):
    """Raised by the signal handler to end an interruptible phase (set-up, an evaluation) at
    once; a BaseException, so no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """SIGINT/SIGTERM handling for the whole run: the first signal prints what the current
    phase (``phase``) will do, and either ends that phase at once (``interrupt=True``: set-up,
    evaluations, by raising ``_StopPhase``) or lets it finish (a training step: the loop then
    checkpoints and stops; writing the model: the run then exits); a second signal exits at
    once (SystemExit 128 + signal)."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}
        self.message = "stopping after the current step (with a checkpoint)"
        self.interrupt = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    @contextlib.contextmanager
    def phase(self, message: str, interrupt: bool = False):
        """Within: a first signal prints ``message`` (and, ``interrupt``, ends the phase)."""
        before = self.message, self.interrupt
        self.message, self.interrupt = message, interrupt
        try:
            if interrupt and self.signum is not None:  # signalled before the phase began
                raise _StopPhase(self.signum)
            yield
        finally:
            self.message, self.interrupt = before

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"\n{name} again: exiting now, without a checkpoint of the current step",
                  file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        self.signum = signum
        print(f"\n{name}: {self.message}; send it again to exit at once", file=sys.stderr,
              flush=True)
        if self.interrupt:
            self.interrupt = False  # raised once
            raise _StopPhase(signum)

    def stop_requested(self) -> int | None:
        """The signal that stops the run (every rank agrees), or None."""
        if not dist_.is_distributed():
            return self.signum
        got = dist_.all_gather_objects(self.signum)
        return next((x for x in got if x is not None), None)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _loop(r: _Run, log: RunLog, progress: Progress, signals: _Signals) -> None:
    cfg = r.cfg
    collapsed: list[int] = []  # the current run of steps whose every group had equal rewards
    for step in range(r.start, cfg.steps):
        # what a checkpoint of `step` completed steps holds (written if this step fails)
        at_start = {"data": r.prompts.state_dict(), "rng": capture_rng_state()}
        for group in r.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        ro = _rollout(r, step)
        res = _score(r, ro.samples)
        kept = _advantages(r, ro.samples, res.total)
        g = _gather(kept, ro, res)
        t_train = time.perf_counter()
        batches = _pack(r, g.kept)
        tis = _importance_weights(r, batches, g.kept)
        lm = _learn(r, batches, step, at_start)
        m = {**_step_metrics(r, step, g, lm, batches, time.perf_counter() - t_train), **tis}
        collapsed = _watch_collapse(r, progress, g, step, collapsed)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            _evaluate_during(r, m, progress, step, signals)
        log.metrics(m)
        if r.main and cfg.sample_every and ((step + 1) % cfg.sample_every == 0 or step == r.start):
            _log_sample(r, log, progress, step, ro.samples[0])  # rank 0 generated the first group
        progress.update(step, f"reward {m['reward/mean']:.3f} acc {m['accuracy']:.2f}")
        saved = None
        if cfg.save_every and (step + 1) % cfg.save_every == 0:  # every rank: collective
            saved = r.checkpoint(step + 1, r.prompts.state_dict(), dist_.gather_rng_states())
        _stop_if_signalled(r, signals, step, saved)


def _watch_collapse(r: _Run, progress: Progress, g: _Gathered, step: int,
                    collapsed: list[int]) -> list[int]:
    """Warn once ``--collapse-warn-steps`` steps in a row had no group with signal; returns
    the current run of such steps."""
    cfg = r.cfg
    equal = bool(constant_groups(torch.tensor(g.rewards.total), group_size=cfg.group_size).all())
    collapsed = collapsed + [step + 1] if equal else []
    if r.main and cfg.collapse_warn_steps and len(collapsed) == cfg.collapse_warn_steps:
        progress.write(f"warning: steps {collapsed[0]}-{collapsed[-1]}: every group's "
                       f"completions got equal rewards, so nothing was trained (zero "
                       f"advantages); check the reward functions, the data and --temperature")
    return collapsed


def _evaluate_during(r: _Run, m: dict, progress: Progress, step: int, signals: _Signals) -> None:
    try:
        with signals.phase(f"stopping this evaluation; step {step + 1} is checkpointed, then the "
                           f"run exits", interrupt=True):
            ev = r.evaluate()
    except _StopPhase:
        if r.main:
            progress.write(f"step {step + 1}: evaluation stopped")
        return
    if r.main:
        m.update({f"eval/{k}": v for k, v in ev.items() if isinstance(v, float)})
        progress.write(f"step {step + 1}: eval {r.task.eval_line(ev)}")


def _stop_if_signalled(r: _Run, signals: _Signals, step: int, saved: Path | None) -> None:
    """After the first SIGINT/SIGTERM: a checkpoint of this step (unless just written), then
    ``TrainingInterrupted`` (exit 130/143 from the CLI)."""
    signum = signals.stop_requested()
    if signum is None:
        return
    if saved is None:
        saved = r.checkpoint(step + 1, r.prompts.state_dict(), dist_.gather_rng_states())
    raise TrainingInterrupted(
        f"{signal.Signals(signum).name}: stopped after step {step + 1} of {r.cfg.steps}; "
        f"checkpoint {saved}. Resume with the same command plus --resume auto "
        f"(or --resume {saved})", signum)


def _log_sample(r: _Run, log: RunLog, progress: Progress, step: int, s: Sample) -> None:
    prompt = r.train_rows[s.row]["prompt"]
    log.sample({"step": step + 1, "prompt": prompt, "completion": s.text, "reward": s.reward})
    progress.write(f"--- sample at step {step + 1} (reward {s.reward:.2f})\n{prompt}\n{s.text}\n---")


def _full_state_dict(model) -> dict | None:
    """FSDP2 (DTensor parameters): the gathered full state dict (a collective); else None."""
    if not any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _warn_piece(piece: str, e: BaseException, r: _Run) -> None:
    """A failed optional piece of the run's finish: a warning naming it, never a lost run."""
    saved = r.out_dir / "model"
    safe = f"; the trained model is in {saved}" if r.cfg.save and saved.is_dir() else ""
    print(f"warning: could not write {piece} ({type(e).__name__}: {e}){safe}", file=sys.stderr)


def _verify_model_dir(directory: Path) -> None:
    """A written model directory is complete: config.json parses, every safetensors file holds
    the data its header announces, and there are weights (else ``WriteError``)."""
    for f in [directory / "config.json", *sorted(directory.rglob("*.safetensors"))]:
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            else:
                check_safetensors(f)
        except (OSError, ValueError) as e:
            raise WriteError(f, None, e) from None
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("pytorch_model*.bin")):
        raise WriteError(directory / "model.safetensors", None, ValueError("no weights written"))


def _save_model(r: _Run, full_sd: dict | None) -> Path:
    """``<out>/model``: the trained model, its tokenizer (and image processor) written like a
    checkpoint: into a temporary directory, verified, renamed, so it is complete or absent."""
    cfg = r.cfg
    needed = tensor_bytes(full_sd if full_sd is not None else r.model.state_dict())

    def fill(tmp: Path) -> None:
        with writing(tmp / "model.safetensors", needed):
            if cfg.lora_r:  # the merged full model, and the adapter alone in model/adapter
                save_lora(r.model, tmp, full_sd)
            else:
                r.model.save_pretrained(tmp, **({} if full_sd is None else {"state_dict": full_sd}))
        with writing(tmp):
            r.tokenizer.save_pretrained(tmp)
            (tmp / "args.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
            if r.vision is not None:
                r.vision.save(tmp)

    return write_directory(r.out_dir / "model", fill, _verify_model_dir)


def _finish(r: _Run, history: list[dict], signals: _Signals) -> dict:
    """The run's finish, in order of importance: the trained model (written and verified),
    the held-out eval after training, ``summary.json``, the plot and the report.  A failure
    of the last three is a warning naming it; a signal during the eval ends it (the model is
    saved by then) and the run exits 128 + signal after writing the summary."""
    cfg, before = r.cfg, r.before
    model_dir = r.out_dir / "model"
    full_sd = _full_state_dict(r.model) if cfg.save else None  # FSDP2: collective
    error = None
    with signals.phase(f"writing the trained model to {model_dir} first; the run exits after "
                       f"it, without the final evaluation"):
        if r.main and cfg.save:
            try:
                _save_model(r, full_sd)
            except WriteError as e:
                error = e
    if dist_.broadcast_object(error is not None):
        if error is not None:
            raise error
        raise CheckpointError("rank 0 could not write the trained model (its message says why)")
    del full_sd
    stopped = signals.stop_requested()
    after = None
    if stopped is None:
        kept = (f"the trained model is already in {model_dir}" if cfg.save else
                "nothing is saved (--no-save)")
        try:
            with signals.phase(f"stopping the final evaluation ({kept}); summary.json is "
                               f"written without eval_after, then the run exits", interrupt=True):
                after = r.evaluate()
        except _StopPhase as e:
            stopped = e.signum
        if dist_.is_distributed():
            stopped = next((x for x in dist_.all_gather_objects(stopped) if x is not None), None)
    if not r.main:
        if stopped is not None:
            raise TrainingInterrupted("stopped by a signal during the final evaluation", stopped)
        return {}
    summary = {"eval_before": before, "eval_after": after, "steps": cfg.steps,
               "seconds": round(time.perf_counter() - r.t_start, 1),
               "last": history[-1] if history else {}}
    if r.start > 0:
        summary["resumed_from_step"] = r.start
    notes = []
    if stopped is not None:
        notes.append(f"eval_after is null: {signal.Signals(stopped).name} ended the run before "
                     f"its final evaluation finished")
    elif not r.eval_rows:
        notes.append("eval_before and eval_after are null: no held-out rows (a --train-file "
                     "without --eval-file has none)")
    safe = json_safe(summary)
    if json.dumps(safe) != json.dumps(summary, allow_nan=True):
        notes.append("null stands for a value that is not a finite number (NaN/inf), e.g. a "
                     "mean over no samples")
    if notes:
        safe["notes"] = notes
    try:
        write_file(r.out_dir / "summary.json", json.dumps(safe, indent=2, allow_nan=False).encode())
    except Exception as e:  # noqa: BLE001 - the model is saved: the summary must not undo that
        _warn_piece("summary.json", e, r)
    if cfg.plot and history:
        try:
            from fastgrpo.trainer.plot import plot_curves
            plot_curves(history, before, after, r.out_dir / "curves.png")
        except Exception as e:  # noqa: BLE001 - a plot is decoration
            _warn_piece("the curves plot (curves.png)", e, r)
    if stopped is not None:
        raise TrainingInterrupted(
            f"{signal.Signals(stopped).name}: stopped before the final evaluation finished, after "
            f"training all {cfg.steps} steps; " + (f"the trained model is in {model_dir}" if
                                                    cfg.save else "nothing saved (--no-save)"),
            stopped)
    try:
        print(f"{r.task.report(before, after, len(r.eval_rows))}\n"
              f"({summary['seconds']} s, outputs in {r.out_dir})")
    except Exception as e:  # noqa: BLE001
        _warn_piece("the final report", e, r)
    return summary


def _resume_hint(cfg: TrainConfig) -> str:
    """What is left after a failed write: the newest valid checkpoint and how to resume it."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        latest = find_latest_valid(cfg.out_dir)
    if latest is None:
        return ("The partial file was removed. No checkpoint was written before it (--save-every "
                "N writes them): free some space, then run again with --overwrite")
    step = int(latest.name.split("-")[-1])
    return (f"The partial file was removed; the newest checkpoint {latest} (step {step}) is "
            f"untouched: free some space (or give another --out-dir), then run the same command "
            f"plus --resume {latest}")


def run(cfg: TrainConfig, model=None, tokenizer=None) -> dict:
    """Train; returns the summary (eval before/after and the last step's metrics).

    Under ``torchrun`` every rank calls this; rank 0 evaluates, logs and writes the outputs
    (other ranks return ``{}``)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    _check_device(cfg.device)
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info = dist_.init_distributed(device=None if cfg.device == "auto" else cfg.device)
    lock = r = None
    try:
        check_dependencies(cfg)
        with _Signals() as signals:  # the whole run: set-up, the evals before and after included
            try:
                with signals.phase("stopping the set-up; the run ends before training (nothing "
                                   "is trained or written)", interrupt=True):
                    lock = _claim_out_dir(cfg, info)
                    r = _setup(cfg, model, tokenizer, info)
                    _preflight(r)
                return _train(r, signals)
            except _StopPhase as e:
                raise TrainingInterrupted(
                    f"{signal.Signals(e.signum).name}: stopped before training; nothing was "
                    f"trained or written (run the same command again to start)", e.signum) from None
    except WriteError as e:
        if info.is_main:
            e.hint = _resume_hint(cfg)
        raise
    finally:
        if r is not None:
            r.task.close()
        if lock is not None:
            lock.release()
        if owns_group:
            dist_.cleanup_distributed()


def main(argv: list[str] | None = None) -> None:
    """CLI entry point.  Exit codes: 2 for configuration/data/checkpoint/reward errors and failed
    writes (disk full: the message names the file and the checkpoint to resume from), 3 when
    the loss or gradient norm became NaN/inf (the message names the step), 130/143 when
    SIGINT/SIGTERM stopped the run (after a checkpoint; the message says how to resume)."""
    try:
        run(parse_args(argv))
    except (ConfigError, DataError, FileNotFoundError, CheckpointError, AttentionBackendError,
            RewardError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(3)
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code)
