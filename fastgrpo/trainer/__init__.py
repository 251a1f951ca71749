"""The StepGRPO trainer: ``python -m fastgrpo.train`` (``loop.py`` reads top to bottom).

``run(TrainConfig(...))`` trains from Python; ``main(argv)`` is the command line; a task of
one's own subclasses ``Task`` (``--task my_pkg.my_task:TASK``; ``docs/architecture.md``)."""

from fastgrpo.trainer.config import TrainConfig
from fastgrpo.trainer.loop import main, run
from fastgrpo.trainer.task import Task, load_task

__all__ = ["TrainConfig", "Task", "load_task", "main", "run"]
