"""Warm-up stage: supervised fine-tuning on the reference step-by-step solutions.

Trains a freshly initialised tiny Llama (``fastgrpo.tasks.tiny_model.tiny_config``) with the built-in
task's tokenizer on ``prompt -> solution</s>``, loss on the completion tokens only, through the
same packed, lm_head-free path as the RL trainer (backbone hidden states -> fused log-probs).
The warm-up data is imperfect on purpose, the way real SFT data is: with probability
``--skip-double-prob`` (default 0.6) a solution ignores the story's "the number of X doubles"
sentence (``fastgrpo.tasks.arithmetic.warmup_solution``), so the warm-up model learns the layout but also
the habit of skipping that step; it also still makes arithmetic mistakes, so on the task's 3-
and 4-step problems its final answers are rarely right (8% held-out, greedy) while single steps
often are.  StepGRPO's step-wise rewards (each right step, the layout) give signal where the
outcome reward gives none, which is what the default ``python -m fastgrpo.train`` run and
``python -m fastgrpo.experiments ablation`` show on held-out problems.

The shipped checkpoint ``fastgrpo/tasks/assets/warmup/`` was built with exactly::

    python -m fastgrpo.sft --out fastgrpo/tasks/assets/warmup

(the defaults below: seed 0, 2000 train problems, 500 steps of 32 sequences, lr 3e-3,
skip-double probability 0.6; 258 s in the loop on one CPU thread, with a second job on the
other core, 2026-12-06).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from fastgrpo.hf import backbone_hidden_states, lm_head_weight
from fastgrpo.ops.logprobs import fused_logprobs
from fastgrpo.tasks.arithmetic import MAX_NEW_TOKENS, answer_correct, make_splits, warmup_solution
from fastgrpo.tasks.tiny_model import build_tiny_model
from fastgrpo.tasks.tokenizer import build_tokenizer, encode_prompt
from fastgrpo.trainer.packing import pack_sequences
from fastgrpo.trainer.rollout import generate

__all__ = ["sft", "sft_step", "greedy_accuracy", "main"]


def _encode_rows(tokenizer, rows, skip_double_prob: float = 0.0, seed: int = 0):
    eos = tokenizer.eos_token
    rng = random.Random(seed + 1)
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in rows]
    comps = [tokenizer(warmup_solution(r, rng, skip_double_prob) + eos,
                       add_special_tokens=False)["input_ids"] for r in rows]
    return prompts, comps


def sft(model, tokenizer, rows, *, steps: int, batch_size: int = 32, lr: float = 3e-3,
        warmup: int = 10, seed: int = 0, micro_batch_tokens: int = 768, log_every: int = 20, log=print,
        skip_double_prob: float = 0.0) -> list[float]:
    """Completion-only SFT; returns the loss of every step.  ``skip_double_prob``: see
    ``fastgrpo.tasks.arithmetic.warmup_solution`` (each training row's target is drawn once)."""
    prompts, comps = _encode_rows(tokenizer, rows, skip_double_prob, seed)
    return sft_sequences(model, prompts, comps, steps=steps, batch_size=batch_size, lr=lr,
                         warmup=warmup, seed=seed, micro_batch_tokens=micro_batch_tokens,
                         log_every=log_every, log=log)


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
        loss = sft_step(model, weight, opt, [prompts[i] for i in idx], [comps[i] for i in idx],
                        micro_batch_tokens,
                        None if loss_masks is None else [loss_masks[i] for i in idx])
        sched.step()
        losses.append(loss)
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"sft step {step:4d}  loss {loss:.4f}  lr {sched.get_last_lr()[0]:.2e}")
    return losses


