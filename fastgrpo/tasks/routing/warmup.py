"""Warm-up of the routing task: ``python -m fastgrpo.sft --task routing --out DIR``.

A freshly initialised tiny Llama (``tasks.tiny_model``, 1024 positions) with the routing
world's word-level tokenizer learns, completion tokens only:

* the offline step states (``tasks.routing.step_rows``): prompt -> the teacher's step
  (``teacher_completion``) + EOS;
* the online trajectories (``tasks.routing.online_teacher_segments``): prompt -> every step
  of the question in one sequence, the search results (real BM25 searches of the built KBs)
  as tool tokens that are masked out of the loss.

The data is imperfect on purpose, as the arithmetic warm-up's is: with probability
``--kb-noise`` (default 0.5) a table lookup is written as a text lookup (offline), or the
trajectory takes a detour through the text KB before asking the table KB (online).  The
warm-up model so learns the format and the copying of facts but also the habit; Step-GRPO's
KB term is what removes it.

The shipped checkpoint ``fastgrpo/tasks/routing/checkpoint`` was built with exactly::

    python -m fastgrpo.sft --task routing --out fastgrpo/tasks/routing/checkpoint

(the defaults below).
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time

import torch

from fastgrpo.kb import KnowledgeBase
from fastgrpo.tasks.routing import data as T
from fastgrpo.tasks.routing.multiturn import KBTool, hf_step_fn, rollout_turns, score_turns, turn_metrics
from fastgrpo.tasks.routing.rewards import offline_metrics
from fastgrpo.tasks.tiny_model import build_tiny_model
from fastgrpo.tasks.tokenizer import encode_prompt
from fastgrpo.trainer.rollout import generate
from fastgrpo.trainer.sft import check_args, save_warmup, sft_sequences, warmup_parser

__all__ = ["routing_warmup_data", "main"]


def routing_warmup_data(tokenizer, kbs: dict[str, KnowledgeBase], *, seed: int = 0,
                        kb_noise: float = 0.5, online: bool = True):
    """``(prompts, completions, loss_masks)`` token ids of the warm-up set (train split)."""
    rng = random.Random(seed + 1)
    eos = tokenizer.eos_token_id
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts, comps, masks = [], [], []
    for r in T.make_splits(seed)[0]:
        prompts.append(encode_prompt(tokenizer, r["prompt"]))
        comps.append(enc(T.teacher_completion(r, rng, kb_noise)) + [eos])
        masks.append(None)
    if online:
        for r in T.online_splits(seed)[0]:
            ids, mask = [], []
            for who, text in T.online_teacher_segments(r, kbs, rng=rng, kb_noise=kb_noise):
                piece = enc(text)
                ids += piece
                mask += [who == "policy"] * len(piece)
            prompts.append(encode_prompt(tokenizer, r["prompt"]))
            comps.append(ids)
            masks.append(mask)
    return prompts, comps, [m if m is not None else [True] * len(c) for m, c in zip(masks, comps)]


def _evaluate(model, tokenizer, kbs_paths, n_eval: int, max_new_tokens: int = 40) -> dict:
    rows = T.make_splits(0)[1]
    ro = generate(model, tokenizer, [encode_prompt(tokenizer, r["prompt"]) for r in rows], group_size=1,
                  do_sample=False, max_new_tokens=max_new_tokens)
    offline = offline_metrics(rows, ro.texts)
    qrows = T.online_splits(0)[1][:n_eval]
    tool = KBTool(kbs_paths)
    try:
        step = hf_step_fn(model, tokenizer, max_new_tokens=max_new_tokens, do_sample=False)
        ro = rollout_turns(step, tokenizer, [encode_prompt(tokenizer, r["prompt"]) for r in qrows], tool,
                           max_turns=8, max_total_tokens=model.config.max_position_embeddings,
                           max_new_tokens=max_new_tokens)
        online = turn_metrics(score_turns(ro.samples, qrows))
    finally:
        tool.close()
    return {"offline": {k: offline[k] for k in ("routing_accuracy", "answer_recall")},
            "online": {k: online[k] for k in ("routing_accuracy", "answer_recall")}}


def main(argv: list[str] | None = None) -> None:
    ap = warmup_parser("python -m fastgrpo.sft --task routing", __doc__.split("\n")[0], task="routing",
                       steps=300, batch_size=16, eval_size=30,
                       eval_help="held-out questions for the final greedy eval (0: none)",
                       seed_help="seed for init and order (the world is seed 0's)")
    ap.add_argument("--kb-noise", type=float, default=0.5,
                    help="probability that a warm-up table lookup is sent to the text KB")
    ap.add_argument("--no-online", action="store_true", help="offline step states only (no trajectories)")
    args = ap.parse_args(argv)
    check_args(ap, args)
    if not 0.0 <= args.kb_noise <= 1.0:
        ap.error(f"invalid --kb-noise {args.kb_noise}: must be in [0, 1]")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tok = T.build_routing_tokenizer(0)
    model = build_tiny_model(tok, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.layers,
                             num_heads=args.heads, max_position_embeddings=1024)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny llama: {n_params / 1e6:.2f}M parameters, vocabulary {len(tok)}", file=sys.stderr)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        paths = T.build_kbs(T.make_world(0), tmp)
        kbs = {n: KnowledgeBase(p) for n, p in paths.items()}
        try:
            prompts, comps, masks = routing_warmup_data(tok, kbs, seed=0, kb_noise=args.kb_noise,
                                                        online=not args.no_online)
        finally:
            for kb in kbs.values():
                kb.close()
        torch.manual_seed(args.seed)
        sft_sequences(model, prompts, comps, loss_masks=masks, steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr, seed=args.seed, micro_batch_tokens=768, log=lambda m: print(m, file=sys.stderr))
        result = {"sft_steps": args.steps, "kb_noise": args.kb_noise, "train_sequences": len(prompts)}
        if args.eval_size:
            result["eval_greedy"] = _evaluate(model, tok, paths, args.eval_size)
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result))
    save_warmup(args.out, model, tok)


if __name__ == "__main__":
    main()
