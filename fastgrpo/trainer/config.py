"""Training configuration: one dataclass, a command line built from it, optional TOML/YAML file.

Precedence: defaults < ``--config FILE`` (.toml, or .yaml/.yml when PyYAML is installed) <
command-line flags.  Every field is a flag: ``group_size`` -> ``--group-size 8``; booleans are
``--flag`` / ``--no-flag``; list fields (``--reward``) repeat.  File keys use the field names
(``group_size`` or ``group-size``).  Invalid values raise ``ConfigError`` naming the option
and the value.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import pkgutil
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import fastgrpo.tasks
from fastgrpo.ops.advantages import SCALES
from fastgrpo.ops.logprobs import BACKENDS
from fastgrpo.ops.loss_config import LossConfig, LossConfigError
from fastgrpo.rewards import RewardError, reward_set_from_spec
from fastgrpo.trainer.aliases import translate_argv, translate_key
from fastgrpo.trainer.attention import ALIASES as ATTENTION_ALIASES
from fastgrpo.trainer.attention import BACKENDS as ATTENTION_BACKENDS
from fastgrpo.trainer.errors import ConfigError
from fastgrpo.trainer.presets import PRESETS
from fastgrpo.trainer.prompting import LAYOUT_NAMES

__all__ = ["TrainConfig", "parse_args", "ConfigError", "load_config_file", "explicit_fields",
           "report_targets", "builtin_tasks"]

DP_STRATEGIES = ("auto", "ddp", "fsdp")
LORA_TARGET = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
REPORT_TO = ("none", "tensorboard", "wandb")
# --report-to target -> (module that must be importable, how to install it)
REPORT_NEEDS = {"tensorboard": ("tensorboard", "pip install tensorboard"),
                "wandb": ("wandb", "pip install 'fastgrpo[wandb]'")}
MAX_NEW_TOKENS = 96  # the built-in arithmetic task's completion budget (its longest solution: 78)


def builtin_tasks() -> tuple[str, ...]:
    """The built-in task names: the packages under ``fastgrpo/tasks/`` (none is imported)."""
    return tuple(m.name for m in pkgutil.iter_modules(fastgrpo.tasks.__path__) if m.ispkg)


ROLLOUT_MODES = ("offline", "online")


def report_targets(report_to: str) -> tuple[str, ...]:
    """The loggers a ``--report-to`` value names (``"none"``: none)."""
    return tuple(x.strip() for x in report_to.split(",") if x.strip() not in ("", "none"))


def _f(default, help, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # model and data
    model: str = _f("", "Hugging Face causal LM directory (default: the shipped warm-up checkpoint)")
    task: str = _f("arithmetic", "the task: arithmetic (StepGRPO, the built-in word problems or a prompt/answer/"
                                 "key_steps JSONL) | routing (R1-Router's Step-GRPO: step states with a "
                                 "step_type each, or multi-turn retrieval with --rollout-mode online) | "
                                 "charts (Pillow bar charts; the shipped tiny Qwen2-VL warm-up unless --model) | "
                                 "module.path:TASK (a fastgrpo.trainer.task.Task of your own)")
    train_file: str = _f("", "train JSONL (rows with prompt, answer, key_steps); default: the built-in task")
    eval_file: str = _f("", "held-out JSONL for greedy eval (needs --train-file); default: the built-in task's eval split")
    out_dir: str = _f("runs/stepgrpo", "directory for metrics.jsonl, samples, plot and the final model")
    seed: int = _f(0, "random seed (data order, sampling, initialisation)")
    device: str = _f("auto", "torch device: auto | cpu | cuda | cuda:N")
    threads: int = _f(0, "torch CPU threads (0: torch's default, one per core; measured on 2 idle cores: "
                         "the default run of the earlier 2-or-3-step task in 88-104 s against 152-155 s with 1)")
    # schedule
    steps: int = _f(60, "optimizer steps (one rollout batch each)")
    prompts_per_step: int = _f(16, "distinct prompts per step")
    group_size: int = _f(8, "completions sampled per prompt (G)")
    ppo_epochs: int = _f(1, "optimisation passes over each rollout batch (>1 computes old log-probs)")
    micro_batch_tokens: int = _f(1024, "token budget of one packed micro-batch; attention is per sequence, so "
                                       "a longer row costs no extra attention, holds more of a group's "
                                       "completions behind one copy of their prompt, and more activations "
                                       "(SmolLM2-135M fp32 CPU step, 16 x ~150 tokens: 8192 10.2 s / 3.2 GB "
                                       "peak RSS, 2048 11.3 s / 3.4 GB, 1024 11.7 s / 3.1 GB)")
    # sampling
    max_new_tokens: int = _f(MAX_NEW_TOKENS, "maximum completion length in tokens (the built-in "
                                             "task's longest reference solution is 78 with EOS)")
    temperature: float = _f(1.0, "sampling temperature (also used in the loss)")
    top_p: float = _f(1.0, "nucleus sampling threshold")
    gen_batch_size: int = _f(128, "sequences generated together")
    rollout: str = _f("hf", "rollout engine: hf (transformers, one prefill per prompt shared by its G "
                            "samples) | vllm (vLLM's offline LLM in this process, one per rank under "
                            "torchrun, weights pushed after each step; pip install -e '.[vllm]') | auto (vllm on CUDA when "
                            "installed, else hf)")
    eval_rollout: str = _f("", "engine of the held-out greedy evals: hf | vllm | auto (default: the "
                               "training engine, --rollout)")
    rollout_is: str = _f("auto", "truncated importance sampling on the engine's log-probs: each token's "
                                 "policy loss x min(exp(logp_trainer - logp_engine), --rollout-is-cap), "
                                 "and the mismatch logged: auto (on for vllm) | on | off")
    rollout_is_cap: float = _f(2.0, "cap of the truncated importance weight (>= 1)")
    rollout_mode: str = _f("offline", "--task routing: offline (each step state its own prompt and group) | "
                                      "online (multi-turn rollouts: <ret>KB</ret> is searched in the "
                                      "knowledge bases and the results appended as tool tokens, masked "
                                      "out of the loss)")
    max_turns: int = _f(8, "--rollout-mode online: most policy steps (retrieval or answer) in one rollout")
    kb_dir: str = _f("", "--task routing: directory of knowledge bases NAME.sqlite (python -m fastgrpo.kb "
                         "build); default: the built-in task's, built in a temporary directory")
    kb_top_k: int = _f(3, "--rollout-mode online: passages a search returns")
    similarity_model: str = _f("", "--task routing: local sentence-embedding model directory for the "
                                   "sub-question similarity (never downloaded); default: lexical cosine")
    vllm_gpu_memory_utilization: float = _f(0.3, "--rollout vllm: fraction of GPU memory for vLLM (weights + KV cache)")
    # optimisation
    lr: float = _f(3e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = _f(0.1, "final learning rate of the cosine schedule, as a fraction of --lr")
    warmup_steps: int = _f(3, "linear learning-rate warm-up steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.99, "AdamW beta2")
    grad_clip: float = _f(1.0, "gradient-norm clipping threshold (0 disables)")
    gradient_checkpointing: bool = _f(False, "recompute decoder activations in backward (SmolLM2-135M fp32 CPU, "
                                              "8192-token rows: +20%% learning-step time for -4%% peak RSS, "
                                              "the model and AdamW state dominate; pays off on long rows)")
    bf16: bool = _f(True, "bf16 autocast for the backbone (CUDA only; ignored on CPU)")
    # loss
    loss_type: str = _f("grpo", "objective and normalisation: grpo (sequence mean, then mean over "
                                "sequences: StepGRPO as published) | bnpo (token mean over this "
                                "process's batch; ranks averaged) | dapo (token mean over the global "
                                "batch) | dr_grpo (token sum / (sequences x --max-new-tokens)) | "
                                "cispo (weight capped at --epsilon-high) | sapo | luspo | vespo "
                                "(TRL 1.16's definitions, fastgrpo.ops.loss)")
    beta: float = _f(0.0, "KL coefficient against the initial (reference) model; >0 keeps a frozen copy")
    epsilon_low: float = _f(0.2, "lower clip range of the ratio")
    epsilon_high: float = _f(0.0, "upper clip range of the ratio (0: same as --epsilon-low)")
    entropy_coef: float = _f(0.0, "entropy bonus coefficient")
    importance_sampling_level: str = _f("token", "importance ratio level: token | sequence (GSPO)")
    backend: str = _f("auto", "fused kernel backend: " + " | ".join(BACKENDS))
    lora_r: int = _f(0, "LoRA rank: train low-rank adapters (peft) on a frozen base model; 0: off "
                        "(full fine-tuning). The --beta reference is the base (adapters disabled)")
    lora_alpha: float = _f(16.0, "LoRA alpha (the adapter update is scaled by alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA adapters' input")
    lora_target: str = _f(LORA_TARGET, "comma-separated names of the modules that get adapters "
                                       "(default: a Llama-style model's attention and MLP projections)")
    # rewards and advantages
    rewards: str = _f("", "the reward set, replacing the default StepRAR + StepRVR: comma-separated "
                          "name[=weight], each a built-in (accuracy, step_rar, step_rvr, step_k, "
                          "step_rar_code, step_rvr_code) or module:function / file.py:function; "
                          "e.g. 'accuracy' (outcome-only GRPO), 'step_rar,step_rvr' (StepGRPO)")
    reward: list = _f([], "extra reward 'module:function[=weight]' (TRL signature) added to the set; repeatable")
    scale_rewards: str = _f("group", "advantage scaling: group | batch | none")
    drop_zero_std_groups: bool = _f(True, "skip groups whose rewards are all equal (no signal)")
    mask_truncated: bool = _f(True, "exclude completions that hit --max-new-tokens from the loss")
    # logging and eval
    eval_every: int = _f(20, "held-out greedy eval every N steps (0: only before and after)")
    eval_size: int = _f(200, "held-out problems per eval (0: no held-out evaluation)")
    sample_every: int = _f(10, "print (and log to samples.jsonl) a sampled completion at the first step and every "
                           "N steps (0: never)")
    plot: bool = _f(True, "write training curves to <out_dir>/curves.png at the end")
    save: bool = _f(True, "save the final model to <out_dir>/model")
    progress: bool = _f(True, "progress bar on stderr")
    report_to: str = _f("none", "metrics loggers besides metrics.jsonl, comma-separated: none | "
                                "tensorboard (into <out_dir>/tb) | wandb (into <out_dir>/wandb; "
                                "offline unless WANDB_MODE is set)")
    collapse_warn_steps: int = _f(5, "warn when every group had equal rewards (nothing trains) for N "
                                     "consecutive steps (0: never)")
    # checkpoints and resume
    save_every: int = _f(0, "write a resumable checkpoint to <out_dir>/checkpoints/step-N every N steps (0: never)")
    keep_last: int = _f(3, "checkpoints kept on disk (older ones are pruned; the newest valid one always stays)")
    resume: str = _f("", "resume from a checkpoint: DIR (a step-N checkpoint or a run directory) | auto "
                         "(newest valid checkpoint of --out-dir; starts fresh only when --out-dir "
                         "holds no earlier run's outputs)")
    resume_force: bool = _f(False, "resume even when the checkpoint's run identity (model, data, seed, "
                                   "hyper-parameters) differs from this run's options")
    overwrite: bool = _f(False, "start fresh in an --out-dir that holds an earlier run: delete its "
                                "metrics, samples, summary, plot, model, checkpoints, tb/ and "
                                "wandb/ first")
    # hardware, presets, parallelism
    attn_implementation: str = _f("auto", "attention backend: auto | flash_attention_2 | torch_varlen | xformers | "
                                          "sdpa_varlen | sdpa | eager (auto: on CUDA flash-attn, then torch's "
                                          "varlen_attn, then xformers, else sdpa_varlen: SDPA per packed sequence, "
                                          "cost sum of L_i^2; sdpa/eager build a dense [L, L] mask per packed row, "
                                          "cost L^2: only by name)")
    preset: str = _f("", "named preset, e.g. smollm2-135m: its model and hyper-parameters, except options "
                         "given explicitly (flags or --config file) (fastgrpo.trainer.presets.PRESETS lists them)")
    dp_strategy: str = _f("auto", "data parallelism under torchrun: auto (FSDP2 on CUDA, DDP on CPU) | ddp | fsdp")
    # vision-language models (fastgrpo.vl): rows with `image` (a path or a list, relative to the JSONL)
    freeze_vision: bool = _f(False, "vision-language model: freeze the vision tower and projector "
                                    "(train the language model only; default: all trainable, as R1-VL)")
    min_pixels: int = _f(0, "vision-language model: smallest image area in pixels after resizing "
                            "(Qwen2-VL processors; 0: the model's preprocessor_config.json)")
    max_pixels: int = _f(0, "vision-language model: largest image area in pixels after resizing "
                            "(R1-VL's 2B run used 400000; 0: the model's preprocessor_config.json)")
    # a user's data and format (tasks/formats.py, trainer/prompting.py, rewards/free.py)
    prompt_column: str = _f("prompt", "the data files' column holding the prompt (a string, or a list "
                                      "of chat messages), e.g. question for GSM8K")
    answer_column: str = _f("answer", "the column holding the reference answer (GSM8K's '... #### 42' "
                                      "and a \\boxed{} solution are read as their final answer)")
    key_steps_column: str = _f("key_steps", "the column holding StepRAR's key steps")
    image_column: str = _f("image", "the column holding a vision-language row's image(s)")
    layout: str = _f("", "completion layout the rewards read: r1vl (### Step k: ... ### The final "
                         "answer is:) | tags (<think> steps </think><answer>) | free (no sections: "
                         "the answer after ####, in \\boxed{}, after 'the answer is', or the last "
                         "number; accuracy only, no step rewards); default: the preset's, else r1vl. "
                         "Given explicitly, a chat model is told the layout in a system prompt "
                         "unless --system-prompt says otherwise")
    system_prompt: str = _f("", "system message put before every prompt (through the chat template)")
    system_prompt_file: str = _f("", "read the system message from this UTF-8 file")
    top_k: int = _f(0, "sample from the k most likely tokens only (0: off)")
    min_p: float = _f(0.0, "drop tokens less likely than min_p x the most likely one's probability (0: off)")
    repetition_penalty: float = _f(1.0, "divide the sampling logits of tokens already in the sequence "
                                        "by this (>1 discourages repeats; 1: off; the loss sees the policy)")
    stop: list = _f([], "stop a completion once its text contains this string (kept in it); repeatable")

    def validate(self) -> "TrainConfig":
        """Every option checked; ``ConfigError`` names the first bad one and its value."""
        self._check_numbers()
        self._check_choices()
        self._check_loss()
        self._check_combinations()
        self._validate_format(self._bad)
        self._check_rewards()
        return self

    def _bad(self, name: str, why: str):
        raise ConfigError(f"invalid --{name.replace('_', '-')} {getattr(self, name)!r}: {why}")

    def _check_numbers(self) -> None:
        """Finite floats; the bounds of the counts, rates and sizes."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                self._bad(f.name, "must be a finite number")
        for n in ("max_turns", "kb_top_k"):
            if getattr(self, n) < 1:
                self._bad(n, "must be >= 1")
        if not self.lr > 0:
            self._bad("lr", "must be > 0")
        if self.group_size < 2:
            self._bad("group_size", "must be >= 2 (group-relative advantages need at least two samples)")
        for n in ("steps", "prompts_per_step", "ppo_epochs", "micro_batch_tokens",
                  "max_new_tokens", "gen_batch_size"):
            if getattr(self, n) < 1:
                self._bad(n, "must be >= 1")
        for n in ("warmup_steps", "eval_every", "sample_every", "threads", "save_every",
                  "collapse_warn_steps", "eval_size", "top_k"):
            if getattr(self, n) < 0:
                self._bad(n, "must be >= 0")
        if not self.temperature > 0:
            self._bad("temperature", "must be > 0")
        if not 0 < self.top_p <= 1:
            self._bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_lr_ratio <= 1:
            self._bad("min_lr_ratio", "must be in [0, 1]")
        for n in ("weight_decay", "grad_clip", "beta", "epsilon_low", "epsilon_high", "entropy_coef"):
            if getattr(self, n) < 0:
                self._bad(n, "must be >= 0")
        for n in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, n) < 1:
                self._bad(n, "must be in [0, 1)")
        for n in ("min_pixels", "max_pixels"):
            if getattr(self, n) < 0:
                self._bad(n, "must be >= 0 (0: the model's own setting)")
        if self.lora_r < 0:
            self._bad("lora_r", "must be >= 0 (0: no LoRA)")
        if not 0 <= self.lora_dropout < 1:
            self._bad("lora_dropout", "must be in [0, 1)")
        if self.keep_last < 1:
            self._bad("keep_last", "must be >= 1")

    def _check_choices(self) -> None:
        """Options that name one of a set (device, task, loggers, backends, preset)."""
        if self.device != "auto":
            import torch
            try:
                dev = torch.device(self.device)
            except (RuntimeError, ValueError):
                dev = None
            if dev is None or dev.type not in ("cpu", "cuda", "mps"):
                self._bad("device", "choose auto, cpu, cuda, cuda:N or mps")
        if ":" not in self.task and self.task not in builtin_tasks():
            self._bad("task", f"choose one of {', '.join(builtin_tasks())} or give module.path:TASK")
        if self.eval_rollout not in ("", "hf", "vllm", "auto"):
            self._bad("eval_rollout", "choose one of hf, vllm, auto (or leave it out: the --rollout engine)")
        if self.rollout_mode not in ROLLOUT_MODES:
            self._bad("rollout_mode", f"choose one of {', '.join(ROLLOUT_MODES)}")
        names = [x.strip() for x in self.report_to.split(",")]
        if any(x not in REPORT_TO for x in names) or ("none" in names and len(names) > 1):
            self._bad("report_to", f"choose none or a comma-separated list of {', '.join(REPORT_TO[1:])}")
        for name in report_targets(self.report_to):
            module, install = REPORT_NEEDS[name]
            if importlib.util.find_spec(module) is None:
                self._bad("report_to", f"needs the {module} package ({install})")
        if self.scale_rewards not in SCALES:
            self._bad("scale_rewards", f"choose one of {', '.join(SCALES)}")
        if self.backend not in BACKENDS:
            self._bad("backend", f"choose one of {', '.join(BACKENDS)}")
        if self.dp_strategy not in DP_STRATEGIES:
            self._bad("dp_strategy", f"choose one of {', '.join(DP_STRATEGIES)}")
        if self.attn_implementation.lower() not in ATTENTION_ALIASES:
            self._bad("attn_implementation", f"unknown attention backend; choose one of auto, "
                                             f"{', '.join(ATTENTION_BACKENDS)}")
        if self.preset and self.preset not in PRESETS:
            self._bad("preset", f"unknown preset; choose one of {', '.join(sorted(PRESETS))}")

    def loss_config(self) -> LossConfig:
        """The fused loss's options of this run (``grpo_loss(..., config=...)``)."""
        return LossConfig(loss_type=self.loss_type, beta=self.beta, epsilon_low=self.epsilon_low,
                          epsilon_high=self.epsilon_high or self.epsilon_low,
                          temperature=self.temperature, entropy_coef=self.entropy_coef,
                          importance_sampling_level=self.importance_sampling_level,
                          backend=self.backend)

    def _check_loss(self) -> None:
        """The loss options, as ``LossConfig`` checks them, plus cispo's cap > 1."""
        try:
            self.loss_config()
        except LossConfigError as e:
            self._bad(e.option, e.why)
        if self.loss_type == "cispo" and not self.epsilon_high > 1:
            self._bad("epsilon_high", "cispo caps the importance weight at --epsilon-high itself (not "
                                      "1 + eps); give a cap > 1, e.g. 5.0 as TRL's cispo default")

    def _check_combinations(self) -> None:
        """Options that depend on each other."""
        if self.rollout_mode == "online" and self.task != "routing":
            self._bad("rollout_mode", "multi-turn tool rollouts need --task routing")
        if self.eval_file and not self.train_file:
            self._bad("eval_file", "needs --train-file too (the training rows; without it the run "
                                   "would train on the built-in task and evaluate on your file)")
        if self.overwrite and self.resume:
            raise ConfigError(f"--overwrite deletes the run that --resume {self.resume!r} would "
                              f"continue; give one of them")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            self._bad("min_pixels", f"must be <= --max-pixels {self.max_pixels}")
        if self.lora_r and not self.lora_alpha > 0:
            self._bad("lora_alpha", "must be > 0")
        if self.lora_r and not self.lora_target.replace(",", "").strip():
            self._bad("lora_target", "names no module (give comma-separated module names, e.g. q_proj,v_proj)")

    def _check_rewards(self) -> None:
        """``--rewards`` parses; each ``--reward`` is ``module:function[=weight]``."""
        if self.rewards:
            try:
                reward_set_from_spec(self.rewards)
            except RewardError as e:
                raise ConfigError(f"invalid --rewards {self.rewards!r}: {e}") from None
        for spec in self.reward:
            if not isinstance(spec, str) or ":" not in spec.split("=")[0]:
                raise ConfigError(f"invalid --reward {spec!r}: expected 'module:function[=weight]'")
            if "=" in spec:
                try:
                    float(spec.split("=", 1)[1])
                except ValueError:
                    raise ConfigError(f"invalid --reward {spec!r}: weight is not a number") from None

    def _validate_format(self, bad) -> None:
        """The user-data, layout and sampling options (the section above)."""
        if self.layout and self.layout not in LAYOUT_NAMES:
            bad("layout", f"choose one of {', '.join(LAYOUT_NAMES)}")
        if self.system_prompt and self.system_prompt_file:
            raise ConfigError("give --system-prompt or --system-prompt-file, not both")
        if self.system_prompt_file and not Path(self.system_prompt_file).is_file():
            bad("system_prompt_file", "file not found")
        for n in ("prompt_column", "answer_column", "key_steps_column", "image_column"):
            if not getattr(self, n).strip():
                bad(n, "names no column")
        if not 0 <= self.min_p < 1:
            bad("min_p", "must be in [0, 1)")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", "must be > 0 (1: off)")
        for x in self.stop:
            if not isinstance(x, str) or not x:
                raise ConfigError(f"invalid --stop {x!r}: must be a non-empty string")

    def columns(self) -> dict:
        """fastgrpo's field -> the data files' column (``--prompt-column`` ...)."""
        return {"prompt": self.prompt_column, "answer": self.answer_column,
                "key_steps": self.key_steps_column, "image": self.image_column}


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _field_type(f):
    hints = typing.get_type_hints(TrainConfig)
    return hints[f.name]


