"""The built-in arithmetic task (``--task arithmetic``, the default), one package:

* ``data``: the word-problem generator and answer checks (``python -m fastgrpo.tasks.arithmetic
  --out DIR`` writes the splits);
* ``tokenizer``: the task's word-level tokenizer;
* ``warmup``: the supervised warm-up (``python -m fastgrpo.sft``);
* ``task``: ``ArithmeticTask``, what the trainer consults (``TASK``);
* ``checkpoint/``: the shipped warm-up model (the trainer's default ``--model``).
"""

from fastgrpo.tasks.arithmetic.data import *  # noqa: F401,F403  (the task's data API, as before)
from fastgrpo.tasks.arithmetic.data import __all__ as _data_all
from fastgrpo.tasks.arithmetic.data import _step_forms, main  # noqa: F401  (python -m, charts)
from fastgrpo.tasks.arithmetic.task import CHECKPOINT_DIR, ArithmeticTask
from fastgrpo.tasks.arithmetic.tokenizer import build_tokenizer

TASK = ArithmeticTask

__all__ = [*_data_all, "build_tokenizer", "ArithmeticTask", "CHECKPOINT_DIR", "TASK"]
