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

Robustness and scale (all off or automatic by default):

* ``--save-every N`` writes an atomic, verified checkpoint (weights, optimizer, RNG states, data
  position) to ``<out-dir>/checkpoints/step-N`` (``--keep-last`` of them are kept);
  ``--resume auto`` (or a directory) continues a killed run exactly where it stopped: the
  same LR schedule, data order and random numbers, metrics appended to ``metrics.jsonl``.
* A NaN/inf loss or gradient norm stops the run before the optimizer step with an error naming
  the step (exit code 3); when the parameters are still finite, a checkpoint of the last
  completed step is written first (its ``extra["stopped"]`` says why).
* ``torchrun --nproc-per-node K -m fastgrpo.train ...``: data parallel (DDP on CPU/gloo, FSDP2
  on CUDA; ``--dp-strategy``).  Each rank generates whole prompt groups; the kept sequences
  are gathered and length-balanced over the ranks; the loss is normalised over the global
  batch, so K processes compute the same update as one process on the same rollouts.
* ``--attn-implementation`` picks the packed-row attention backend; ``--preset`` loads a named
  model + hyper-parameter set (``fastgrpo.presets``), explicit options still win.

Defaults: the shipped warm-up checkpoint (``fastgrpo/assets/warmup``) on the built-in
arithmetic task; runs on a 2-core CPU in a few minutes and prints held-out greedy accuracy and
validity before and after.  Outputs in ``--out-dir``: ``metrics.jsonl`` (one JSON line per
step, also on stdout), ``samples.jsonl``, ``curves.png``, ``summary.json`` and ``model/``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import resource
import sys
import time
from pathlib import Path

import torch

from fastgrpo import distributed as dist_
from fastgrpo.advantages import group_advantages
from fastgrpo.attention import AttentionBackendError, apply_attention, packed_attention_kwargs, select_attention
from fastgrpo.checkpoint import (
    CheckpointError,
    NonFiniteLossError,
    capture_rng_state,
    check_finite_loss,
    load_checkpoint,
    params_are_finite,
    resolve_resume,
    save_checkpoint,
)
from fastgrpo.config import ConfigError, TrainConfig, explicit_fields, parse_args
from fastgrpo.logprobs import fused_logprobs
from fastgrpo.loss import grpo_loss
from fastgrpo.modeling import load_model
from fastgrpo.packing import MicroBatch
from fastgrpo.rewards import TAG_LAYOUT, RewardResult, RewardSet, default_reward_set, load_reward_function
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


def build_reward_set(cfg: TrainConfig, layout=None) -> RewardSet:
    """The default StepGRPO set (in ``layout``; default R1-VL ``### Step k:``) plus
    ``--reward module:function[=weight]`` extras."""
    base = default_reward_set() if layout is None else default_reward_set(layout=layout)
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


def _as_policy(model) -> torch.nn.Module:
    """``model`` as a module whose forward gives ``(hidden, lm_head weight)``: the result of
    ``distributed.wrap_model`` as it is, a plain causal LM wrapped (no copy) on the fly."""
    if isinstance(model, dist_.PolicyHiddenStates) or type(model).__name__ == "DistributedDataParallel":
        return model
    return dist_.PolicyHiddenStates(model)


def _attn_backend(policy) -> str:
    cfg = getattr(dist_.unwrap_model(policy), "config", None)
    return getattr(cfg, "_attn_implementation", None) or "sdpa"


def _hidden_and_weight(model, mb: MicroBatch, cfg: TrainConfig):
    """Final hidden states ``[L, D]`` of a packed row and the lm_head weight (in the hidden
    states' dtype), from the decoder stack only; ``model`` is a causal LM or a wrapped policy."""
    policy = _as_policy(model)
    kw = packed_attention_kwargs(_attn_backend(policy), mb.cu_seqlens, mb.max_seqlen)
    with _autocast(mb.input_ids.device, cfg):
        hidden, weight = policy(mb.input_ids, mb.position_ids, **kw)
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
    """The loss normalizer of the whole (global, all ranks) batch."""
    n_seq = dist_.global_sum(sum(mb.num_sequences for mb in batches))
    n_tok = dist_.global_sum(sum(mb.num_loss_tokens for mb in batches))
    if cfg.loss_type == "grpo":
        return float(n_seq)
    if cfg.loss_type == "dr_grpo":
        return float(n_seq * cfg.max_new_tokens)
    return float(n_tok)  # bnpo, dapo: tokens of the whole batch


