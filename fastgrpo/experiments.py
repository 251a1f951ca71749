"""Experiments built on the trainer: ``python -m fastgrpo.experiments ablation --seeds 5``.

``ablation`` runs R1-VL's reward ablation in miniature on the built-in task: every arm trains
the same warm-up model for the same steps with the same seeds; only the reward set differs.

==========  ======================  ==============================================================
arm         ``--rewards``           what it is
==========  ======================  ==============================================================
warmup      (no training)           the warm-up (SFT) model itself
outcome     ``accuracy``            outcome-only GRPO: 1 for a correct final answer, else 0
step_rar    ``step_rar``            StepRAR alone: accuracy plus the key-step bonus ``alpha * k``
step_rvr    ``accuracy,step_rvr``   StepRVR with the outcome reward (validity alone says nothing
                                    about correctness, so this arm keeps the accuracy term)
stepgrpo    ``step_rar,step_rvr``   StepGRPO: StepRAR + StepRVR, the default of ``fastgrpo.train``
==========  ======================  ==============================================================

Each (arm, seed) run writes ``<out>/<arm>/seed-<s>/`` like ``fastgrpo.train`` does; a run whose
``summary.json`` exists is not run again and a killed run resumes from its last checkpoint, so
a killed experiment continues where it stopped.  At the end (or with ``--report`` alone) the
held-out greedy accuracy of every arm, mean +- standard error over seeds, and the difference
of each arm to ``outcome`` (in standard errors: paired by seed, and unpaired, the two arms'
standard errors combined) go to ``<out>/ablation.md`` / ``ablation.json``, the curves
(accuracy against step, one line per arm, +-1 s.e. bars) to ``<out>/ablation.png``.  Extra
training options after ``--`` apply to every arm (``-- --steps 30 --group-size 4``);
``--shard I/K`` splits the runs over K processes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

__all__ = ["ARMS", "ablation", "summarize", "main"]

ARMS = {"warmup": None, "outcome": "accuracy", "step_rar": "step_rar",
        "step_rvr": "accuracy,step_rvr", "stepgrpo": "step_rar,step_rvr"}


def _run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / arm / f"seed-{seed}"


def _train_arm(out: Path, arm: str, seed: int, extra: list[str]) -> None:
    from fastgrpo.trainer.config import parse_args
    from fastgrpo.trainer.loop import run

    d = _run_dir(out, arm, seed)
    if (d / "summary.json").is_file():
        print(f"[ablation] {arm} seed {seed}: done already ({d})", file=sys.stderr)
        return
    # an unfinished run resumes from its newest checkpoint; one killed before its first
    # checkpoint starts again (its partial logs are the experiment's own: --overwrite)
    again = ["--resume", "auto"] if any((d / "checkpoints").glob("step-*")) else \
        ["--overwrite"] if d.exists() else []
    argv = ["--rewards", ARMS[arm], "--seed", str(seed), "--out-dir", str(d), "--save-every", "10",
            *again, "--no-progress", "--no-save", *extra]
    print(f"[ablation] {arm} seed {seed}: training ({' '.join(argv)})", file=sys.stderr)
    run(parse_args(argv))


def _curve(d: Path, summary: dict) -> list[tuple[int, float]]:
    """Held-out accuracy against step of one run (``summary``: its summary.json): before,
    every --eval-every steps, after."""
    pts = [(0, summary["eval_before"]["accuracy"])]
    for line in (d / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "eval/accuracy" in m:
            pts.append((m["step"], m["eval/accuracy"]))
    pts.append((summary["steps"], summary["eval_after"]["accuracy"]))
    return pts


def _mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, math.nan
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


def _ratio(diff: float, se: float) -> float:
    """``diff`` in standard errors; NaN when ``se`` is 0 or unknown (one seed)."""
    return diff / se if math.isfinite(se) and se > 0 else math.nan


def _json_safe(x):
    """NaN (a standard error of one seed) -> null: the file stays valid JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def summarize(out: Path, seeds: list[int], arms: list[str]) -> dict:
    """The table, the JSON and the plot from the finished runs under ``out``."""
    from fastgrpo.trainer.plot import plot_bands

    trained = [a for a in arms if a != "warmup"]
    if not trained:
        raise ValueError("the ablation needs at least one training arm besides 'warmup'")
    summaries = {a: [json.loads((_run_dir(out, a, s) / "summary.json").read_text()) for s in seeds]
                 for a in trained}
    curves = {a: [_curve(_run_dir(out, a, s), sm) for s, sm in zip(seeds, summaries[a])] for a in trained}
    any_runs = next(iter(curves.values()))
    final: dict[str, list[float]] = {a: [c[-1][1] for c in cs] for a, cs in curves.items()}
    validity = {a: [sm["eval_after"]["validity"] for sm in sms] for a, sms in summaries.items()}
    if "warmup" in arms:  # greedy eval of the warm-up model: the same for every seed and arm
        final = {"warmup": [c[0][1] for c in any_runs], **final}
        validity["warmup"] = [sm["eval_before"]["validity"] for sm in summaries[trained[0]]]
    rows = {}
    for arm, xs in final.items():
        mean, se = _mean_se(xs)
        # StepRVR's validity of the greedy completions: the layout kept or lost
        row = {"accuracy": xs, "mean": mean, "se": se, "validity": validity[arm],
               "validity_mean": sum(validity[arm]) / len(validity[arm])}
        if "outcome" in final and arm not in ("outcome", "warmup"):
            diff, dse = _mean_se([a - b for a, b in zip(xs, final["outcome"])])
            # unpaired: the two arms' standard errors combined, as if the seeds were unrelated
            use = math.hypot(se, _mean_se(final["outcome"])[1])
            row.update(diff_vs_outcome=diff, diff_se=dse, diff_in_se=_ratio(diff, dse),
                       unpaired_se=use, unpaired_in_se=_ratio(diff, use))
        rows[arm] = row
    result = {"seeds": seeds, "steps": any_runs[0][-1][0], "arms": rows}
    (out / "ablation.json").write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False))
    lines = [f"held-out greedy accuracy after {result['steps']} steps, {len(seeds)} seeds "
             f"({', '.join(map(str, seeds))}); mean +- standard error over seeds",
             "", "| arm | rewards | accuracy | diff. vs outcome, paired by seed | unpaired | validity |",
             "|---|---|---|---|---|---|"]
    for arm, r in rows.items():
        diff = (f"{r['diff_vs_outcome']:+.3f} +- {r['diff_se']:.3f} ({r['diff_in_se']:.1f} s.e.) | "
                f"+- {r['unpaired_se']:.3f} ({r['unpaired_in_se']:.1f} s.e.)"
                if "diff_vs_outcome" in r else " |")
        lines.append(f"| {arm} | {ARMS[arm] or '(none)'} | {r['mean']:.3f} +- {r['se']:.3f} | {diff} | "
                     f"{r['validity_mean']:.3f} |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    series = {}
    for arm, cs in curves.items():
        steps = [s for s, _ in cs[0]]
        stats = [_mean_se([c[i][1] for c in cs]) for i in range(len(steps))]
        series[arm] = (steps, [m for m, _ in stats], [0.0 if math.isnan(e) else e for _, e in stats])
    plot_bands(series, out / "ablation.png", "held-out accuracy (mean, +-1 s.e. over seeds)")
    print("\n".join(lines))
    return result


def ablation(out: Path, seeds: list[int], arms: list[str], extra: list[str],
             shard: tuple[int, int] = (0, 1)) -> dict | None:
    """Train every (arm, seed) run not done yet, then summarize.  ``shard=(i, k)`` runs only
    the i-th of every k runs (k processes share the work; the last one to finish, or
    ``--report``, writes the summary)."""
    runs = [(arm, seed) for seed in seeds for arm in arms if ARMS[arm] is not None]
    for arm, seed in runs[shard[0]::shard[1]]:  # seed-major: a partial experiment compares
        _train_arm(out, arm, seed, extra)         # arms at equal seeds
    if not all((_run_dir(out, a, s) / "summary.json").is_file() for a, s in runs):
        print("[ablation] other shards still running; summarize with --report when they end",
              file=sys.stderr)
        return None
    return summarize(out, seeds, arms)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m fastgrpo.experiments",
                                 description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ab = sub.add_parser("ablation", help="R1-VL's reward ablation on the built-in task")
    ab.add_argument("--seeds", type=int, default=5, help="number of seeds, 0..N-1 (default 5)")
    ab.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms (default all: {','.join(ARMS)})")
    ab.add_argument("--out-dir", default="runs/ablation", help="experiment directory (default runs/ablation)")
    ab.add_argument("--report", action="store_true", help="only summarize the finished runs")
    ab.add_argument("--shard", default="0/1", help="I/K: run every K-th run starting at I, for K "
                                                  "parallel processes (default 0/1: all)")
    args = ap.parse_args(argv)
    from fastgrpo.trainer.config import ConfigError
    from fastgrpo.tasks.data import DataError
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        print(f"error: unknown arm(s) {', '.join(unknown) or '(none given)'}; choose from "
              f"{', '.join(ARMS)}", file=sys.stderr)
        raise SystemExit(2)
    if args.seeds < 1:
        print(f"error: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        raise SystemExit(2)
    try:
        shard = tuple(int(x) for x in args.shard.split("/"))
        assert len(shard) == 2 and 0 <= shard[0] < shard[1]
    except (ValueError, AssertionError):
        print(f"error: --shard must be I/K with 0 <= I < K, got {args.shard!r}", file=sys.stderr)
        raise SystemExit(2)
    out, seeds = Path(args.out_dir), list(range(args.seeds))
    try:
        summarize(out, seeds, arms) if args.report else ablation(out, seeds, arms, extra, shard)
    except (ConfigError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except FileNotFoundError as e:
        print(f"error: a run is missing ({e}); run the ablation without --report first",
              file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
