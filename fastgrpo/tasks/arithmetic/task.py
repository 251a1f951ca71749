"""The arithmetic task as the trainer sees it: the built-in word problems (or a prompt / answer /
key_steps JSONL), the StepGRPO reward set, greedy accuracy and validity held out, the warm-up
``python -m fastgrpo.sft`` and its shipped checkpoint (the default ``--model``)."""

from __future__ import annotations

from pathlib import Path

from fastgrpo.tasks.arithmetic.data import make_splits
from fastgrpo.tasks.arithmetic.warmup import main as warmup_main
from fastgrpo.trainer.task import Task

__all__ = ["ArithmeticTask", "CHECKPOINT_DIR"]

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"


class ArithmeticTask(Task):
    """The default task: the base ``Task`` (JSONL rows, StepGRPO rewards, greedy accuracy and
    validity) plus the built-in problems and the shipped warm-up."""

    name = "arithmetic"
    checkpoint = CHECKPOINT_DIR  # --model "" loads it (the run's --model stays "")
    warmup = staticmethod(warmup_main)

    def builtin_splits(self, cfg):
        return make_splits(0)  # the warm-up model was trained on split seed 0