def sft_step(model, weight, opt, prompts: list[list[int]], comps: list[list[int]],
             micro_batch_tokens: int, loss_masks=None, grad_clip: float = 1.0,
             device=None) -> float:
    """One optimizer step of completion-only SFT on these sequences, packed into micro-batches
    of ``micro_batch_tokens`` (restarting position ids), through the backbone and the fused
    log-prob kernel (never the ``[tokens x vocab]`` logits); the loss is the token mean over the
    whole batch.  Returns it."""
    batches = pack_sequences(prompts, comps, None, max_tokens=micro_batch_tokens, loss_masks=loss_masks)
    n_tok = sum(mb.num_loss_tokens for mb in batches)
    opt.zero_grad(set_to_none=True)
    loss = 0.0
    for mb in batches:  # token-mean over the whole batch, accumulated per micro-batch
        if device is not None:
            mb = mb.to(device)
        hidden = backbone_hidden_states(model, mb.input_ids, position_ids=mb.position_ids,
                                        cu_seqlens=mb.cu_seqlens, max_seqlen=mb.max_seqlen)[0]
        logp = fused_logprobs(hidden, weight, mb.targets)
        mb_loss = -(logp * (mb.targets != -100)).sum() / n_tok
        mb_loss.backward()
        loss += mb_loss.detach()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    opt.step()
    return float(loss)


def greedy_accuracy(model, tokenizer, rows, max_new_tokens: int = MAX_NEW_TOKENS) -> float:
    """Fraction of ``rows`` whose greedy completion has the right final answer."""
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in rows]
    ro = generate(model, tokenizer, prompts, group_size=1, do_sample=False,
                  max_new_tokens=max_new_tokens)
    return sum(answer_correct(t, r["answer"]) for t, r in zip(ro.texts, rows)) / max(1, len(rows))


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
    args_in = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default="arithmetic")
    known, _ = pre.parse_known_args(args_in)
    if any(a.split("=")[0] in ("--model", "--train-file") for a in args_in):
        from fastgrpo.trainer.user_sft import main as user_main  # a user's model and data
        return user_main(args_in)
    if known.task == "routing":
        from fastgrpo.trainer.routing_sft import main as routing_main
        return routing_main(args_in)
    if known.task == "charts":  # the multimodal task (tasks/charts.py)
        from fastgrpo.trainer.config import ConfigError
        from fastgrpo.trainer.requirements import require
        try:
            require("Pillow", "--task charts (chart images)")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
        from fastgrpo.tasks.charts import sft_main
        return sft_main(args_in)
    if known.task != "arithmetic":
        print(f"error: invalid --task {known.task!r}: choose arithmetic, routing or charts",
              file=sys.stderr)
        raise SystemExit(2)
    ap = argparse.ArgumentParser(prog="python -m fastgrpo.sft", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--task", default="arithmetic", help="arithmetic | routing (fastgrpo.trainer.routing_sft) | charts (fastgrpo.tasks.charts)")
    ap.add_argument("--out", required=True, help="output directory (model + tokenizer)")
    ap.add_argument("--seed", type=int, default=0, help="seed for data, init and order")
    ap.add_argument("--steps", type=int, default=500, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    ap.add_argument("--hidden-size", type=int, default=128, help="model width")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--eval-size", type=int, default=200, help="held-out problems for the final greedy eval")
    ap.add_argument("--skip-double-prob", type=float, default=0.6,
                    help="probability that a warm-up solution ignores its 'doubles' sentence")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest for the tiny model; 0 keeps torch's default)")
    args = ap.parse_args(argv)
    check_args(ap, args)
    if not 0.0 <= args.skip_double_prob <= 1.0:
        ap.error(f"--skip-double-prob must be in [0, 1], got {args.skip_double_prob}")

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, evals = make_splits(args.seed)
    tok = build_tokenizer()
    model = build_tiny_model(tok, seed=args.seed, hidden_size=args.hidden_size,
                             num_layers=args.layers, num_heads=args.heads)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny llama: {n_params / 1e6:.2f}M parameters, vocabulary {len(tok)}", file=sys.stderr)
    t0 = time.time()
    sft(model, tok, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        skip_double_prob=args.skip_double_prob)
    acc = greedy_accuracy(model, tok, evals[:args.eval_size])
    print(json.dumps({"sft_steps": args.steps, "eval_greedy_accuracy": acc,
                      "seconds": round(time.time() - t0, 1)}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    print(f"saved to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