def _grad_norm(params: list[torch.Tensor], cfg: TrainConfig) -> float:
    if cfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    elif any(type(p).__name__ == "DTensor" for p in params):
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    else:
        norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor norm
        norm = norm.full_tensor()
    return float(norm)


def optimize(model, optimizer, batches: list[MicroBatch], cfg: TrainConfig, ref_model=None, *,
             step: int = 0) -> dict:
    """Old/ref log-probs, then ``ppo_epochs`` passes of accumulate-over-micro-batches + one
    optimizer step each.  Returns token-weighted means of the loss metrics (over all ranks).

    ``model``: a causal LM or the policy from ``distributed.wrap_model`` (then every rank
    calls this with the same number of micro-batches).  ``step`` (1-based) names the step in
    the ``NonFiniteLossError`` raised, before ``optimizer.step()``, when a micro-batch loss or
    the gradient norm is NaN/inf (on any rank); its ``params_updated`` tells whether an
    earlier PPO epoch of this step had already changed the parameters.
    """
    policy = _as_policy(model)
    if cfg.beta > 0 and ref_model is not None:
        for mb, lp in zip(batches, batch_logprobs(ref_model, batches, cfg)):
            mb.extras["ref_logp"] = lp
    if cfg.ppo_epochs > 1:
        for mb, lp in zip(batches, batch_logprobs(policy, batches, cfg)):
            mb.extras["old_logp"] = lp
    num_items = _num_items(batches, cfg)
    scale = dist_.loss_scale()
    distributed = dist_.is_distributed()
    params = [p for p in policy.parameters() if p.requires_grad]
    policy.train()
    sums: dict[str, float] = {}
    weight_sum, loss_sum, grad_norm = 0.0, 0.0, 0.0
    rmin, rmax = math.inf, -math.inf
    for epoch in range(cfg.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        bad: NonFiniteLossError | None = None
        for i, mb in enumerate(batches):
            with dist_.sync_gradients(policy, last=i == len(batches) - 1):
                hidden, weight = _hidden_and_weight(policy, mb, cfg)
                loss, m = grpo_loss(
                    hidden, weight, mb.targets, mb.advantages, cu_seqlens=mb.cu_seqlens,
                    old_logp=mb.extras.get("old_logp"), ref_logp=mb.extras.get("ref_logp"),
                    beta=cfg.beta, epsilon_low=cfg.epsilon_low,
                    epsilon_high=cfg.epsilon_high or cfg.epsilon_low, temperature=cfg.temperature,
                    entropy_coef=cfg.entropy_coef, loss_type=cfg.loss_type,
                    importance_sampling_level=cfg.importance_sampling_level,
                    num_items_in_batch=num_items, backend=cfg.backend)
                (loss * scale).backward()  # scale: DDP/FSDP average -> sum over ranks (1.0 alone)
            value = loss.item()
            if bad is None and not math.isfinite(value):
                try:
                    check_finite_loss(value, step)
                except NonFiniteLossError as e:
                    bad = e
                if not distributed:
                    break
            loss_sum += value
            n = float(mb.num_loss_tokens)
            weight_sum += n
            for k, v in m.items():
                if k in ("ratio/min", "ratio/max", "num_tokens"):
                    continue
                sums[k] = sums.get(k, 0.0) + float(v) * n
            if n > 0:
                rmin = min(rmin, float(m.get("ratio/min", 1.0)))
                rmax = max(rmax, float(m.get("ratio/max", 1.0)))
        if distributed and dist_.global_sum(0.0 if bad is None else 1.0) > 0 and bad is None:
            bad = NonFiniteLossError(f"non-finite loss on another rank at step {step}: the run "
                                     f"stops here (see that rank's error)", step=step)
        try:
            if bad is not None:
                raise bad
            grad_norm = _grad_norm(params, cfg)
            check_finite_loss(grad_norm, step, what="gradient norm")
        except NonFiniteLossError as e:
            e.params_updated = epoch > 0
            raise
        optimizer.step()
    part = {"sums": sums, "weight_sum": weight_sum, "loss_sum": loss_sum, "rmin": rmin, "rmax": rmax}
    parts = dist_.all_gather_objects(part)
    sums = {k: sum(p["sums"].get(k, 0.0) for p in parts) for k in parts[0]["sums"]}
    weight_sum = sum(p["weight_sum"] for p in parts)
    loss_sum = sum(p["loss_sum"] for p in parts)
    rmin, rmax = min(p["rmin"] for p in parts), max(p["rmax"] for p in parts)
    out = {k: v / max(weight_sum, 1.0) for k, v in sums.items()}
    out.setdefault("kl", 0.0)
    out["ratio/min"] = rmin if math.isfinite(rmin) else 1.0
    out["ratio/max"] = rmax if math.isfinite(rmax) else 1.0
    out["loss"] = loss_sum / cfg.ppo_epochs
    out["grad_norm"] = grad_norm
    return out


# ----------------------------------------------------------------------------- evaluation


def evaluate(model, tokenizer, rows: list[dict], reward_set: RewardSet, cfg: TrainConfig,
             encode=None) -> dict:
    """Greedy held-out accuracy and layout validity (the reward set's accuracy / step_rvr).
    ``encode(tokenizer, prompt) -> ids`` (default ``tokenizer.encode_prompt``)."""
    if not rows:
        return {"accuracy": math.nan, "validity": math.nan}
    encode = encode or encode_prompt
    prompts = [encode(tokenizer, r["prompt"]) for r in rows]
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
    def __init__(self, total: int, enabled: bool, initial: int = 0):
        self.bar = None
        self.enabled = enabled
        self.total = total
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, file=sys.stderr, dynamic_ncols=True,
                                desc="stepgrpo")
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


