"""StepGRPO training loop: ``python -m fastgrpo.train [--flags]`` (``--help`` lists them all).

One step (:func:`_train`), as ``STEPGRPO.md`` describes the method::

    rollout      G samples for each of prompts_per_step prompts (each rank: whole groups)
    score        the reward set (StepRAR + StepRVR by default) on every sample
    advantages   group-normalised; groups without signal, truncated and empty samples dropped
    gather       every rank's kept samples and statistics (rank order = global order)
    pack         length-balanced first-fit-decreasing micro-batches, restarting position ids
    learn        backbone hidden states -> fused loss -> backward -> optimizer step (learn.py)
    log / evaluate / checkpoint

The pieces around it live in their own modules: the task (``task.py``), the run's set-up,
resume and preflight checks (``setup.py``), its state (``state.py``), identity
(``identity.py``), signals (``signals.py``) and finish (``finish.py``), the sample type
(``sample.py``), generation (``rollout.py``), packing, the learning step (``learn.py``), the
policy model and its wrapping for data parallelism (``policy.py``), collectives
(``distributed.py``), checkpoints (``checkpoint.py``) and logs (``logs.py``);
``docs/architecture.md`` draws the layers and one step's data path.

Robustness and scale (all off or automatic by default):

* ``--save-every N`` writes an atomic, verified checkpoint (weights, optimizer, RNG states, data
  position) to ``<out-dir>/checkpoints/step-N`` (``--keep-last`` of them are kept);
  ``--resume auto`` (or a directory) continues a killed run exactly where it stopped: the
  same LR schedule, data order and random numbers, metrics appended to ``metrics.jsonl``;
  checkpoints hold ``config.json`` and the tokenizer too, so each one loads as ``--model``.
* A NaN/inf loss or gradient norm stops the run before the optimizer step with an error naming
  the step (exit code 3); when the parameters are still finite, a checkpoint of the last
  completed step is written first (its ``extra["stopped"]`` says why).
* ``torchrun --nproc-per-node K -m fastgrpo.train ...``: data parallel (DDP on CPU/gloo, FSDP2
  on CUDA; ``--dp-strategy``).  Each rank generates whole prompt groups; the kept samples are
  gathered and length-balanced over the ranks; the loss is normalised over the global batch,
  so K processes compute the same update as one process given the same rollouts.
* ``--task NAME`` or ``--task module.path:TASK``: a ``fastgrpo.trainer.task.Task`` supplies the
  data, rewards, prompt encoding and held-out eval, and may replace the rollout, score and
  advantage stages (one hook call at the top of each): e.g. ``fastgrpo.tasks.routing``'s
  multi-turn rollouts against knowledge bases (``--rollout-mode online``).
* ``--attn-implementation`` picks the packed-row attention backend; ``--preset`` loads a named
  model + hyper-parameter set (``fastgrpo.trainer.presets``), explicit options still win.

Defaults: the shipped warm-up checkpoint (``fastgrpo/tasks/arithmetic/checkpoint``) on the built-in
arithmetic task; runs on a 2-core CPU in a few minutes and prints held-out greedy accuracy and
validity before and after.  ``--task charts``: the shipped tiny Qwen2-VL chart warm-up
(``fastgrpo/tasks/charts/checkpoint``) with ``fastgrpo.tasks.charts.CHARTS_TRAIN_DEFAULTS``
for the options not given explicitly.  Outputs in ``--out-dir``: ``metrics.jsonl`` (one strict JSON line
per step, NaN/inf as null; stdout gets a short human line under ``--no-progress``),
``samples.jsonl``, ``curves.png``, ``summary.json`` and ``model/``.

The run owns ``--out-dir`` (``outdir.py``: a pid lock file; a fresh run refuses an earlier
run's outputs unless ``--overwrite``); a resume must match the checkpoint's run identity
(``identity.run_identity``, or ``--resume-force``); SIGINT/SIGTERM keep the promise their message
makes in each phase (``signals.RunSignals``): set-up and the initial eval stop at once without training,
a step finishes and is checkpointed, a periodic eval stops and its step is checkpointed, the
final eval stops after the model is saved; exit 130/143 (a second signal exits at once).  The
finish (``finish.finish_run``) goes in order of importance: ``model/`` written like a checkpoint
(temporary directory, verified, renamed), the final eval, ``summary.json``, the plot, the
report; a failure of the last three is a warning.  A failed write (disk full) is a
``diskio.WriteError``: ``error:`` naming the file and the bytes it needed, the newest
checkpoint and the ``--resume`` command, exit 2.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastgrpo.ops.advantages import constant_groups, group_advantages
from fastgrpo.rewards import RewardError, RewardResult
from fastgrpo.tasks.data import DataError
from fastgrpo.trainer import distributed as dist_
from fastgrpo.trainer.attention import AttentionBackendError
from fastgrpo.trainer.checkpoint import (CheckpointError, NonFiniteLossError, capture_rng_state,
                                         params_are_finite)
from fastgrpo.trainer.config import ConfigError, TrainConfig, parse_args
from fastgrpo.trainer.correction import apply_tis
from fastgrpo.trainer.diskio import WriteError
from fastgrpo.trainer.engines import close_engines
from fastgrpo.trainer.evaluation import build_reward_set, columns, evaluate
from fastgrpo.trainer.finish import finish_run, resume_hint, warn_piece
from fastgrpo.trainer.identity import run_identity
from fastgrpo.trainer.learn import NO_UPDATE_METRICS, batch_logprobs, lr_at, optimize
from fastgrpo.trainer.logs import Progress, RunLog, peak_memory_mb
from fastgrpo.trainer.packing import MicroBatch, balance_microbatches, pack_bins
from fastgrpo.trainer.policy import gather_for_generation
from fastgrpo.trainer.requirements import check_dependencies
from fastgrpo.trainer.rollout import Rollout
from fastgrpo.trainer.sample import Sample
from fastgrpo.trainer.setup import check_device, claim_out_dir, preflight, resume_run, setup_run
from fastgrpo.trainer.signals import RunSignals, StopPhase, TrainingInterrupted
from fastgrpo.trainer.state import RunState
from fastgrpo.trainer.task import load_task

__all__ = ["main", "run", "optimize", "compute_advantages", "batch_logprobs", "evaluate",
           "build_reward_set", "load_data", "lr_at", "run_identity", "TrainingInterrupted"]


def load_data(cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """Train and eval rows of ``cfg.task`` (``Task.load_data`` after ``Task.configure``)."""
    task = load_task(cfg.task)
    return task.load_data(task.configure(cfg))


def compute_advantages(rewards: list[float], group_size: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-completion advantages and a keep mask (False for groups whose rewards are all
    equal when ``cfg.drop_zero_std_groups``: their advantages are exactly 0)."""
    r = torch.tensor(rewards, dtype=torch.float32)
    adv = group_advantages(r, group_size=group_size, scale=cfg.scale_rewards)
    keep = torch.ones(len(rewards), dtype=torch.bool)
    if cfg.drop_zero_std_groups:
        keep = ~constant_groups(r, group_size=group_size)
    return adv, keep


