"""A run's set-up before the first step: the device, the preset, the task, the model and its
wrapping, the optimizer (``setup_run``); claiming ``--out-dir``; resuming a checkpoint; the
preflight checks that would otherwise fail only after minutes of work."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import sys
from pathlib import Path
from typing import Callable

import torch

from fastgrpo.ops.logprobs import resolve_backend
from fastgrpo.tasks.data import DataError
from fastgrpo.trainer import distributed as dist_
from fastgrpo.trainer.attention import apply_attention, select_attention
from fastgrpo.trainer.checkpoint import (CHECKPOINT_DIR, CheckpointError, CheckpointMismatchError,
                                         load_checkpoint, resolve_resume)
from fastgrpo.trainer.config import ConfigError, TrainConfig, explicit_fields, report_targets
from fastgrpo.trainer.engines import make_engine, make_eval_engine
from fastgrpo.trainer.identity import identity_fields, run_identity
from fastgrpo.trainer.outdir import OutDirLock, check_fresh, check_writable
from fastgrpo.trainer.policy import apply_lora, load_model, wrap_model
from fastgrpo.trainer.presets import apply_preset, get_preset
from fastgrpo.trainer.prompting import resolve_layout, system_prompt
from fastgrpo.trainer.prompts import PromptOrder
from fastgrpo.trainer.state import RunState
from fastgrpo.trainer.task import load_task
from fastgrpo.trainer.vision import setup_vision

__all__ = ["setup_run", "load_run_model", "resume_run", "claim_out_dir", "preflight", "on_main", "run_device",
           "check_device", "apply_run_preset", "TOKENIZER_FILES"]


def run_device(cfg: TrainConfig, info: dist_.DistInfo) -> torch.device:
    if info.world_size > 1:
        if cfg.prompts_per_step < info.world_size:
            raise ConfigError(f"invalid --prompts-per-step {cfg.prompts_per_step}: must be >= the "
                              f"number of processes ({info.world_size}); each rank generates "
                              f"whole groups")
        return info.device
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def check_device(name: str) -> None:
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


def apply_run_preset(cfg: TrainConfig, main: bool, resolve_model: bool):
    """The preset's model and hyper-parameters, except what the user set explicitly."""
    preset = get_preset(cfg.preset)
    explicit = explicit_fields(cfg)
    for first in (True, False):  # rank 0 first: it may convert the model once, the others reuse it
        if main == first:
            cfg = apply_preset(cfg, cfg.preset, explicit=explicit, resolve_model=resolve_model)
        dist_.barrier()
    return cfg.validate(), preset


def setup_run(cfg: TrainConfig, model, tokenizer, info: dist_.DistInfo) -> RunState:
    device = run_device(cfg, info)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + info.rank)  # ranks sample different completions
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preset = None
    if cfg.preset:
        cfg, preset = apply_run_preset(cfg, info.is_main, resolve_model=model is None)
    task = load_task(cfg.task)
    cfg = task.configure(cfg)
    train_rows, eval_rows = task.load_data(cfg)
    if model is None:
        backend = select_attention(cfg.attn_implementation, device)
        model, tokenizer = load_run_model(cfg, device, backend, task.checkpoint)
    elif cfg.attn_implementation != "auto":
        apply_attention(model, select_attention(cfg.attn_implementation, device))
    model.to(device)
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
    layout = resolve_layout(cfg.layout, preset, vision is not None)  # r1vl | tags | free
    task.set_layout(layout)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    task.system_prompt = system_prompt(cfg, preset)  # --system-prompt, a preset's, chat rows
    encode = task.encode
    if info.is_main:  # the resolved options this run trains with (a preset's, a task's applied)
        (out_dir / "args.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    # greedy eval: rank 0 alone, except under FSDP2 where every rank runs it (forwards of
    # sharded modules must stay in step across ranks)
    fsdp = any(hasattr(m, "unshard") and hasattr(m, "reshard") for m in policy.modules())
    engine = make_engine(cfg, model, tokenizer, device, info.world_size)
    task.eval_engine = make_eval_engine(cfg, engine, model, tokenizer, device, info.world_size)
    r = RunState(cfg, info, device, out_dir, model, policy, ref_model, tokenizer, optimizer,
                 task.reward_set(cfg, layout), train_rows, eval_rows, encode,
                 PromptOrder(len(train_rows), cfg.seed), evaluator=info.is_main or fsdp,
                 engine=engine, vision=vision,
                 task=task)
    task.bind(r)
    return r


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "vocab.txt", "spiece.model")


def load_run_model(cfg: TrainConfig, device, backend, default=None):
    """``policy.load_model`` of ``--model`` (else ``default``, the task's shipped checkpoint); a
    model directory whose tokenizer cannot be loaded is a ``ConfigError`` naming the directory
    and the files looked for."""
    try:
        return load_model(cfg.model or default, device=device, attn_implementation=backend)
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


def resume_run(r: RunState) -> dict:
    """Restore the checkpoint ``--resume`` names (after every set-up step, so the restored RNG
    states are the next ones drawn); returns its extra state (``{}`` when starting fresh)."""
    cfg = r.cfg
    path = dist_.broadcast_object(resolve_resume(cfg.resume, r.out_dir) if r.main else None)
    if path is None:
        if cfg.resume == "auto":  # never start fresh over an earlier run's outputs
            on_main(r, lambda: check_fresh(r.out_dir, False, why=" but no valid checkpoint "
                                           f"under {r.out_dir / CHECKPOINT_DIR} to resume from",
                                           resumable=False))
            if r.main:
                print(f"--resume auto: no checkpoint under {r.out_dir / CHECKPOINT_DIR}; starting "
                      f"fresh", file=sys.stderr)
        return {}
    if Path(path).resolve().parent != (r.out_dir / CHECKPOINT_DIR).resolve():
        # another directory's checkpoint: this --out-dir must not hold a run of its own
        on_main(r, lambda: check_fresh(r.out_dir, False, why=f" (resuming from {path}, which "
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
    a, b = identity_fields(saved), identity_fields(now)
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


def on_main(r: RunState, check: Callable[[], None]) -> None:
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


def claim_out_dir(cfg: TrainConfig, info: dist_.DistInfo) -> OutDirLock | None:
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


def preflight(r: RunState) -> None:
    """Checks that would otherwise fail (or mislead) only after minutes of work: the kernel
    backend on this device, prompt lengths against the model's positions, the step's size."""
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
