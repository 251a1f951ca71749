"""Deprecated (one release): moved to ``fastgrpo.tasks.routing.multiturn`` (the routing task's
multi-turn retrieval rollout)."""

from fastgrpo.tasks.routing.multiturn import *  # noqa: F401,F403
from fastgrpo.tasks.routing.multiturn import __all__  # noqa: F401