def _rollout(r: RunState, step: int) -> Rollout:
    """G samples for each of this step's prompts from the rollout engine (``--rollout``); this
    rank generates whole groups only."""
    if r.task.rollout is not None:  # e.g. multi-turn tool rollouts (--rollout-mode online)
        return r.task.rollout(r, step)
    cfg = r.cfg
    idx = r.prompts.take(cfg.prompts_per_step)
    mine = [idx[g] for g in dist_.groups_for_rank(len(idx), r.info.rank, r.info.world_size)]
    error = None
    with gather_for_generation(r.policy):
        try:
            r.engine.wake()
            r.engine.sync_weights(r.model)  # the weights after the last optimizer step
            vkw = {} if r.vision is None else r.vision.generate_kwargs(
                [r.train_rows[i] for i in mine], r.encode)[1]
            ro = r.engine.generate([r.prompt_ids(i) for i in mine], group_size=cfg.group_size,
                                   max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                   top_p=cfg.top_p, do_sample=True, **_sampling(cfg), **vkw)
            r.engine.sleep()
        except RuntimeError as e:  # torch.multinomial on NaN/inf probabilities
            if "probability tensor contains" not in str(e):
                raise
            error = str(e)
    if dist_.is_distributed():  # every rank stops together
        error = next((x for x in dist_.all_gather_objects(error) if x), None)
    if error is not None:
        raise NonFiniteLossError(
            f"non-finite logits while sampling the rollouts of step {step + 1} ({error}): the "
            f"parameters after step {step} already diverge; the run stops here. Resume from an "
            f"earlier checkpoint (--resume DIR) with a lower --lr or --grad-clip.", step=step + 1)
    for s in ro.samples:
        s.row = mine[s.group]
    return ro


