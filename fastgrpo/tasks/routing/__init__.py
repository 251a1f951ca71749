"""The built-in routing task (``--task routing``, R1-Router's Step-GRPO), one package:

* ``data``: the synthetic world, its knowledge bases, questions, step rows and teacher
  trajectories (``python -m fastgrpo.tasks.routing --out DIR`` writes them);
* ``multiturn``: the multi-turn retrieval rollout against the KBs (``--rollout-mode online``);
* ``rewards``: the task's reward set and offline held-out metrics;
* ``warmup``: the supervised warm-up (``python -m fastgrpo.sft --task routing``);
* ``task``: ``RoutingTask``, what the trainer consults (``TASK``);
* ``checkpoint/``: the shipped warm-up model (``--task routing`` without ``--model``).
"""

from fastgrpo.tasks.routing.data import *  # noqa: F401,F403  (the task's data API, as before)
from fastgrpo.tasks.routing.data import __all__ as _data_all
from fastgrpo.tasks.routing.task import RoutingTask

TASK = RoutingTask

__all__ = [*_data_all, "RoutingTask", "TASK"]
