"""Deprecated (one release): the tasks moved to one package each, the protocol to
``fastgrpo.trainer.task``.  Import from there:

* ``Task``, ``load_task``: ``fastgrpo.trainer.task``;
* ``ArithmeticTask``: ``fastgrpo.tasks.arithmetic``; ``ChartsTask``: ``fastgrpo.tasks.charts``;
* ``RoutingTask``, ``load_step_rows``, ``load_question_rows``, ``ROUTING_DEFAULTS``:
  ``fastgrpo.tasks.routing.task``; ``routing_accuracy_reward``, ``offline_metrics``:
  ``fastgrpo.tasks.routing.rewards``.
"""

from __future__ import annotations

from fastgrpo.tasks.arithmetic import ArithmeticTask
from fastgrpo.tasks.charts import ChartsTask
from fastgrpo.tasks.routing.rewards import offline_metrics, routing_accuracy_reward
from fastgrpo.tasks.routing.task import (ONLINE_DEFAULTS, ROUTING_DEFAULTS, RoutingTask, load_question_rows,
                                         load_step_rows)
from fastgrpo.trainer.config import TrainConfig
from fastgrpo.trainer.task import Task, load_task

__all__ = ["Task", "ArithmeticTask", "ChartsTask", "RoutingTask", "get_task", "load_step_rows",
           "load_question_rows", "ROUTING_DEFAULTS", "ONLINE_DEFAULTS", "offline_metrics",
           "routing_accuracy_reward"]


def get_task(cfg: TrainConfig) -> Task:
    """Deprecated: ``fastgrpo.trainer.task.load_task(cfg.task)`` (``configure`` reads the rest)."""
    return load_task(cfg.task)