def _sampling(cfg: TrainConfig) -> dict:
    """The sampling options besides temperature / top-p (only those set: every engine takes
    the defaults)."""
    out = {"top_k": cfg.top_k, "min_p": cfg.min_p, "repetition_penalty": cfg.repetition_penalty,
           "stop": cfg.stop}
    off = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "stop": []}
    return {k: v for k, v in out.items() if v != off[k]}


def _importance_weights(r: RunState, batches: list[MicroBatch], kept: list[Sample]) -> dict:
    """``--rollout-is``: truncated importance weights on the engine's log-probs (in the
    batches' advantages) and the log-prob mismatch metrics; ``{}`` when off."""
    on = {"on": True, "off": False}.get(r.cfg.rollout_is, r.engine.name != "hf")
    if not on or not batches or any(s.sampling_logp is None for s in kept):
        return {}
    return apply_tis(batches, kept, batch_logprobs(r.policy, batches, r.cfg), r.cfg.rollout_is_cap)


def _score(r: RunState, samples: list[Sample]) -> RewardResult:
    """The reward set on every sample (local: groups are whole)."""
    if r.task.score is not None:
        return r.task.score(r, samples)
    rows = [s.row for s in samples]
    res = r.reward_set([r.train_rows[i]["prompt"] for i in rows], [s.text for s in samples],
                       **columns(r.train_rows, rows))
    for s, total in zip(samples, res.total):
        s.reward = total
    return res


def _advantages(r: RunState, samples: list[Sample], rewards: list[float]) -> list[Sample]:
    """Group advantages; returns the samples that enter the loss."""
    if r.task.advantages is not None:  # e.g. per-step rewards -> per-token advantages
        return r.task.advantages(r, samples, rewards)
    adv, keep = compute_advantages(rewards, r.cfg.group_size, r.cfg)
    for s, a in zip(samples, adv.tolist()):
        s.advantage = a
    if r.cfg.mask_truncated:
        keep &= ~torch.tensor([s.truncated for s in samples], dtype=torch.bool)
    keep &= torch.tensor([len(s.completion_ids) > 0 for s in samples], dtype=torch.bool)
    return [samples[i] for i in keep.nonzero().flatten().tolist()]


@dataclass
class _Gathered:
    """The global batch: every rank's kept samples and the statistics of all samples."""
    kept: list[Sample]
    rewards: RewardResult
    lengths: list[int]
    truncated: list[bool]
    gen_tokens: int
    gen_seconds: float


def _gather(kept: list[Sample], ro: Rollout, res: RewardResult) -> _Gathered:
    parts = dist_.all_gather_objects({
        "kept": kept, "total": res.total, "per_function": res.per_function,
        "lens": [len(s.completion_ids) for s in ro.samples],
        "truncated": [s.truncated for s in ro.samples],
        "gen_tokens": ro.generated_tokens, "gen_seconds": ro.seconds})
    flat = lambda key: [x for p in parts for x in p[key]]  # noqa: E731
    rewards = RewardResult(flat("total"), {k: [x for p in parts for x in p["per_function"][k]]
                                           for k in res.per_function}, res.weights)
    return _Gathered(flat("kept"), rewards, flat("lens"), flat("truncated"),
                     sum(p["gen_tokens"] for p in parts), max(p["gen_seconds"] for p in parts))


