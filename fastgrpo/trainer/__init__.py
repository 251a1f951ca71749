"""The StepGRPO trainer: ``python -m fastgrpo.train`` (``loop.py`` reads top to bottom).

``run(TrainConfig(...))`` trains from Python; ``main(argv)`` is the command line."""

from fastgrpo.trainer.config import TrainConfig
from fastgrpo.trainer.loop import main, run

__all__ = ["TrainConfig", "main", "run"]
