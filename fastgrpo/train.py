"""StepGRPO training loop: ``python -m fastgrpo.train [--flags]`` (``--help`` lists them all).

One step, top to bottom::

    prompts (prompts_per_step)  --generate G samples each, KV cache-->  completions
    completions  --reward set (StepRAR + StepRVR, + --reward extras)-->  rewards  [B]
    rewards  --group_advantages (per prompt group)-->  advantages  [B]
    (drop groups whose rewards are all equal; mask truncated completions)
    prompt+completion sequences  --first-fit-decreasing packing-->  micro-batches (one row each)
    for each PPO epoch (old log-probs first when ppo_epochs > 1):
        for each micro-batch:  backbone hidden states (no lm_head)  -> grpo_loss -> backward
    clip grad norm -> AdamW step -> LR schedule (linear warm-up, cosine decay)

The loss is normalised over the whole batch (``num_items_in_batch``), so the gradient does not
depend on how the batch was packed.  The ``[tokens x vocab]`` logits never exist: hidden
states go straight into the fused kernel together with the lm_head weight.

Defaults: the shipped warm-up checkpoint (``fastgrpo/assets/warmup``) on the built-in
arithmetic task; runs on a 2-core CPU in a few minutes and prints held-out greedy accuracy and
validity before and after.  Outputs in ``--out-dir``: ``metrics.jsonl`` (one JSON line per
step, also on stdout), ``samples.jsonl``, ``curves.png``, ``summary.json`` and ``model/``.
"""

from __future__ import annotations

import copy
import json
import math
import random
import resource
import sys
import time
from pathlib import Path

import torch

from fastgrpo.advantages import group_advantages
from fastgrpo.config import TrainConfig, parse_args
from fastgrpo.logprobs import fused_logprobs
from fastgrpo.loss import grpo_loss
from fastgrpo.modeling import backbone_hidden, lm_head_weight, load_model
from fastgrpo.packing import MicroBatch, pack_sequences
from fastgrpo.rewards import RewardSet, default_reward_set, load_reward_function
from fastgrpo.rollout import Rollout, generate
from fastgrpo.task import load_jsonl, make_splits
from fastgrpo.tokenizer import encode_prompt

__all__ = ["main", "run", "optimize", "compute_advantages", "batch_logprobs", "evaluate",
           "build_reward_set", "load_data", "lr_at"]


# ----------------------------------------------------------------------------- setup