def _pack(r: RunState, samples: list[Sample]) -> list[MicroBatch]:
    """This rank's micro-batches of the length-balanced plan for the global batch."""
    if not samples:
        return []
    tok = r.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    plan = balance_microbatches([s.num_tokens for s in samples], r.cfg.micro_batch_tokens,
                                r.info.world_size)
    batches = pack_bins(plan[r.info.rank], samples, pad_token_id=pad)
    if r.vision is not None:  # pixel values in sequence order, per-sequence mrope positions
        r.vision.attach(batches, samples, r.model)
    return [mb.to(r.device) for mb in batches]


def _learn(r: RunState, batches: list[MicroBatch], step: int, at_start: dict) -> dict:
    """One optimizer step on the batch; a non-finite loss writes an emergency checkpoint of the
    last completed step (when the parameters are still finite) and stops the run."""
    if not batches:  # every group had equal rewards: nothing to learn from this batch
        return dict(NO_UPDATE_METRICS)
    try:
        return optimize(r.policy, r.optimizer, batches, r.cfg, r.ref_model, step=step + 1)
    except NonFiniteLossError as e:
        e.step = step + 1
        ok = step > 0 and not getattr(e, "params_updated", False)
        ok = ok and dist_.global_sum(0.0 if params_are_finite(r.model) else 1.0) == 0
        if ok:
            saved = r.checkpoint(step, at_start["data"], dist_.all_gather_objects(at_start["rng"]),
                                 stopped=str(e))
            if r.main:
                print(f"saved the last completed step ({step}) to {saved} before stopping",
                      file=sys.stderr)
        elif r.main:
            print("no checkpoint written for the failed step (the parameters were already "
                  "changed or are not finite); resume from the last periodic checkpoint",
                  file=sys.stderr)
        raise


def _step_metrics(r: RunState, step: int, g: _Gathered, lm: dict, batches: list[MicroBatch],
                  train_seconds: float) -> dict:
    """The step's line of ``metrics.jsonl``."""
    rew = torch.tensor(g.rewards.total)
    m = {"step": step + 1, "lr": lr_at(step, r.cfg),
         "reward/mean": float(rew.mean()), "reward/std": float(rew.std()) if len(rew) > 1 else 0.0}
    for name, s in g.rewards.stats().items():
        m[f"rewards/{name}/mean"] = s["mean"] if s["count"] else 0.0
        m[f"rewards/{name}/std"] = s["std"] if s["count"] > 1 else 0.0
    for key, name in r.task.metric_aliases.items():  # accuracy, step_k, validity (arithmetic)
        m[key] = m.get(f"rewards/{name}/mean", 0.0)
    train_tokens = sum(s.num_tokens for s in g.kept) * r.cfg.ppo_epochs
    m.update({
        "kl": lm["kl"], "clip_ratio/low": lm["clip_ratio/low_mean"],
        "clip_ratio/high": lm["clip_ratio/high_mean"], "clip_ratio/region": lm["clip_ratio/region_mean"],
        "entropy": lm["entropy"], "ratio/min": lm["ratio/min"], "ratio/mean": lm["ratio/mean"],
        "ratio/max": lm["ratio/max"], "loss": lm["loss"], "grad_norm": lm["grad_norm"],
        "completion_len/mean": sum(g.lengths) / len(g.lengths), "completion_len/max": max(g.lengths),
        "truncated_frac": sum(g.truncated) / len(g.truncated),
        "kept_frac": len(g.kept) / len(g.rewards.total), "micro_batches": len(batches),
        "gen_tokens_per_s": g.gen_tokens / max(g.gen_seconds, 1e-9),
        "train_tokens_per_s": train_tokens / max(train_seconds, 1e-9),
        "gen_seconds": g.gen_seconds, "train_seconds": train_seconds,
        "peak_mem_mb": peak_memory_mb(r.device),
    })
    return m


