"""Warm-up (supervised fine-tuning) shared by the tasks: ``python -m fastgrpo.sft --task NAME``.

:func:`sft_sequences` trains completion tokens only, through the same packed, lm_head-free path
as the RL trainer (backbone hidden states -> fused log-probs); :func:`check_args` checks the
options every task's warm-up shares; :func:`main` hands the command line to the task's
``warmup`` (``fastgrpo.trainer.task.Task``).  The arithmetic task's warm-up (the default) is
``fastgrpo.tasks.arithmetic.warmup``.
"""

from __future__ import annotations

import argparse
import math
import random
import sys

import torch

from fastgrpo.hf import backbone_hidden_states, lm_head_weight
from fastgrpo.ops.logprobs import fused_logprobs
from fastgrpo.trainer.config import ConfigError
from fastgrpo.trainer.packing import pack_sequences
from fastgrpo.trainer.task import load_task

__all__ = ["sft_sequences", "warmup_parser", "check_args", "main"]


def sft_sequences(model, prompts: list[list[int]], comps: list[list[int]], *, steps: int,
                  loss_masks: list[list[bool] | None] | None = None, batch_size: int = 32,
                  lr: float = 3e-3, warmup: int = 10, seed: int = 0, micro_batch_tokens: int = 768,
                  log_every: int = 20, log=print) -> list[float]:
    """Completion-only SFT on token ids; ``loss_masks[i]`` (one bool per completion token)
    leaves tokens the model is not to learn (tool outputs) out of the loss."""
    rng = random.Random(seed)
    order: list[int] = []
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) *
                                              (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    weight = lm_head_weight(model)
    model.train()
    losses = []
    for step in range(steps):
        if len(order) < batch_size:
            more = list(range(len(prompts)))
            rng.shuffle(more)
            order += more
        idx, order = order[:batch_size], order[batch_size:]
        batches = pack_sequences([prompts[i] for i in idx], [comps[i] for i in idx], None,
                                 max_tokens=micro_batch_tokens,
                                 loss_masks=None if loss_masks is None else [loss_masks[i] for i in idx])
        n_tok = sum(mb.num_loss_tokens for mb in batches)
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for mb in batches:  # token-mean over the whole batch, accumulated per micro-batch
            hidden = backbone_hidden_states(model, mb.input_ids, position_ids=mb.position_ids,
                                            cu_seqlens=mb.cu_seqlens, max_seqlen=mb.max_seqlen)[0]
            logp = fused_logprobs(hidden, weight, mb.targets)
            mb_loss = -(logp * (mb.targets != -100)).sum() / n_tok
            mb_loss.backward()
            loss += mb_loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"sft step {step:4d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}")
    return losses


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
