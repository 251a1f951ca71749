"""The arithmetic task's warm-up: supervised fine-tuning on the reference step-by-step solutions.

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

The shipped checkpoint ``fastgrpo/tasks/arithmetic/checkpoint/`` was built with exactly::

    python -m fastgrpo.sft --out fastgrpo/tasks/arithmetic/checkpoint

(the defaults below: seed 0, 2000 train problems, 500 steps of 32 sequences, lr 3e-3,
skip-double probability 0.6; 258 s in the loop on one CPU thread, with a second job on the
other core, 2026-12-06).
"""

from __future__ import annotations

import json
import random
import sys
import time

import torch

from fastgrpo.tasks.arithmetic.data import MAX_NEW_TOKENS, answer_correct, make_splits, warmup_solution
from fastgrpo.tasks.arithmetic.tokenizer import build_tokenizer
from fastgrpo.tasks.tiny_model import build_tiny_model
from fastgrpo.tasks.tokenizer import encode_prompt
from fastgrpo.trainer.rollout import generate
from fastgrpo.trainer.sft import check_args, save_warmup, sft_sequences, warmup_parser

__all__ = ["sft", "greedy_accuracy", "main"]


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


def greedy_accuracy(model, tokenizer, rows, max_new_tokens: int = MAX_NEW_TOKENS) -> float:
    """Fraction of ``rows`` whose greedy completion has the right final answer."""
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in rows]
    ro = generate(model, tokenizer, prompts, group_size=1, do_sample=False,
                  max_new_tokens=max_new_tokens)
    return sum(answer_correct(t, r["answer"]) for t, r in zip(ro.texts, rows)) / max(1, len(rows))


def main(argv: list[str] | None = None) -> None:
    """``python -m fastgrpo.sft [--task arithmetic] --out DIR``."""
    ap = warmup_parser("python -m fastgrpo.sft", __doc__.split("\n")[0], task="arithmetic", steps=500,
                       batch_size=32, eval_size=200,
                       eval_help="held-out problems for the final greedy eval",
                       threads_help="torch CPU threads (1 is fastest for the tiny model; 0 keeps "
                                    "torch's default)")
    ap.add_argument("--skip-double-prob", type=float, default=0.6,
                    help="probability that a warm-up solution ignores its 'doubles' sentence")
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
    save_warmup(args.out, model, tok)


if __name__ == "__main__":
    main()