def load_data(cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """Train and eval rows: JSONL files when given, else the built-in task's splits."""
    if cfg.train_file or cfg.eval_file:
        train = load_jsonl(cfg.train_file) if cfg.train_file else make_splits(cfg.seed)[0]
        evals = load_jsonl(cfg.eval_file) if cfg.eval_file else []
    else:
        train, evals = make_splits(0)  # the warm-up model was trained on split seed 0
    return train, evals[:cfg.eval_size]


def build_reward_set(cfg: TrainConfig) -> RewardSet:
    """The default StepGRPO set plus ``--reward module:function[=weight]`` extras."""
    base = default_reward_set()
    funcs, weights = dict(base.funcs), dict(base.weights)
    for spec in cfg.reward:
        target, _, w = spec.partition("=")
        fn = load_reward_function(target)
        name = target.split(":")[-1]
        while name in funcs:
            name += "_"
        funcs[name], weights[name] = fn, float(w) if w else 1.0
    return RewardSet(funcs, weights)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _columns(rows: list[dict], index: list[int]) -> dict:
    cols = {"answer": [rows[i]["answer"] for i in index]}
    if all("key_steps" in rows[i] for i in index):
        cols["key_steps"] = [rows[i]["key_steps"] for i in index]
    return cols


# ----------------------------------------------------------------------------- advantages


def compute_advantages(rewards: list[float], group_size: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-completion advantages and a keep mask (False for zero-variance groups when
    ``cfg.drop_zero_std_groups``)."""
    r = torch.tensor(rewards, dtype=torch.float32)
    adv = group_advantages(r, group_size=group_size, scale=cfg.scale_rewards)
    keep = torch.ones(len(rewards), dtype=torch.bool)
    if cfg.drop_zero_std_groups:
        g = r.view(-1, group_size)
        varied = (g.max(1).values - g.min(1).values) > 1e-6
        keep = varied.repeat_interleave(group_size)
    return adv, keep


# ----------------------------------------------------------------------------- optimisation


def _autocast(device: torch.device, cfg: TrainConfig):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bool(cfg.bf16 and device.type == "cuda"))


def _hidden_and_weight(model, mb: MicroBatch, cfg: TrainConfig):
    device = mb.input_ids.device
    with _autocast(device, cfg):
        hidden = backbone_hidden(model, mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen)[0]
    weight = lm_head_weight(model)
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    return hidden, weight


@torch.no_grad()
def batch_logprobs(model, batches: list[MicroBatch], cfg: TrainConfig) -> list[torch.Tensor]:
    """Per-token log-probs ``[L]`` of each micro-batch (forward only, fused kernel)."""
    out = []
    for mb in batches:
        hidden, weight = _hidden_and_weight(model, mb, cfg)
        out.append(fused_logprobs(hidden, weight, mb.targets, temperature=cfg.temperature,
                                  backend=cfg.backend))
    return out


def _num_items(batches: list[MicroBatch], cfg: TrainConfig) -> float:
    n_seq = sum(mb.num_sequences for mb in batches)
    n_tok = sum(mb.num_loss_tokens for mb in batches)
    if cfg.loss_type == "grpo":
        return float(n_seq)
    if cfg.loss_type == "dr_grpo":
        return float(n_seq * cfg.max_new_tokens)
    return float(n_tok)  # bnpo, dapo: tokens of the whole batch


def optimize(model, optimizer, batches: list[MicroBatch], cfg: TrainConfig, ref_model=None) -> dict:
    """Old/ref log-probs, then ``ppo_epochs`` passes of accumulate-over-micro-batches + one
    optimizer step each.  Returns token-weighted means of the loss metrics."""
    if cfg.beta > 0 and ref_model is not None:
        for mb, lp in zip(batches, batch_logprobs(ref_model, batches, cfg)):
            mb.extras["ref_logp"] = lp
    if cfg.ppo_epochs > 1:
        for mb, lp in zip(batches, batch_logprobs(model, batches, cfg)):
            mb.extras["old_logp"] = lp
    num_items = _num_items(batches, cfg)
    model.train()
    sums: dict[str, float] = {}
    weight_sum, loss_sum, grad_norm = 0.0, 0.0, 0.0
    rmin, rmax = math.inf, -math.inf
    for _ in range(cfg.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        for mb in batches:
            hidden, weight = _hidden_and_weight(model, mb, cfg)
            loss, m = grpo_loss(
                hidden, weight, mb.targets, mb.advantages, cu_seqlens=mb.cu_seqlens,
                old_logp=mb.extras.get("old_logp"), ref_logp=mb.extras.get("ref_logp"),
                beta=cfg.beta, epsilon_low=cfg.epsilon_low,
                epsilon_high=cfg.epsilon_high or cfg.epsilon_low, temperature=cfg.temperature,
                entropy_coef=cfg.entropy_coef, loss_type=cfg.loss_type,
                importance_sampling_level=cfg.importance_sampling_level,
                num_items_in_batch=num_items, backend=cfg.backend)
            loss.backward()
            loss_sum += loss.item()
            n = float(mb.num_loss_tokens)
            weight_sum += n
            for k, v in m.items():
                if k in ("ratio/min", "ratio/max", "num_tokens"):
                    continue
                sums[k] = sums.get(k, 0.0) + float(v) * n
            rmin = min(rmin, float(m.get("ratio/min", 1.0)))
            rmax = max(rmax, float(m.get("ratio/max", 1.0)))
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        else:
            grad_norm = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters()
                                             if p.grad is not None)))
        optimizer.step()
    out = {k: v / max(weight_sum, 1.0) for k, v in sums.items()}
    out.setdefault("kl", 0.0)
    out["ratio/min"] = rmin if math.isfinite(rmin) else 1.0
    out["ratio/max"] = rmax if math.isfinite(rmax) else 1.0
    out["loss"] = loss_sum / cfg.ppo_epochs
    out["grad_norm"] = grad_norm
    return out


# ----------------------------------------------------------------------------- evaluation


def evaluate(model, tokenizer, rows: list[dict], reward_set: RewardSet, cfg: TrainConfig) -> dict:
    """Greedy held-out accuracy and layout validity (the reward set's accuracy / step_rvr)."""
    if not rows:
        return {"accuracy": math.nan, "validity": math.nan}
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in rows]
    ro = generate(model, tokenizer, prompts, group_size=1, do_sample=False,
                  max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size)
    res = reward_set([r["prompt"] for r in rows], ro.texts, **_columns(rows, list(range(len(rows)))))
    stats = res.stats()
    return {"accuracy": stats["accuracy"]["mean"], "validity": stats["step_rvr"]["mean"]}


# ----------------------------------------------------------------------------- output


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        self.total = total
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, desc="stepgrpo")
            except ImportError:
                pass

    def update(self, step: int, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"\rstep {step + 1}/{self.total} {text}", end="", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(("\n" if self.enabled else "") + text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def _to_json(metrics: dict) -> str:
    return json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()})


# ----------------------------------------------------------------------------- main loop


def run(cfg: TrainConfig, model=None, tokenizer=None) -> dict:
    """Train; returns the summary (eval before/after and the last step's metrics)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # model, reference model, data, rewards
    train_rows, eval_rows = load_data(cfg)
    if model is None:
        model, tokenizer = load_model(cfg.model or None, device=device)
    model.to(device)
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.config.use_cache = True  # generation still uses the KV cache
    ref_model = None
    if cfg.beta > 0:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    reward_set = build_reward_set(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    prompt_cache: dict[int, list[int]] = {}

    def prompt_ids(i: int) -> list[int]:
        if i not in prompt_cache:
            prompt_cache[i] = encode_prompt(tokenizer, train_rows[i]["prompt"])
        return prompt_cache[i]

    G = cfg.group_size
    before = evaluate(model, tokenizer, eval_rows, reward_set, cfg)
    print(f"eval before: accuracy {before['accuracy']:.3f}  validity {before['validity']:.3f}", file=sys.stderr)
    metrics_f = (out_dir / "metrics.jsonl").open("w")
    samples_f = (out_dir / "samples.jsonl").open("w")
    history: list[dict] = []
    order: list[int] = []
    rng = random.Random(cfg.seed)
    progress = _Progress(cfg.steps, cfg.progress)
    t_start = time.perf_counter()

    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)

        # 1. rollout: G samples for each of prompts_per_step prompts
        if len(order) < cfg.prompts_per_step:
            more = list(range(len(train_rows)))
            rng.shuffle(more)
            order += more
        idx, order = order[:cfg.prompts_per_step], order[cfg.prompts_per_step:]
        ro: Rollout = generate(model, tokenizer, [prompt_ids(i) for i in idx], group_size=G,
                               max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                               top_p=cfg.top_p, do_sample=True, batch_size=cfg.gen_batch_size)
        rows_of = [idx[p] for p in ro.prompt_index]

        # 2. rewards
        res = reward_set([train_rows[i]["prompt"] for i in rows_of], ro.texts, **_columns(train_rows, rows_of))
        stats = res.stats()

        # 3. advantages (+ which completions enter the loss)
        adv, keep = compute_advantages(res.total, G, cfg)
        truncated = torch.tensor(ro.truncated, dtype=torch.bool)
        if cfg.mask_truncated:
            keep &= ~truncated
        keep &= torch.tensor([len(c) > 0 for c in ro.completion_ids])
        use = keep.nonzero().flatten().tolist()

        # 4. pack + optimise
        t_train = time.perf_counter()
        if use:
            batches = pack_sequences([ro.prompt_ids[i] for i in use], [ro.completion_ids[i] for i in use],
                                     adv[use], cfg.micro_batch_tokens)
            batches = [mb.to(device) for mb in batches]
            train_tokens = sum(mb.num_tokens for mb in batches) * cfg.ppo_epochs
            lm = optimize(model, optimizer, batches, cfg, ref_model)
        else:  # every group had equal rewards: nothing to learn from this batch
            batches, train_tokens = [], 0
            lm = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_ratio/low_mean": 0.0,
                  "clip_ratio/high_mean": 0.0, "clip_ratio/region_mean": 0.0, "ratio/min": 1.0,
                  "ratio/mean": 1.0, "ratio/max": 1.0, "logp": 0.0, "grad_norm": 0.0}
        train_seconds = time.perf_counter() - t_train

        # 5. log
        lens = [len(c) for c in ro.completion_ids]
        rew = torch.tensor(res.total)
        m = {"step": step + 1, "lr": lr_at(step, cfg),
             "reward/mean": float(rew.mean()), "reward/std": float(rew.std()) if len(rew) > 1 else 0.0}
        for name, s in stats.items():
            m[f"rewards/{name}/mean"] = s["mean"] if s["count"] else 0.0
            m[f"rewards/{name}/std"] = s["std"] if s["count"] > 1 else 0.0
        m["accuracy"] = m["rewards/accuracy/mean"]
        m["step_k"] = m["rewards/step_k/mean"]
        m["validity"] = m["rewards/step_rvr/mean"]
        m.update({
            "kl": lm["kl"], "clip_ratio/low": lm["clip_ratio/low_mean"],
            "clip_ratio/high": lm["clip_ratio/high_mean"], "clip_ratio/region": lm["clip_ratio/region_mean"],
            "entropy": lm["entropy"], "ratio/min": lm["ratio/min"], "ratio/mean": lm["ratio/mean"],
            "ratio/max": lm["ratio/max"], "loss": lm["loss"], "grad_norm": lm["grad_norm"],
            "completion_len/mean": sum(lens) / len(lens), "completion_len/max": max(lens),
            "truncated_frac": float(truncated.float().mean()),
            "kept_frac": len(use) / len(ro), "micro_batches": len(batches),
            "gen_tokens_per_s": ro.generated_tokens / max(ro.seconds, 1e-9),
            "train_tokens_per_s": train_tokens / max(train_seconds, 1e-9),
            "gen_seconds": ro.seconds, "train_seconds": train_seconds,
            "peak_mem_mb": _peak_memory_mb(device),
        })
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            ev = evaluate(model, tokenizer, eval_rows, reward_set, cfg)
            m["eval/accuracy"], m["eval/validity"] = ev["accuracy"], ev["validity"]
            progress.write(f"step {step + 1}: eval accuracy {ev['accuracy']:.3f}  validity {ev['validity']:.3f}")
        line = _to_json(m)
        metrics_f.write(line + "\n")
        metrics_f.flush()
        print(line, flush=True)
        history.append(m)
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
            i = 0
            samples_f.write(json.dumps({"step": step + 1, "prompt": train_rows[rows_of[i]]["prompt"],
                                        "completion": ro.texts[i], "reward": res.total[i]}) + "\n")
            samples_f.flush()
            progress.write(f"--- sample at step {step + 1} (reward {res.total[i]:.2f})\n"
                           f"{train_rows[rows_of[i]]['prompt']}\n{ro.texts[i]}\n---")
        progress.update(step, f"reward {m['reward/mean']:.3f} acc {m['accuracy']:.2f}")

    progress.close()
    metrics_f.close()
    samples_f.close()
    after = evaluate(model, tokenizer, eval_rows, reward_set, cfg)
    summary = {"eval_before": before, "eval_after": after, "steps": cfg.steps,
               "seconds": round(time.perf_counter() - t_start, 1),
               "last": history[-1] if history else {}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.plot and history:
        from fastgrpo.plot import plot_curves
        plot_curves(history, before, after, out_dir / "curves.png")
    if cfg.save:
        model.save_pretrained(out_dir / "model")
        tokenizer.save_pretrained(out_dir / "model")
    print(f"held-out greedy ({len(eval_rows)} problems)   accuracy   validity\n"
          f"  before StepGRPO                {before['accuracy']:8.3f}   {before['validity']:8.3f}\n"
          f"  after  StepGRPO                {after['accuracy']:8.3f}   {after['validity']:8.3f}\n"
          f"({summary['seconds']} s, outputs in {out_dir})")
    return summary


def main(argv: list[str] | None = None) -> None:
    from fastgrpo.config import ConfigError
    from fastgrpo.task import DataError
    try:
        cfg = parse_args(argv)
        run(cfg)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
