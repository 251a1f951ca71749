"""The built-in multimodal task ``charts``: bar charts drawn with Pillow, multi-step questions.

Each image holds three bars A, B, C (left to right) of heights 1..9 on a white 84 x 84 canvas
(8 pixels per unit, a grey baseline).  The heights are *only* in the image: the prompt names the
bars, never their values.  The question combines them in two steps::

    <image> The chart shows bars A, B and C from left to right. What is A plus B minus C?

and the reference solution is in R1-VL's multimodal layout::

    ### Image Description: A is 3 , B is 7 , C is 5 .
    ### Rationales: Read each bar's height, then combine them one operation per step.
    ### Step 1: 3 + 7 = 10
    ### Step 2: 10 - 5 = 5
    ### The final answer is: 5

``key_steps``: the two equations (with the arithmetic task's surface forms).  Splits are
deterministic and held out by chart: no eval chart (height triple) appears in train.

``python -m fastgrpo.sft --task charts --out DIR`` warms up a tiny Qwen2-VL on it
(:func:`sft_main`).  The shipped checkpoint ``fastgrpo/tasks/assets/charts_warmup`` (what
``python -m fastgrpo.train --task charts`` starts from) was built with exactly::

    python -m fastgrpo.sft --task charts --out fastgrpo/tasks/assets/charts_warmup

(the defaults: seed 0, 2000 train rows, 1000 steps of 32 sequences, lr 3e-3 cosine to 0.1x,
text 128 wide x 4 layers, vision 64 wide x 2 blocks, 0.86M parameters; 888 s of SFT on one
CPU thread, shared machine).  Held-out (100 charts, greedy): bar reading 0.00 -> 1.00, final
answer 0.00 -> 0.81 (the misses are arithmetic slips).  The bar reading stays at chance
(teacher-forced 0.11-0.15) for the first ~250 steps, then jumps (0.47 at step 300, 0.99 at
400): a run stopped at 300 steps looks like a model that cannot read the images.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path

__all__ = ["draw_chart", "make_problem", "make_splits", "RATIONALE", "chart_tokenizer",
           "description_accuracy", "sft_main", "CHARTS_WARMUP_DIR",
           "CHARTS_TRAIN_DEFAULTS", "teacher_forced_reading"]

RATIONALE = "Read each bar's height, then combine them one operation per step."
BARS = "ABC"
SIZE = 84
UNIT = 8
CHARTS_WARMUP_DIR = Path(__file__).resolve().parent / "assets" / "charts_warmup"
# ``python -m fastgrpo.train --task charts`` (on the shipped warm-up) uses these unless given
# explicitly: the warm-up is sharp (entropy ~0.01/token) and at the general default lr 3e-4 the
# held-out accuracy dips (0.81 -> 0.71 at step 20, 0.80 after 60 steps, measured)
CHARTS_TRAIN_DEFAULTS = {"steps": 150, "lr": 1e-4, "eval_every": 25, "max_new_tokens": 72}
_OPS = {"plus": "+", "minus": "-"}


def draw_chart(heights) -> "object":
    """A PIL image of the bars ``heights`` (A, B, C left to right)."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (SIZE, SIZE), "white")
    d = ImageDraw.Draw(im)
    w = SIZE // len(heights)
    base = SIZE - 4
    d.line([(0, base), (SIZE, base)], fill=(128, 128, 128))
    colors = [(200, 60, 60), (60, 140, 60), (60, 80, 200)]
    for k, h in enumerate(heights):
        d.rectangle([k * w + 5, base - UNIT * h, k * w + w - 6, base - 1], fill=colors[k % 3])
    return im


def _forms(a, op, b, r):
    from fastgrpo.tasks.arithmetic import _step_forms
    return _step_forms(a, op, b, r)


def make_problem(heights, rng: random.Random) -> dict:
    """One row for the chart of ``heights``: prompt (with ``<image>``), image (PIL), answer,
    key_steps, solution."""
    vals = dict(zip(BARS, heights))
    while True:
        x, y, z = rng.sample(BARS, 3)
        o1, o2 = rng.choice(list(_OPS)), rng.choice(list(_OPS))
        r1 = vals[x] + vals[y] if o1 == "plus" else vals[x] - vals[y]
        r2 = r1 + vals[z] if o2 == "plus" else r1 - vals[z]
        if r1 >= 0 and r2 >= 0:
            break
    s1, s2 = (vals[x], _OPS[o1], vals[y], r1), (r1, _OPS[o2], vals[z], r2)
    desc = " , ".join(f"{b} is {vals[b]}" for b in BARS)
    solution = "\n".join([f"### Image Description: {desc} .", f"### Rationales: {RATIONALE}",
                          f"### Step 1: {s1[0]} {s1[1]} {s1[2]} = {s1[3]}",
                          f"### Step 2: {s2[0]} {s2[1]} {s2[2]} = {s2[3]}",
                          f"### The final answer is: {r2}"])
    return {"prompt": (f"<image> The chart shows bars A, B and C from left to right. What is "
                       f"{x} {o1} {y} {o2} {z}?"),
            "image": draw_chart(heights), "heights": list(heights), "answer": str(r2),
            "key_steps": [_forms(*s1), _forms(*s2)], "solution": solution}


