"""The built-in multimodal task ``charts`` (``--task charts``), one package:

* ``data``: Pillow bar charts and their multi-step questions, the task's tokenizer;
* ``evaluation``: greedy answer / bar-reading accuracy and a teacher-forced probe;
* ``warmup``: the supervised warm-up of a tiny Qwen2-VL (``python -m fastgrpo.sft --task charts``);
* ``task``: ``ChartsTask``, what the trainer consults (``TASK``);
* ``checkpoint/``: the shipped warm-up model (``--task charts`` without ``--model``).
"""

from fastgrpo.tasks.charts.data import *  # noqa: F401,F403  (the task's data API, as before)
from fastgrpo.tasks.charts.data import __all__ as _data_all
from fastgrpo.tasks.charts.evaluation import evaluate_charts, teacher_forced_reading
from fastgrpo.tasks.charts.task import ChartsTask
from fastgrpo.tasks.charts.warmup import sft_main

TASK = ChartsTask

__all__ = [*_data_all, "evaluate_charts", "teacher_forced_reading", "sft_main", "ChartsTask", "TASK"]
