"""The ``Task`` protocol: everything the trainer knows about a task (``--task``).

A task is one object the loop consults at a few named points; it never names a task itself.
A task supplies

* its data: :meth:`Task.load_data` -> ``(train_rows, eval_rows)`` (default: ``--train-file`` /
  ``--eval-file`` JSONL rows, else :meth:`Task.builtin_splits`);
* its reward set: :meth:`Task.reward_set` (default: the StepGRPO set, ``--rewards``,
  ``--reward`` extras: ``trainer.evaluation.build_reward_set``);
* its prompt encoding: :meth:`Task.encode` (default: the chat template, with the run's
  system prompt; ``trainer.prompting``) and :meth:`Task.set_layout`;
* its held-out evaluation and report: :meth:`Task.evaluate` (default: greedy accuracy and
  layout validity), :meth:`Task.eval_line`, :meth:`Task.report`, ``metric_aliases`` (the
  step metrics' short names);
* optional stage hooks ``rollout(run, step)``, ``score(run, samples)``,
  ``advantages(run, samples, rewards)`` (``None``: the loop's own stage);
* optional warm-up: ``warmup(argv)`` (``python -m fastgrpo.sft --task NAME``) and the shipped
  checkpoint ``checkpoint`` (the model used when ``--model`` is not given);
* CLI defaults: ``cli_defaults`` (options the task runs with unless given explicitly), applied
  by :meth:`Task.configure`.

``--task NAME`` loads ``fastgrpo.tasks.NAME``'s ``TASK``; ``--task my_pkg.my_task:TASK`` loads
any module's.  ``TASK`` is a ``Task`` subclass (one fresh instance per run) or an instance.
A task imports the trainer's public pieces only (``fastgrpo.trainer.PUBLIC``, see
``docs/architecture.md``).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable, ClassVar

from fastgrpo.rewards import RewardSet
from fastgrpo.tasks.data import load_jsonl
from fastgrpo.rewards.free import FREE
from fastgrpo.trainer.config import ConfigError, TrainConfig, builtin_tasks, explicit_fields
from fastgrpo.trainer.evaluation import build_reward_set, evaluate
from fastgrpo.trainer.prompting import make_encoder

__all__ = ["Task", "load_task"]


class Task:
    """The default task: JSONL rows with ``prompt`` / ``answer`` / ``key_steps``, the StepGRPO
    reward set, greedy accuracy and validity held out.  Subclass and override what differs."""

    name: ClassVar[str] = "custom"
    # m[key] = m["rewards/<name>/mean"] in each step's metrics
    metric_aliases: ClassVar[dict] = {"accuracy": "accuracy", "step_k": "step_k", "validity": "step_rvr"}
    cli_defaults: ClassVar[dict] = {}      # options this task runs with unless given explicitly
    checkpoint: ClassVar[Path | None] = None  # the shipped warm-up model (when --model is not given)
    rollout = score = advantages = None    # stage hooks: None = the loop's own
    warmup: ClassVar[Callable | None] = None  # warmup(argv): python -m fastgrpo.sft --task NAME
    system_prompt: str = ""                # the run's (--system-prompt, --layout, the preset's)
    eval_engine = None                     # the held-out evals' engine (--eval-rollout; set up by the trainer)

    def configure(self, cfg: TrainConfig) -> TrainConfig:
        """The task's options: ``cli_defaults`` for those not given explicitly."""
        explicit = explicit_fields(cfg)
        for k, v in self.cli_defaults.items():
            if k not in explicit:
                setattr(cfg, k, v)
        return cfg

    def builtin_splits(self, cfg: TrainConfig) -> tuple[list[dict], list[dict]] | None:
        """The task's own ``(train, eval)`` rows (``None``: it has none; --train-file needed)."""
        return None

    def load_data(self, cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
        """Train and eval rows: JSONL files when given, else :meth:`builtin_splits`."""
        if cfg.train_file or cfg.eval_file:
            cols = cfg.columns()
            train = load_jsonl(cfg.train_file, columns=cols)
            evals = load_jsonl(cfg.eval_file, columns=cols) if cfg.eval_file else []
        else:
            splits = self.builtin_splits(cfg)
            if splits is None:
                raise ConfigError(f"--task {cfg.task}: the task has no built-in data; give --train-file")
            train, evals = splits
        return train, evals[:cfg.eval_size]

    def reward_set(self, cfg: TrainConfig, layout=None) -> RewardSet:
        return build_reward_set(cfg, layout)

    def encode(self, tokenizer, prompt) -> list[int]:
        """Token ids of a prompt (a string or chat messages) ready for generation, with the
        run's system prompt (``system_prompt``, set by the trainer)."""
        return make_encoder(self.system_prompt)(tokenizer, prompt)

    def set_layout(self, layout) -> None:
        """The run's completion layout (``--layout``, ``trainer.prompting``); in the free
        layout (no steps) validity is whether an answer was found."""
        if layout == FREE:
            self.metric_aliases = {**self.metric_aliases, "validity": "answer_found"}

    def bind(self, run) -> None:
        """Called once the run is set up (model, tokenizer, device)."""

    def evaluate(self, model, tokenizer, rows, reward_set, cfg, encode, vision=None) -> dict:
        return evaluate(model, tokenizer, rows, reward_set, cfg, encode, vision, engine=self.eval_engine)

    def eval_line(self, ev: dict) -> str:
        return f"accuracy {ev['accuracy']:.3f}  validity {ev['validity']:.3f}"

    def report(self, before: dict, after: dict, n: int) -> str:
        return (f"held-out greedy ({n} problems)   accuracy   validity\n"
                f"  before training                {before['accuracy']:8.3f}   {before['validity']:8.3f}\n"
                f"  after  training                {after['accuracy']:8.3f}   {after['validity']:8.3f}")

    def close(self) -> None:
        """Called when the run ends (release tools, temporary files)."""


def _instance(obj, spec: str) -> Task:
    if isinstance(obj, type) and issubclass(obj, Task):
        return obj()
    if isinstance(obj, Task):
        return obj
    raise ConfigError(f"invalid --task {spec!r}: {type(obj).__name__} is not a "
                      f"fastgrpo.trainer.task.Task (subclass or instance)")


def load_task(spec: str) -> Task:
    """``--task``: a built-in name (``fastgrpo.tasks.NAME:TASK``) or ``module.path:ATTR``."""
    module, sep, attr = spec.partition(":")
    if not sep:
        if spec not in builtin_tasks():
            raise ConfigError(f"invalid --task {spec!r}: choose one of {', '.join(builtin_tasks())} "
                              f"or give module.path:TASK")
        module, attr = f"fastgrpo.tasks.{spec}", "TASK"
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(f"invalid --task {spec!r}: no module {module!r} on the Python path")
    mod = importlib.import_module(module)
    if not hasattr(mod, attr):
        raise ConfigError(f"invalid --task {spec!r}: module {module!r} has no {attr!r}")
    return _instance(getattr(mod, attr), spec)

