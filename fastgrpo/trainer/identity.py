"""A run's identity: the hash of the options that define it (all but ``RUNTIME_FIELDS``); a
resume must match the checkpoint's (``--resume-force`` overrides)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from fastgrpo.trainer.config import TrainConfig

__all__ = ["RUNTIME_FIELDS", "identity_fields", "run_identity"]


# options that may change between a run and its resume; every other field (and the seed among
# them) defines the run: its hash is the run identity a resume must match (run_identity)
RUNTIME_FIELDS = {"resume", "out_dir", "save_every", "keep_last", "progress", "threads", "device",
                  "plot", "save", "sample_every", "eval_every", "eval_size", "gen_batch_size",
                  "micro_batch_tokens", "attn_implementation", "dp_strategy", "backend",
                  "resume_force", "overwrite", "report_to", "collapse_warn_steps", "eval_rollout"}


def identity_fields(config: dict) -> dict:
    """The run-defining options of a config dict; one saved before an option existed counts
    as having had its default."""
    full = {**dataclasses.asdict(TrainConfig()), **config}
    return {k: v for k, v in full.items() if k not in RUNTIME_FIELDS}


def run_identity(config: TrainConfig | dict) -> str:
    """A short hash of the options that define a run (all but ``RUNTIME_FIELDS``)."""
    d = dataclasses.asdict(config) if isinstance(config, TrainConfig) else config
    blob = json.dumps(identity_fields(d), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
