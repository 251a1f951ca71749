"""``RunState``: everything a run holds between steps (model, optimizer, rows, task, engine),
its greedy evaluation and its checkpoints."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from fastgrpo.rewards import RewardSet
from fastgrpo.trainer import distributed as dist_
from fastgrpo.trainer.checkpoint import save_checkpoint
from fastgrpo.trainer.config import TrainConfig
from fastgrpo.trainer.identity import run_identity
from fastgrpo.trainer.policy import gather_for_generation
from fastgrpo.trainer.prompts import PromptOrder
from fastgrpo.trainer.task import Task

__all__ = ["RunState"]


@dataclass
class RunState:
    """Everything a run holds between steps."""
    cfg: TrainConfig
    info: dist_.DistInfo
    device: torch.device
    out_dir: Path
    model: torch.nn.Module                 # the plain causal LM, or its peft model (LoRA)
    policy: torch.nn.Module                # the same, wrapped for data parallelism
    ref_model: torch.nn.Module | None
    tokenizer: object
    optimizer: torch.optim.Optimizer
    reward_set: RewardSet
    train_rows: list[dict]
    eval_rows: list[dict]
    encode: Callable
    prompts: PromptOrder
    evaluator: bool                        # runs the greedy evals (rank 0; every rank under FSDP2)
    start: int = 0                         # completed steps at the start (resume)
    before: dict | None = None             # held-out eval of the initial model
    t_start: float = 0.0
    prompt_cache: dict = field(default_factory=dict)
    run_id: str = ""                       # the run identity its checkpoints record
    engine: object = None                  # the rollout engine (engines.py)
    vision: object = None                  # vision-language hooks (trainer/vision.py), or None
    task: Task = field(default_factory=Task)  # --task: data, rewards, eval, stage hooks (task.py)

    @property
    def main(self) -> bool:
        return self.info.is_main

    def prompt_ids(self, i: int) -> list[int]:
        if i not in self.prompt_cache:
            if self.vision is not None:  # image tokens expanded; pixel values in prompt_inputs
                self.prompt_cache[i] = self.vision.encode(self.train_rows[i], self.encode,
                                                          f"train row {i + 1}")[0]
            else:
                self.prompt_cache[i] = self.encode(self.tokenizer, self.train_rows[i]["prompt"])
        return self.prompt_cache[i]

    def evaluate(self) -> dict:
        with gather_for_generation(self.policy):
            if not self.evaluator:
                return {}
            engine = getattr(self.task, "eval_engine", None)  # --eval-rollout
            if engine is not None:
                engine.wake()
                engine.sync_weights(self.model)
            try:
                return self.task.evaluate(self.model, self.tokenizer, self.eval_rows, self.reward_set,
                                          self.cfg, self.encode, self.vision)
            finally:
                if engine is not None:
                    engine.sleep()

    def checkpoint(self, done: int, data_state: dict, rng_states: list[dict], **more) -> Path | None:
        extra = {"data": data_state, "config": dataclasses.asdict(self.cfg),
                 "eval_before": self.before, "seconds": time.perf_counter() - self.t_start, **more}
        extra["run_id"] = run_id = self.run_id or run_identity(self.cfg)
        saved = save_checkpoint(self.out_dir, done, self.model, self.optimizer, None, extra=extra,
                                keep_last=self.cfg.keep_last, rng_states=rng_states,
                                write=self.main, trainable_only=self.cfg.lora_r > 0, run_id=run_id,
                                save_extra=self._save_model_files)
        dist_.barrier()
        return saved

    def _save_model_files(self, directory: Path) -> None:
        """config.json (+ generation config) and the tokenizer: a checkpoint is a --model."""
        self.model.config.save_pretrained(directory)
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.vision is not None:
            self.vision.save(directory)