_RUNTIME_FIELDS = {"resume", "out_dir", "save_every", "keep_last", "progress", "threads", "device",
                   "plot", "save", "sample_every", "eval_every", "eval_size", "gen_batch_size",
                   "micro_batch_tokens", "attn_implementation", "dp_strategy", "backend"}


def _restore_logs(path: Path, start: int) -> list[dict]:
    """Keep the lines of a JSONL log with ``step <= start`` (a killed run may have logged a
    step after its last checkpoint); returns them parsed."""
    if not path.is_file():
        return []
    kept, rows = [], []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by the kill
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= start:
            kept.append(line)
            rows.append(row)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in kept))
    tmp.replace(path)
    return rows


def _full_state_dict(model) -> dict | None:
    """FSDP2 (DTensor parameters): the gathered full state dict (a collective); else None."""
    if not any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def run(cfg: TrainConfig, model=None, tokenizer=None) -> dict:
    """Train; returns the summary (eval before/after and the last step's metrics).

    Under ``torchrun`` every rank calls this; rank 0 evaluates, logs and writes the outputs
    (other ranks return ``{}``)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info = dist_.init_distributed(device=None if cfg.device == "auto" else cfg.device)
    try:
        return _run(cfg, model, tokenizer, info)
    finally:
        if owns_group:
            dist_.cleanup_distributed()


def _run(cfg: TrainConfig, model, tokenizer, info: dist_.DistInfo) -> dict:
    world, rank, main = info.world_size, info.rank, info.is_main
    if world > 1:
        device = info.device
        if cfg.prompts_per_step < world:
            raise ConfigError(f"invalid --prompts-per-step {cfg.prompts_per_step}: must be >= the "
                              f"number of processes ({world}); each rank generates whole groups")
    else:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + rank)  # ranks sample different completions
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # preset: its model and hyper-parameters, except what the user set explicitly
    preset = None
    if cfg.preset:
        from fastgrpo.presets import apply_preset, get_preset
        preset = get_preset(cfg.preset)
        explicit = explicit_fields(cfg)
        for first in (True, False):  # rank 0 first: it may convert the model once, the others reuse it
            if main == first:
                cfg = apply_preset(cfg, cfg.preset, explicit=explicit, resolve_model=model is None)
            dist_.barrier()
        cfg = cfg.validate()

    # model, reference model, data, rewards
    train_rows, eval_rows = load_data(cfg)
    if model is None:
        backend = select_attention(cfg.attn_implementation, device)
        model, tokenizer = load_model(cfg.model or None, device=device, attn_implementation=backend)
    elif cfg.attn_implementation != "auto":
        apply_attention(model, select_attention(cfg.attn_implementation, device))
    model.to(device)
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.config.use_cache = True  # generation still uses the KV cache
    ref_model = None
    if cfg.beta > 0:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    policy = dist_.wrap_model(model, device, strategy=cfg.dp_strategy)
    model = dist_.unwrap_model(policy)  # generation, eval, checkpoints, final save
    layout = TAG_LAYOUT if preset is not None and preset.layout == "tag" else None
    reward_set = build_reward_set(cfg, layout)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    if preset is not None and preset.use_chat_template:
        from fastgrpo.presets import encode_chat_prompt

        def encode(tok, text):
            return encode_chat_prompt(tok, text, preset)
    else:
        encode = encode_prompt
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    prompt_cache: dict[int, list[int]] = {}

    def prompt_ids(i: int) -> list[int]:
        if i not in prompt_cache:
            prompt_cache[i] = encode(tokenizer, train_rows[i]["prompt"])
        return prompt_cache[i]

    # resume (after every set-up step, so the restored RNG states are the next ones drawn)
    order: list[int] = []
    rng = random.Random(cfg.seed)
    start, extra, before = 0, {}, None
    path = dist_.broadcast_object(resolve_resume(cfg.resume, out_dir) if main else None)
    if path is not None:
        extra = load_checkpoint(path, model, optimizer, None, rank=rank)
        start = int(extra["step"])
        data = extra.get("data")
        if not isinstance(data, dict) or "rng" not in data or "order" not in data:
            raise CheckpointError(f"checkpoint {path} holds no data position (not written by "
                                  f"fastgrpo.train); cannot resume from it")
        rng.setstate(data["rng"])
        order = list(data["order"])
        before = extra.get("eval_before")
        if main:
            print(f"resuming from checkpoint {path} (step {start} of {cfg.steps})", file=sys.stderr)
            if extra.get("stopped"):
                print(f"note: that run stopped after it: {extra['stopped']}", file=sys.stderr)
            saved = extra.get("config") or {}
            now = dataclasses.asdict(cfg)
            diff = sorted(k for k in saved if k in now and k not in _RUNTIME_FIELDS and saved[k] != now[k])
            if diff:
                print("warning: options differ from the checkpointed run: "
                      + ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in diff), file=sys.stderr)
    elif cfg.resume == "auto" and main:
        print(f"--resume auto: no checkpoint under {out_dir / 'checkpoints'}; starting fresh", file=sys.stderr)

    G = cfg.group_size
    # greedy eval: rank 0 alone, except under FSDP2 where every rank runs it (forwards of
    # sharded modules must stay in step across ranks)
    fsdp = any(hasattr(m, "unshard") and hasattr(m, "reshard") for m in policy.modules())
    evaluator = main or fsdp

    if before is None:
        with dist_.gather_for_generation(policy):
            before = evaluate(model, tokenizer, eval_rows, reward_set, cfg, encode) if evaluator else {}
        if main:
            print(f"eval before: accuracy {before['accuracy']:.3f}  validity {before['validity']:.3f}",
                  file=sys.stderr)
    history: list[dict] = []
    metrics_f = samples_f = None
    if main:
        if start > 0:
            history = _restore_logs(out_dir / "metrics.jsonl", start)
            _restore_logs(out_dir / "samples.jsonl", start)
        mode = "a" if start > 0 else "w"
        metrics_f = (out_dir / "metrics.jsonl").open(mode)
        samples_f = (out_dir / "samples.jsonl").open(mode)
    progress = _Progress(cfg.steps, cfg.progress and main, initial=start)
    t_start = time.perf_counter() - float(extra.get("seconds", 0.0))

    def checkpoint(done: int, data_state: dict, rng_states: list[dict], **more) -> Path | None:
        ext = {"data": data_state, "config": dataclasses.asdict(cfg), "eval_before": before,
               "seconds": time.perf_counter() - t_start, **more}
        saved = save_checkpoint(out_dir, done, model, optimizer, None, extra=ext,
                                keep_last=cfg.keep_last, rng_states=rng_states, write=main)
        dist_.barrier()
        return saved

    for step in range(start, cfg.steps):
        # the state a checkpoint of `step` completed steps holds (used if this step fails)
        at_start = {"data": {"rng": rng.getstate(), "order": list(order)}, "rng": capture_rng_state()}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)

        # 1. rollout: G samples for each of prompts_per_step prompts; each rank whole groups
        if len(order) < cfg.prompts_per_step:
            more = list(range(len(train_rows)))
            rng.shuffle(more)
            order += more
        idx, order = order[:cfg.prompts_per_step], order[cfg.prompts_per_step:]
        mine = [idx[g] for g in dist_.groups_for_rank(len(idx), rank, world)]
        gen_error = None
        with dist_.gather_for_generation(policy):
            try:
                ro: Rollout = generate(model, tokenizer, [prompt_ids(i) for i in mine], group_size=G,
                                       max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                       top_p=cfg.top_p, do_sample=True, batch_size=cfg.gen_batch_size)
            except RuntimeError as e:  # torch.multinomial on NaN/inf probabilities
                if "probability tensor contains" not in str(e):
                    raise
                gen_error = str(e)
        if dist_.is_distributed():  # every rank stops together
            gen_error = next((x for x in dist_.all_gather_objects(gen_error) if x), None)
        if gen_error is not None:
            raise NonFiniteLossError(
                f"non-finite logits while sampling the rollouts of step {step + 1} ({gen_error}): "
                f"the parameters after step {step} already diverge; the run stops here. Resume from "
                f"an earlier checkpoint (--resume DIR) with a lower --lr or --grad-clip.", step=step + 1)
        rows_of = [mine[p] for p in ro.prompt_index]

        # 2. rewards (local: groups are whole)
        res = reward_set([train_rows[i]["prompt"] for i in rows_of], ro.texts, **_columns(train_rows, rows_of))

        # 3. advantages (+ which completions enter the loss)
        adv, keep = compute_advantages(res.total, G, cfg)
        truncated = torch.tensor(ro.truncated, dtype=torch.bool)
        if cfg.mask_truncated:
            keep &= ~truncated
        keep &= torch.tensor([len(c) > 0 for c in ro.completion_ids], dtype=torch.bool)
        use = keep.nonzero().flatten().tolist()

        # gather the kept sequences and the statistics of every rank (rank order = global order)
        parts = dist_.all_gather_objects({
            "prompt_ids": [ro.prompt_ids[i] for i in use], "completion_ids": [ro.completion_ids[i] for i in use],
            "adv": adv[use].tolist(), "total": res.total, "per_function": res.per_function,
            "lens": [len(c) for c in ro.completion_ids], "truncated": ro.truncated,
            "gen_tokens": ro.generated_tokens, "gen_seconds": ro.seconds})
        P = [x for p in parts for x in p["prompt_ids"]]
        C = [x for p in parts for x in p["completion_ids"]]
        A = [x for p in parts for x in p["adv"]]
        total = [x for p in parts for x in p["total"]]
        stats = RewardResult(total, {k: [x for p in parts for x in p["per_function"][k]] for k in res.per_function},
                             res.weights).stats()
        lens = [x for p in parts for x in p["lens"]]
        trunc_all = [x for p in parts for x in p["truncated"]]
        gen_tokens = sum(p["gen_tokens"] for p in parts)
        gen_seconds = max(p["gen_seconds"] for p in parts)

        # 4. pack (length-balanced over ranks) + optimise
        t_train = time.perf_counter()
        if P:
            lengths = [len(p) + len(c) for p, c in zip(P, C)]
            plan = dist_.balance_microbatches(lengths, cfg.micro_batch_tokens, world)
            batches = [mb.to(device) for mb in dist_.pack_bins(plan[rank], P, C, A, pad_token_id=pad_id)]
            train_tokens = sum(lengths) * cfg.ppo_epochs
            try:
                lm = optimize(policy, optimizer, batches, cfg, ref_model, step=step + 1)
            except NonFiniteLossError as e:
                e.step = step + 1
                ok = step > 0 and not getattr(e, "params_updated", False)
                ok = ok and dist_.global_sum(0.0 if params_are_finite(model) else 1.0) == 0
                if ok:
                    saved = checkpoint(step, at_start["data"], dist_.all_gather_objects(at_start["rng"]),
                                       stopped=str(e))
                    if main:
                        print(f"saved the last completed step ({step}) to {saved} before stopping",
                              file=sys.stderr)
                elif main:
                    print("no checkpoint written for the failed step (the parameters were already "
                          "changed or are not finite); resume from the last periodic checkpoint",
                          file=sys.stderr)
                raise
        else:  # every group had equal rewards: nothing to learn from this batch
            batches, train_tokens = [], 0
            lm = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_ratio/low_mean": 0.0,
                  "clip_ratio/high_mean": 0.0, "clip_ratio/region_mean": 0.0, "ratio/min": 1.0,
                  "ratio/mean": 1.0, "ratio/max": 1.0, "logp": 0.0, "grad_norm": 0.0}
        train_seconds = time.perf_counter() - t_train

        # 5. log (rank 0)
        rew = torch.tensor(total)
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
            "truncated_frac": sum(trunc_all) / len(trunc_all),
            "kept_frac": len(P) / len(total), "micro_batches": len(batches),
            "gen_tokens_per_s": gen_tokens / max(gen_seconds, 1e-9),
            "train_tokens_per_s": train_tokens / max(train_seconds, 1e-9),
            "gen_seconds": gen_seconds, "train_seconds": train_seconds,
            "peak_mem_mb": _peak_memory_mb(device),
        })
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            with dist_.gather_for_generation(policy):
                ev = evaluate(model, tokenizer, eval_rows, reward_set, cfg, encode) if evaluator else {}
                if main:
                    m["eval/accuracy"], m["eval/validity"] = ev["accuracy"], ev["validity"]
                    progress.write(f"step {step + 1}: eval accuracy {ev['accuracy']:.3f}  "
                                   f"validity {ev['validity']:.3f}")
        if main:
            line = _to_json(m)
            metrics_f.write(line + "\n")
            metrics_f.flush()
            print(line, flush=True)
            history.append(m)
            if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                i = 0  # rank 0 generated the first group
                samples_f.write(json.dumps({"step": step + 1, "prompt": train_rows[rows_of[i]]["prompt"],
                                            "completion": ro.texts[i], "reward": res.total[i]}) + "\n")
                samples_f.flush()
                progress.write(f"--- sample at step {step + 1} (reward {res.total[i]:.2f})\n"
                               f"{train_rows[rows_of[i]]['prompt']}\n{ro.texts[i]}\n---")
        progress.update(step, f"reward {m['reward/mean']:.3f} acc {m['accuracy']:.2f}")

        # 6. checkpoint (every rank: RNG states and FSDP2 gathering are collective)
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            checkpoint(step + 1, {"rng": rng.getstate(), "order": list(order)}, dist_.gather_rng_states())

    progress.close()
    if main:
        metrics_f.close()
        samples_f.close()
    with dist_.gather_for_generation(policy):
        after = evaluate(model, tokenizer, eval_rows, reward_set, cfg, encode) if evaluator else {}
    full_sd = _full_state_dict(model) if cfg.save else None  # FSDP2: collective
    if not main:
        return {}
    summary = {"eval_before": before, "eval_after": after, "steps": cfg.steps,
               "seconds": round(time.perf_counter() - t_start, 1),
               "last": history[-1] if history else {}}
    if start > 0:
        summary["resumed_from_step"] = start
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.plot and history:
        from fastgrpo.plot import plot_curves
        plot_curves(history, before, after, out_dir / "curves.png")
    if cfg.save:
        if full_sd is not None:
            model.save_pretrained(out_dir / "model", state_dict=full_sd)
        else:
            model.save_pretrained(out_dir / "model")
        tokenizer.save_pretrained(out_dir / "model")
    print(f"held-out greedy ({len(eval_rows)} problems)   accuracy   validity\n"
          f"  before StepGRPO                {before['accuracy']:8.3f}   {before['validity']:8.3f}\n"
          f"  after  StepGRPO                {after['accuracy']:8.3f}   {after['validity']:8.3f}\n"
          f"({summary['seconds']} s, outputs in {out_dir})")
    return summary


def main(argv: list[str] | None = None) -> None:
    """CLI entry point.  Exit codes: 2 for configuration/data/checkpoint errors, 3 when the
    loss or gradient norm became NaN/inf (the message names the step)."""
    from fastgrpo.task import DataError
    try:
        cfg = parse_args(argv)
        run(cfg)
    except (ConfigError, DataError, FileNotFoundError, CheckpointError, AttentionBackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(3)


if __name__ == "__main__":
    main()
