"""Warm-up (supervised fine-tuning) shared by the tasks: ``python -m fastgrpo.sft --task NAME``.

:func:`warmup_parser` and :func:`check_args`: the options every task's warm-up shares;
``sft_sequences`` / ``sft_step`` (``trainer.supervised``) train completion tokens only through
the RL trainer's packed, lm_head-free path; :func:`main` hands the command line to the task's
``warmup`` (``fastgrpo.trainer.task.Task``), or with ``--model`` / ``--train-file`` to a user's
SFT (``trainer.user_sft``).  The arithmetic task's warm-up (the default) is
``fastgrpo.tasks.arithmetic.warmup``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fastgrpo.trainer.config import ConfigError
from fastgrpo.trainer.supervised import sft_sequences, sft_step
from fastgrpo.trainer.task import load_task
from fastgrpo.trainer.user_sft import main as user_main

__all__ = ["sft_sequences", "sft_step", "warmup_parser", "check_args", "save_warmup", "main"]


def warmup_parser(prog: str, description: str, *, task: str, steps: int, batch_size: int,
                  eval_size: int, eval_help: str, seed_help: str = "seed for data, init and order",
                  threads_help: str = "torch CPU threads (0 keeps torch's default)") -> argparse.ArgumentParser:
    """The command line every task's warm-up shares (``--out``, the model's size, the optimizer,
    the held-out eval); a task adds its own options and checks them with :func:`check_args`."""
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--task", default=task, help="the task to warm up (fastgrpo.tasks.NAME or module.path:TASK)")
    ap.add_argument("--out", required=True, help="output directory (model + tokenizer)")
    ap.add_argument("--seed", type=int, default=0, help=seed_help)
    ap.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=batch_size, help="sequences per step")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    ap.add_argument("--hidden-size", type=int, default=128, help="model width")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--eval-size", type=int, default=eval_size, help=eval_help)
    ap.add_argument("--threads", type=int, default=1, help=threads_help)
    return ap


def save_warmup(out, model, *others) -> Path:
    """Write the warmed-up ``model`` and ``others`` (its tokenizer, image processor) to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for o in others:
        o.save_pretrained(out)
    print(f"saved to {out}", file=sys.stderr)
    return out


def check_args(ap: argparse.ArgumentParser, args) -> None:
    """The warm-up options every task's SFT shares: sizes >= 1, counts >= 0, a positive lr
    (``ap.error``: exit code 2 naming the option)."""
    for name in ("steps", "batch_size", "hidden_size", "layers", "heads"):
        if getattr(args, name) < 1:
            ap.error(f"invalid --{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    for name in ("eval_size", "threads"):
        if getattr(args, name) < 0:
            ap.error(f"invalid --{name.replace('_', '-')} {getattr(args, name)}: must be >= 0")
    if not (math.isfinite(args.lr) and args.lr > 0):
        ap.error(f"invalid --lr {args.lr}: must be a finite number > 0")


def main(argv: list[str] | None = None) -> None:
    """``python -m fastgrpo.sft --task NAME ...``: the task's warm-up (default arithmetic)."""
    args_in = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default="arithmetic")
    known, _ = pre.parse_known_args(args_in)
    if any(a.split("=")[0] in ("--model", "--train-file") for a in args_in):
        return user_main(args_in)  # a user's model and data (trainer.user_sft)
    try:
        task = load_task(known.task)
        if task.warmup is None:
            raise ConfigError(f"invalid --task {known.task!r}: the task has no warm-up recipe")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    return task.warmup(args_in)


if __name__ == "__main__":
    main()