def _train(r: RunState, signals: "RunSignals") -> dict:
    cfg = r.cfg
    with signals.phase("stopping the set-up; the run ends before training (nothing is "
                       "trained or written)", interrupt=True):
        extra = resume_run(r)
    if r.before is None:
        with signals.phase("stopping the initial evaluation; the run ends before training "
                           "(nothing is trained or written)", interrupt=True):
            r.before = r.evaluate()
        if r.main:
            print(f"eval before: {r.task.eval_line(r.before)}", file=sys.stderr)
    log = RunLog(r.out_dir, r.start, r.main, total=cfg.steps, report_to=cfg.report_to,
                 stdout=not cfg.progress, config=dataclasses.asdict(cfg))
    progress = Progress(cfg.steps, cfg.progress and r.main, initial=r.start)
    r.t_start = time.perf_counter() - float(extra.get("seconds", 0.0))
    exit_code = 1  # a failure, a signal or a second signal's SystemExit: the loggers say failed
    try:
        _loop(r, log, progress, signals)
        exit_code = 0
    except TrainingInterrupted as e:
        exit_code = e.exit_code
        raise
    finally:
        progress.close()
        try:
            log.close(exit_code)
        except Exception as e:  # noqa: BLE001 - a logger must not decide the run's fate
            if exit_code != 0:
                raise
            warn_piece("the loggers (closing metrics.jsonl / --report-to)", e, r)
    return finish_run(r, log.history, signals)


def _loop(r: RunState, log: RunLog, progress: Progress, signals: RunSignals) -> None:
    cfg = r.cfg
    collapsed: list[int] = []  # the current run of steps whose every group had equal rewards
    for step in range(r.start, cfg.steps):
        # what a checkpoint of `step` completed steps holds (written if this step fails)
        at_start = {"data": r.prompts.state_dict(), "rng": capture_rng_state()}
        for group in r.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        ro = _rollout(r, step)
        res = _score(r, ro.samples)
        kept = _advantages(r, ro.samples, res.total)
        g = _gather(kept, ro, res)
        t_train = time.perf_counter()
        batches = _pack(r, g.kept)
        tis = _importance_weights(r, batches, g.kept)
        lm = _learn(r, batches, step, at_start)
        m = {**_step_metrics(r, step, g, lm, batches, time.perf_counter() - t_train), **tis}
        collapsed = _watch_collapse(r, progress, g, step, collapsed)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            _evaluate_during(r, m, progress, step, signals)
        log.metrics(m)
        if r.main and cfg.sample_every and ((step + 1) % cfg.sample_every == 0 or step == r.start):
            _log_sample(r, log, progress, step, ro.samples[0])  # rank 0 generated the first group
        progress.update(step, f"reward {m['reward/mean']:.3f} acc {m['accuracy']:.2f}")
        saved = None
        if cfg.save_every and (step + 1) % cfg.save_every == 0:  # every rank: collective
            saved = r.checkpoint(step + 1, r.prompts.state_dict(), dist_.gather_rng_states())
        _stop_if_signalled(r, signals, step, saved)


def _watch_collapse(r: RunState, progress: Progress, g: _Gathered, step: int,
                    collapsed: list[int]) -> list[int]:
    """Warn once ``--collapse-warn-steps`` steps in a row had no group with signal; returns
    the current run of such steps."""
    cfg = r.cfg
    equal = bool(constant_groups(torch.tensor(g.rewards.total), group_size=cfg.group_size).all())
    collapsed = collapsed + [step + 1] if equal else []
    if r.main and cfg.collapse_warn_steps and len(collapsed) == cfg.collapse_warn_steps:
        progress.write(f"warning: steps {collapsed[0]}-{collapsed[-1]}: every group's "
                       f"completions got equal rewards, so nothing was trained (zero "
                       f"advantages); check the reward functions, the data and --temperature")
    return collapsed


