"""Deprecated (one release): moved to ``fastgrpo.tasks.routing.warmup`` (the routing task's
warm-up, ``python -m fastgrpo.sft --task routing``)."""

from fastgrpo.tasks.routing.warmup import *  # noqa: F401,F403
from fastgrpo.tasks.routing.warmup import __all__  # noqa: F401
