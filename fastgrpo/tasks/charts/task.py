"""The charts task as the trainer sees it: the built-in chart rows (PIL images in each row's
``image``) or a JSONL, the StepGRPO rewards in R1-VL's multimodal layout (the trainer picks it
for a vision-language model), greedy accuracy and validity held out; without ``--model`` the
shipped tiny Qwen2-VL warm-up and its tuned defaults (``CHARTS_TRAIN_DEFAULTS``), except options
given explicitly."""

from __future__ import annotations

from fastgrpo.tasks.charts.data import CHARTS_TRAIN_DEFAULTS, CHARTS_WARMUP_DIR, make_splits
from fastgrpo.tasks.charts.warmup import main as warmup_main
from fastgrpo.trainer.config import ConfigError, TrainConfig
from fastgrpo.trainer.task import Task

__all__ = ["ChartsTask"]


class ChartsTask(Task):
    """The built-in multimodal task (see the module doc)."""

    name = "charts"
    checkpoint = CHARTS_WARMUP_DIR
    cli_defaults = CHARTS_TRAIN_DEFAULTS  # only with the shipped checkpoint
    warmup = staticmethod(warmup_main)

    def configure(self, cfg: TrainConfig) -> TrainConfig:
        if cfg.model:
            return cfg
        if not (CHARTS_WARMUP_DIR / "config.json").is_file():
            raise ConfigError("--task charts: no shipped warm-up model; give --model DIR (e.g. "
                              "the output of python -m fastgrpo.sft --task charts --out DIR)")
        cfg = super().configure(cfg)
        cfg.model = str(CHARTS_WARMUP_DIR)
        return cfg

    def builtin_splits(self, cfg: TrainConfig):
        return make_splits(0)  # images as PIL objects in each row's "image"