def _evaluate_during(r: RunState, m: dict, progress: Progress, step: int, signals: RunSignals) -> None:
    try:
        with signals.phase(f"stopping this evaluation; step {step + 1} is checkpointed, then the "
                           f"run exits", interrupt=True):
            ev = r.evaluate()
    except StopPhase:
        if r.main:
            progress.write(f"step {step + 1}: evaluation stopped")
        return
    if r.main:
        m.update({f"eval/{k}": v for k, v in ev.items() if isinstance(v, float)})
        progress.write(f"step {step + 1}: eval {r.task.eval_line(ev)}")


def _stop_if_signalled(r: RunState, signals: RunSignals, step: int, saved: Path | None) -> None:
    """After the first SIGINT/SIGTERM: a checkpoint of this step (unless just written), then
    ``TrainingInterrupted`` (exit 130/143 from the CLI)."""
    signum = signals.stop_requested()
    if signum is None:
        return
    if saved is None:
        saved = r.checkpoint(step + 1, r.prompts.state_dict(), dist_.gather_rng_states())
    raise TrainingInterrupted(
        f"{signal.Signals(signum).name}: stopped after step {step + 1} of {r.cfg.steps}; "
        f"checkpoint {saved}. Resume with the same command plus --resume auto "
        f"(or --resume {saved})", signum)


def _log_sample(r: RunState, log: RunLog, progress: Progress, step: int, s: Sample) -> None:
    prompt = r.train_rows[s.row]["prompt"]
    log.sample({"step": step + 1, "prompt": prompt, "completion": s.text, "reward": s.reward})
    progress.write(f"--- sample at step {step + 1} (reward {s.reward:.2f})\n{prompt}\n{s.text}\n---")


def run(cfg: TrainConfig, model=None, tokenizer=None) -> dict:
    """Train; returns the summary (eval before/after and the last step's metrics).

    Under ``torchrun`` every rank calls this; rank 0 evaluates, logs and writes the outputs
    (other ranks return ``{}``)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    check_device(cfg.device)
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info = dist_.init_distributed(device=None if cfg.device == "auto" else cfg.device)
    lock = r = None
    finished = False  # every rank got through the run: safe to wait for the others
    try:
        check_dependencies(cfg)
        with RunSignals() as signals:  # the whole run: set-up, the evals before and after included
            try:
                with signals.phase("stopping the set-up; the run ends before training (nothing "
                                   "is trained or written)", interrupt=True):
                    lock = claim_out_dir(cfg, info)
                    r = setup_run(cfg, model, tokenizer, info)
                    preflight(r)
                summary = _train(r, signals)
                finished = True
                return summary
            except StopPhase as e:
                raise TrainingInterrupted(
                    f"{signal.Signals(e.signum).name}: stopped before training; nothing was "
                    f"trained or written (run the same command again to start)", e.signum) from None
    except WriteError as e:
        if info.is_main:
            e.hint = resume_hint(cfg)
        raise
    finally:
        if r is not None:
            r.task.close()
            close_engines(r.engine, r.task.eval_engine)  # before the process group goes
        if lock is not None:
            lock.release()
        if owns_group:  # a finished run's ranks meet before the group goes (no rank tears
            # down gloo while another is still in the run's last collective)
            dist_.cleanup_distributed(synchronize=finished)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point.  Exit codes: 2 for configuration/data/checkpoint/reward errors and failed
    writes (disk full: the message names the file and the checkpoint to resume from), 3 when
    the loss or gradient norm became NaN/inf (the message names the step), 130/143 when
    SIGINT/SIGTERM stopped the run (after a checkpoint; the message says how to resume)."""
    try:
        run(parse_args(argv))
    except (ConfigError, DataError, FileNotFoundError, CheckpointError, AttentionBackendError,
            RewardError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(3)
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code)
