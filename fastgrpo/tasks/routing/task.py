"""The routing task as the trainer sees it: R1-Router's Step-GRPO, in two forms.

* ``--rollout-mode offline`` (default): every step state is its own prompt and its own GRPO
  group; the reward is dispatched on the row's ``step_type`` (``retrieval_step_reward`` or
  ``answer_recall_reward``).  Rows: the built-in task's, or JSONL rows ``{"prompt",
  "step_type": "retrieve" | "answer", "reference_query", "reference_kb", "answer", "kbs"}``.
  Held-out: routing accuracy (the KB a retrieval step names == the teacher's) and answer
  recall (the answer-step reward) of greedy steps.
* ``--rollout-mode online``: multi-turn rollouts against the FTS5 knowledge bases
  (``multiturn``), step rewards -> process-supervision token advantages, tool tokens masked
  out of the loss (the task's ``rollout`` / ``score`` / ``advantages`` hooks).  Held-out:
  routing accuracy and final-answer recall of greedy rollouts.

Without ``--model``: the shipped warm-up ``checkpoint/`` (``python -m fastgrpo.sft --task
routing``) and the task's defaults (``ROUTING_DEFAULTS``, ``ONLINE_DEFAULTS``).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from fastgrpo.rewards import RewardSet
from fastgrpo.rewards.retrieval import STEP_TYPES, embedding_similarity
from fastgrpo.tasks.data import DataError, read_jsonl
from fastgrpo.tasks.routing import data as T
from fastgrpo.tasks.routing.data import ROUTING_WARMUP_DIR, build_kbs, make_world
from fastgrpo.tasks.routing.multiturn import (KBTool, engine_step_fn, hf_step_fn, rollout_turns, score_turns, turn_advantages,
                                              turn_metrics)
from fastgrpo.tasks.routing.rewards import offline_metrics, routing_reward_set
from fastgrpo.tasks.routing.warmup import main as warmup_main
from fastgrpo.trainer import distributed as dist_
from fastgrpo.trainer.config import ConfigError, TrainConfig, explicit_fields
from fastgrpo.trainer.policy import gather_for_generation
from fastgrpo.trainer.rollout import generate
from fastgrpo.trainer.task import Task

__all__ = ["RoutingTask", "load_step_rows", "load_question_rows", "ROUTING_DEFAULTS", "ONLINE_DEFAULTS"]

# options the routing task runs with unless given explicitly (prompts are ~3x longer than the
# arithmetic task's and a step is short)
ROUTING_DEFAULTS = {"steps": 30, "prompts_per_step": 8, "group_size": 8, "max_new_tokens": 40,
                    "lr": 2e-4, "eval_every": 0, "sample_every": 10}
ONLINE_DEFAULTS = {"steps": 20, "prompts_per_step": 4, "eval_size": 30}


def _fmt(x) -> str:
    return "   nan" if x is None or not math.isfinite(x) else f"{x:6.3f}"


def _kbs(where: str, row: dict, default) -> list[str]:
    kbs = row.get("kbs", default)
    if kbs is None:
        raise DataError(f"{where}: retrieve step has no 'kbs' (the configured knowledge-base names)")
    if not isinstance(kbs, list) or not kbs or not all(isinstance(k, str) and k.strip() for k in kbs):
        raise DataError(f"{where}: field 'kbs' must be a non-empty list of knowledge-base names, got {json.dumps(kbs)}")
    return kbs


def _answer(where: str, a) -> str | list[str]:
    if isinstance(a, list) and a and all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in a):
        return [str(x) for x in a]
    if isinstance(a, bool) or not isinstance(a, (str, int, float)):
        raise DataError(f"{where}: answer step needs 'answer' (a string, a number or a list of them), got {json.dumps(a)}")
    return str(a)


def load_step_rows(path: str, kbs: list[str] | None = None) -> list[dict]:
    """Offline step-state rows from JSONL; errors name the file, line and field."""
    rows = []
    for where, row in read_jsonl(path, required=()):
        st = row.get("step_type")
        if st not in STEP_TYPES:
            raise DataError(f"{where}: field 'step_type' must be one of {', '.join(STEP_TYPES)}, got {json.dumps(st)}")
        if st == "retrieve":
            for k in ("reference_query", "reference_kb"):
                if not isinstance(row.get(k), str):
                    raise DataError(f"{where}: retrieve step needs {k!r} (a string), got {json.dumps(row.get(k))}")
            row["kbs"] = _kbs(where, row, kbs)
        else:
            row["answer"] = _answer(where, row.get("answer"))
        rows.append(row)
    return rows


def load_question_rows(path: str, kbs: list[str] | None = None) -> list[dict]:
    """Online question rows from JSONL: ``prompt``, ``answer``, ``hops`` (the teacher's steps,
    ``[{"query", "kb", "answer"}]``; may be empty) and optionally ``kbs``."""
    rows = []
    for where, row in read_jsonl(path, required=()):
        row["answer"] = _answer(where, row.get("answer"))
        hops = row.get("hops", [])
        if not isinstance(hops, list) or not all(
                isinstance(h, dict) and all(isinstance(h.get(k), str) for k in ("query", "kb", "answer"))
                for h in hops):
            raise DataError(f"{where}: field 'hops' must be a list of {{\"query\", \"kb\", \"answer\"}} "
                            f"objects of strings, got {json.dumps(hops)}")
        row["hops"] = hops
        row["kbs"] = _kbs(where, row, kbs)
        rows.append(row)
    return rows


def _kb_dir_paths(kb_dir: str) -> dict[str, Path]:
    d = Path(kb_dir)
    if not d.is_dir():
        raise ConfigError(f"invalid --kb-dir {kb_dir!r}: not a directory")
    paths = {p.stem.lower(): p for p in sorted(d.glob("*.sqlite"))}
    if not paths:
        raise ConfigError(f"invalid --kb-dir {kb_dir!r}: holds no knowledge base (*.sqlite, built by "
                          f"python -m fastgrpo.kb build)")
    return paths


class RoutingTask(Task):
    """R1-Router's Step-GRPO (see the module doc)."""

    name = "routing"
    checkpoint = ROUTING_WARMUP_DIR
    warmup = staticmethod(warmup_main)

    def __init__(self, online: bool = False):
        self.similarity = None
        self.tool = None
        self._tmp = None
        self.run = None
        self._set_online(online)

    def _set_online(self, online: bool) -> None:
        """Online (multi-turn tool rollouts) replaces the loop's rollout, score and advantages."""
        self.online = online
        hooks = (self._rollout, self._score, self._advantages) if online else (None, None, None)
        self.rollout, self.score, self.advantages = hooks

    # --- options, data, rewards

    @property
    def metric_aliases(self):
        return {"accuracy": "routing_accuracy", "validity": "answer_recall",
                "routing_accuracy": "routing_accuracy", "answer_recall": "answer_recall"}

    def configure(self, cfg: TrainConfig) -> TrainConfig:
        self._set_online(cfg.rollout_mode == "online")
        if cfg.rewards:
            raise ConfigError(f"invalid --rewards {cfg.rewards!r}: --task routing's reward is R1-Router's "
                              f"step_type reward; add functions to it with --reward module:function[=weight]")
        explicit = explicit_fields(cfg)
        defaults = dict(ROUTING_DEFAULTS, **(ONLINE_DEFAULTS if self.online else {}))
        for k, v in defaults.items():
            if k not in explicit:
                setattr(cfg, k, v)
        if not cfg.model:
            if not (ROUTING_WARMUP_DIR / "config.json").is_file():
                raise ConfigError(f"--task routing without --model needs the routing warm-up checkpoint "
                                  f"{ROUTING_WARMUP_DIR}; build it with python -m fastgrpo.sft --task "
                                  f"routing --out {ROUTING_WARMUP_DIR}")
            cfg.model = str(ROUTING_WARMUP_DIR)
        if cfg.similarity_model:
            if not Path(cfg.similarity_model).is_dir():
                raise ConfigError(f"invalid --similarity-model {cfg.similarity_model!r}: not a directory "
                                  f"(a local sentence-embedding model; nothing is downloaded)")
            self.similarity = embedding_similarity(cfg.similarity_model)
        if cfg.kb_dir:
            _kb_dir_paths(cfg.kb_dir)
        elif self.online and (cfg.train_file or cfg.eval_file):
            raise ConfigError("--rollout-mode online with --train-file/--eval-file needs --kb-dir (the "
                              "knowledge bases the questions are answered from)")
        return cfg

    def load_data(self, cfg: TrainConfig):
        kbs = sorted(_kb_dir_paths(cfg.kb_dir)) if cfg.kb_dir else None
        if self.online:
            load, builtin = load_question_rows, (lambda: T.online_splits(0))
        else:
            load, builtin = load_step_rows, (lambda: T.make_splits(0))
        if cfg.train_file or cfg.eval_file:
            train = load(cfg.train_file, kbs) if cfg.train_file else builtin()[0]
            evals = load(cfg.eval_file, kbs) if cfg.eval_file else []
        else:
            train, evals = builtin()  # the warm-up model was trained on the world of seed 0
        return train, evals[:cfg.eval_size]

    def reward_set(self, cfg: TrainConfig, layout=None) -> RewardSet:
        return routing_reward_set(cfg.reward, self.similarity)

    def set_layout(self, layout) -> None:
        """The routing steps have their own format and metrics, whatever ``--layout``."""

    def bind(self, run) -> None:
        self.run = run
        if not self.online:
            return
        if run.cfg.kb_dir:
            paths = _kb_dir_paths(run.cfg.kb_dir)
        else:
            self._tmp = tempfile.TemporaryDirectory()
            paths = build_kbs(make_world(0), self._tmp.name)
        self.tool = KBTool(paths, top_k=run.cfg.kb_top_k)

    def close(self) -> None:
        if self.tool is not None:
            self.tool.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    # --- evaluation

    def evaluate(self, model, tokenizer, rows, reward_set, cfg, encode, vision=None) -> dict:
        nan = {"routing_accuracy": math.nan, "answer_recall": math.nan, "accuracy": math.nan, "validity": math.nan}
        if not rows:
            return nan
        if self.online:
            ro = self._turns(model, tokenizer, rows, list(range(len(rows))), cfg, encode, group_size=1,
                             greedy=True, engine=self.eval_engine)
            ev = turn_metrics(score_turns(ro.samples, rows, self.similarity))
        else:
            prompts = [encode(tokenizer, r["prompt"]) for r in rows]
            if self.eval_engine is None:
                ro = generate(model, tokenizer, prompts, group_size=1, do_sample=False,
                              max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size)
            else:  # --eval-rollout
                ro = self.eval_engine.generate(prompts, group_size=1, do_sample=False,
                                               max_new_tokens=cfg.max_new_tokens)
            ev = offline_metrics(rows, ro.texts)
        ev["accuracy"], ev["validity"] = ev["routing_accuracy"], ev["answer_recall"]
        return ev

    def eval_line(self, ev: dict) -> str:
        return f"routing accuracy {_fmt(ev['routing_accuracy'])}  answer recall {_fmt(ev['answer_recall'])}"

    def report(self, before: dict, after: dict, n: int) -> str:
        what = "questions, multi-turn rollouts" if self.online else "step states"
        return (f"held-out greedy ({n} {what})   routing accuracy   answer recall\n"
                f"  before Step-GRPO                {_fmt(before['routing_accuracy'])}             {_fmt(before['answer_recall'])}\n"
                f"  after  Step-GRPO                {_fmt(after['routing_accuracy'])}             {_fmt(after['answer_recall'])}")

    # --- the online stages

    def _turns(self, model, tokenizer, rows, index, cfg, encode, *, group_size, greedy, engine=None):
        """``engine``: a rollout engine other than hf decodes each turn (its weights synced)."""
        if engine is not None and engine.name != "hf":
            step = engine_step_fn(engine, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                  top_p=cfg.top_p, do_sample=not greedy)
        else:
            step = hf_step_fn(model, tokenizer, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              top_p=cfg.top_p, do_sample=not greedy, batch_size=cfg.gen_batch_size)
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        return rollout_turns(step, tokenizer, [encode(tokenizer, rows[i]["prompt"]) for i in index],
                             self.tool, group_size=group_size, max_turns=cfg.max_turns, rows=index,
                             max_total_tokens=limit, max_new_tokens=cfg.max_new_tokens)

    def _rollout(self, r, step: int):
        if dist_.is_distributed():
            raise ConfigError("--rollout-mode online runs in one process (not under torchrun) for now")
        idx = r.prompts.take(r.cfg.prompts_per_step)
        with gather_for_generation(r.policy):
            r.engine.wake()
            r.engine.sync_weights(r.model)  # --rollout vllm: the weights after the last step
            ro = self._turns(r.model, r.tokenizer, r.train_rows, idx, r.cfg, r.encode,
                             group_size=r.cfg.group_size, greedy=False, engine=r.engine)
            r.engine.sleep()
        return ro

    def _score(self, r, samples):
        return score_turns(samples, r.train_rows, self.similarity)

    def _advantages(self, r, samples, rewards):
        return turn_advantages(samples, r.cfg.group_size, drop_zero_std_groups=r.cfg.drop_zero_std_groups,
                               mask_truncated=r.cfg.mask_truncated)