def _coerce(name: str, value):
    """Check/convert a value from a config file to the field's type."""
    tp = _field_type(_FIELDS[name])
    flag = "--" + name.replace("_", "-")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"invalid {flag} {value!r}: expected true or false")
    if tp is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError(f"invalid {flag} {value!r}: expected a list of strings")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp in (int, float) and isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            pass
    raise ConfigError(f"invalid {flag} {value!r}: expected {tp.__name__}")


def load_config_file(path: str) -> dict:
    """Read a flat TOML or YAML mapping of field names to values (a ``[train]`` table is also accepted)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {str(p)!r}")
    suffix = p.suffix.lower()
    if suffix == ".toml":
        import tomllib
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8-sig"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{p}: YAML config files need PyYAML (pip install pyyaml); "
                              f"or use a .toml file") from None
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8-sig")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
    else:
        raise ConfigError(f"config file {str(p)!r}: unsupported extension {suffix!r} (use .toml or .yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of option names to values")
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    out = {}
    for k, v in data.items():
        name, v = translate_key(str(k), v, _FIELDS, where=str(p))
        out[name] = _coerce(name, v)
    return out


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fastgrpo.train",
        description="StepGRPO training with fused log-prob / loss kernels.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--config", metavar="FILE", default=None,
                    help="TOML or YAML file of options (command-line flags override it)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = _field_type(f)
        help_ = f.metadata["help"]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if tp is bool:
            ap.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                            default=argparse.SUPPRESS, help=help_ + f" (default: {default})")
        elif tp is list:
            ap.add_argument(flag, dest=f.name, action="append", metavar="SPEC",
                            default=argparse.SUPPRESS, help=help_)
        else:
            ap.add_argument(flag, dest=f.name, type=tp, metavar=tp.__name__.upper(),
                            default=argparse.SUPPRESS, help=help_ + f" (default: {default!r})")
    return ap


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Build a validated ``TrainConfig`` from defaults, an optional config file and flags.

    Raises ``ConfigError`` for invalid values; argparse exits (code 2) on malformed flags.
    """
    ap = _build_parser()
    ns = ap.parse_args(translate_argv(sys.argv[1:] if argv is None else list(argv), _FIELDS))
    values = {}
    cfg_file = getattr(ns, "config", None)
    if cfg_file:
        values.update(load_config_file(cfg_file))
    cli = {k: v for k, v in vars(ns).items() if k != "config"}
    values.update(cli)
    cfg = TrainConfig(**values).validate()
    cfg._explicit = frozenset(values)  # what the user set (flags + file): a --preset does not override these
    return cfg


def explicit_fields(cfg: TrainConfig) -> frozenset:
    """Names of the fields the user set explicitly: recorded by ``parse_args`` (flags and
    config file); for a ``TrainConfig`` built in code, the fields that differ from their
    defaults."""
    got = getattr(cfg, "_explicit", None)
    if got is not None:
        return frozenset(got)
    default = TrainConfig()
    return frozenset(f.name for f in dataclasses.fields(TrainConfig)
                     if getattr(cfg, f.name) != getattr(default, f.name))
