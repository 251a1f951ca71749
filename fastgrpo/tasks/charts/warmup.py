"""The charts task's warm-up: ``python -m fastgrpo.sft --task charts --out DIR`` trains a tiny
Qwen2-VL (``tasks.tiny_vl``) on the reference solutions, completion tokens only, through the
trainer's packed, lm_head-free path (the shipped ``checkpoint/`` was built with the defaults;
``fastgrpo.tasks.charts.data`` gives the numbers)."""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time

import torch

from fastgrpo.ops.logprobs import fused_logprobs
from fastgrpo.tasks.charts.data import SIZE, chart_tokenizer, make_splits
from fastgrpo.tasks.charts.evaluation import encode_rows, evaluate_charts, teacher_forced_reading
from fastgrpo.tasks.tiny_vl import build_tiny_vl
from fastgrpo.trainer.config import ConfigError
from fastgrpo.trainer.packing import ffd_bins, pack_bins
from fastgrpo.trainer.policy import policy_hidden_states
from fastgrpo.trainer.requirements import require
from fastgrpo.trainer.sample import Sample
from fastgrpo.trainer.sft import save_warmup
from fastgrpo.vl import VisionAdapter, attach_vision

__all__ = ["sft_main", "main"]


def main(argv: list[str] | None = None) -> None:
    """``python -m fastgrpo.sft --task charts``: Pillow checked first (exit 2 without it)."""
    try:
        require("Pillow", "--task charts (chart images)")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    return sft_main(argv)


def _train(model, tok, adapter, enc, comps, evals, eval_enc, args, t0: float) -> None:
    """The SFT steps: completion tokens of the packed, image-attached batches (fused log-probs)."""
    train_n = len(enc)
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    warm = 10
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    model.train()
    order: list[int] = []
    for step in range(args.steps):
        if len(order) < args.batch_size:
            more = list(range(train_n))
            rng.shuffle(more)
            order += more
        idx, order = order[:args.batch_size], order[args.batch_size:]
        samples = [Sample(prompt_ids=enc[i][0], completion_ids=comps[i], group=0, row=i,
                          prompt_inputs=enc[i][1]) for i in idx]
        bins = ffd_bins([s.num_tokens for s in samples], args.micro_batch_tokens)
        batches = pack_bins(bins, samples)
        attach_vision(batches, samples, adapter, model)
        n_tok = sum(mb.num_loss_tokens for mb in batches)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for mb in batches:
            hidden, weight = policy_hidden_states(model, mb)
            logp = fused_logprobs(hidden, weight, mb.targets)
            loss = -(logp * (mb.targets != -100)).sum() / n_tok
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            probe = ""
            if args.probe_every and (step % args.probe_every == 0 or step == args.steps - 1):
                probe = f"  teacher-forced bar reading {teacher_forced_reading(model, tok, adapter, evals, eval_enc):.2f}"
            print(f"sft step {step:4d}  loss {total:.4f}{probe}  ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)


def sft_main(argv: list[str] | None = None) -> None:
    """``python -m fastgrpo.sft --task charts --out DIR``: warm up a tiny Qwen2-VL."""
    ap = argparse.ArgumentParser(prog="python -m fastgrpo.sft --task charts")
    ap.add_argument("--task", default="charts")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vision-dim", type=int, default=64)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--eval-size", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--micro-batch-tokens", type=int, default=1024)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--probe-every", type=int, default=0,
                    help="log the teacher-forced bar reading on the eval rows every N steps (0: never)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    train, evals = make_splits(0)
    evals = evals[:args.eval_size]
    tok = chart_tokenizer()
    px = SIZE * SIZE
    model, tok, ip = build_tiny_vl("qwen2_vl", tokenizer=tok, seed=args.seed,
                                   hidden_size=args.hidden_size, num_layers=args.layers,
                                   vision_dim=args.vision_dim, vision_depth=args.vision_depth,
                                   min_pixels=px, max_pixels=px)
    adapter = VisionAdapter(model.config, tok, ip)
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny qwen2-vl: {n / 1e6:.2f}M parameters, vocabulary {len(tok)}", file=sys.stderr)
    before = evaluate_charts(model, tok, adapter, evals)
    enc = encode_rows(adapter, train, None)
    eval_enc = encode_rows(adapter, evals, None)
    comps = [tok(r["solution"] + tok.eos_token, add_special_tokens=False)["input_ids"] for r in train]
    t0 = time.time()
    _train(model, tok, adapter, enc, comps, evals, eval_enc, args, t0)
    model.eval()
    after = evaluate_charts(model, tok, adapter, evals)
    print(json.dumps({"task": "charts", "sft_steps": args.steps, "params": n,
                      "before": {k: before[k] for k in ("accuracy", "bar_reading")},
                      "after": {k: after[k] for k in ("accuracy", "bar_reading")},
                      "seconds": round(time.time() - t0, 1), "example": after["example"]}))
    save_warmup(args.out, model, tok, ip)