def make_splits(seed: int = 0, n_train: int = 2000, n_eval: int = 100) -> tuple[list[dict], list[dict]]:
    """Deterministic train / eval rows; eval charts (height triples) never appear in train."""
    rng = random.Random(seed)
    triples = list(itertools.product(range(1, 10), repeat=3))
    rng.shuffle(triples)
    held, rest = triples[:n_eval], triples[n_eval:]
    evals = [make_problem(t, rng) for t in held]
    train = [make_problem(rest[i % len(rest)], rng) for i in range(n_train)]
    return train, evals


def chart_tokenizer(family: str = "qwen2_vl"):
    """The tiny word-level tokenizer, its vocabulary covering the chart task's texts."""
    from fastgrpo.tasks.tiny_vl import tiny_vl_tokenizer
    rng = random.Random(1)
    texts = []
    for t in itertools.islice(itertools.product(range(1, 10), repeat=3), 0, None, 7):
        r = make_problem(t, rng)
        texts += [r["prompt"], r["solution"]]
    texts += [" ### Image Description:", "Description", " is", " A", " B", " C", " ,", "'s"]
    return tiny_vl_tokenizer(family, extra_texts=texts)


def description_accuracy(text: str, heights) -> float:
    """Fraction of the three bars whose height the completion's Image Description states right."""
    import re
    m = re.search(r"Image Description:(.*)", text)
    if not m:
        return 0.0
    line = m.group(1)
    got = dict(re.findall(r"\b([ABC]) is (\d+)", line))
    return sum(got.get(b) == str(h) for b, h in zip(BARS, heights)) / len(BARS)


# ----------------------------------------------------------------------------- warm-up SFT


def _encode(adapter, rows, encode_fn):
    from fastgrpo.tasks.tokenizer import encode_prompt
    out = []
    for r in rows:
        ids, inputs = adapter.encode(r["prompt"], [r["image"]], encode_fn or encode_prompt)
        out.append((ids, inputs))
    return out


def evaluate_charts(model, tok, adapter, rows, max_new_tokens: int = 72) -> dict:
    """Greedy held-out accuracy (final answer) and bar-reading accuracy (Image Description)."""
    from fastgrpo.tasks.arithmetic import answer_correct
    from fastgrpo.trainer.rollout import generate
    enc = _encode(adapter, rows, None)
    ro = generate(model, tok, [e[0] for e in enc], group_size=1, do_sample=False,
                  max_new_tokens=max_new_tokens, prompt_inputs=[e[1] for e in enc], vision=adapter)
    acc = sum(answer_correct(t, r["answer"]) for t, r in zip(ro.texts, rows)) / max(1, len(rows))
    read = sum(description_accuracy(t, r["heights"]) for t, r in zip(ro.texts, rows)) / max(1, len(rows))
    return {"accuracy": acc, "bar_reading": read, "example": ro.texts[0] if ro.texts else ""}


def teacher_forced_reading(model, tok, adapter, rows, enc=None) -> float:
    """Bar-reading accuracy with the reference solution teacher-forced: the fraction of the
    three description digits that are the model's argmax next token (cheap, no generation;
    a progress probe of the warm-up, not the held-out metric)."""
    import torch
    enc = enc or _encode(adapter, rows, None)
    hits = total = 0
    was = model.training
    model.eval()
    with torch.no_grad():
        for (ids, inputs), r in zip(enc, rows):
            comp = tok(r["solution"], add_special_tokens=False)["input_ids"]
            full = torch.tensor([list(ids) + comp])
            pos = adapter.positions(model, full[0], inputs)
            kw = adapter.forward_inputs(full, inputs)
            if pos is not None:
                kw["position_ids"] = pos.unsqueeze(1)
            logits = model(input_ids=full, **kw).logits[0]
            toks = tok.convert_ids_to_tokens(comp)
            where = [i for i in range(2, len(toks)) if toks[i - 1] == " is" and toks[i - 2] in (" A", " B", " C")][:3]
            for i in where:
                hits += int(logits[len(ids) + i - 1].argmax()) == comp[i]
                total += 1
    model.train(was)
    return hits / max(1, total)


def sft_main(argv: list[str] | None = None) -> None:
    """``python -m fastgrpo.sft --task charts --out DIR``: warm up a tiny Qwen2-VL."""
    import torch

    from fastgrpo.hf import lm_head_weight
    from fastgrpo.ops.logprobs import fused_logprobs
    from fastgrpo.tasks.tiny_vl import build_tiny_vl
    from fastgrpo.trainer.packing import ffd_bins, pack_bins
    from fastgrpo.trainer.policy import policy_hidden_states
    from fastgrpo.trainer.sample import Sample
    from fastgrpo.vl import VisionAdapter, attach_vision

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
    enc = _encode(adapter, train, None)
    eval_enc = _encode(adapter, evals, None)
    comps = [tok(r["solution"] + tok.eos_token, add_special_tokens=False)["input_ids"] for r in train]
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    warm = 10
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    t0 = time.time()
    model.train()
    order: list[int] = []
    for step in range(args.steps):
        if len(order) < args.batch_size:
            more = list(range(len(train)))
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
    model.eval()
    after = evaluate_charts(model, tok, adapter, evals)
    print(json.dumps({"task": "charts", "sft_steps": args.steps, "params": n,
                      "before": {k: before[k] for k in ("accuracy", "bar_reading")},
                      "after": {k: after[k] for k in ("accuracy", "bar_reading")},
                      "seconds": round(time.time() - t0, 1), "example": after["example"]}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    ip.save_pretrained(out)
    print(f"saved to {out}", file=sys.stderr)
