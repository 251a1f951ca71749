"""TRL's ``GRPOConfig`` option names, accepted where they mean what a fastgrpo option means.

In a config file (``num_generations = 8``) and on the command line (``--num-generations 8``)
an alias is read as the fastgrpo option it names (:data:`ALIASES`).  A TRL option with no
fastgrpo equivalent, or one whose meaning differs (``per_device_train_batch_size`` counts
completions, fastgrpo's ``--prompts-per-step`` prompts), is refused with the option to use
instead (:data:`REFUSED`); any other unknown name gets difflib's nearest option.
"""

from __future__ import annotations

import difflib

from fastgrpo.trainer.errors import ConfigError

__all__ = ["ALIASES", "REFUSED", "translate_key", "translate_argv"]


def _scale(v):  # TRL's scale_rewards also takes booleans (True: group, False: none)
    return {True: "group", False: "none", "true": "group", "false": "none"}.get(v, v)


def _use_vllm(v):
    return "vllm" if v in (True, "true", "True", "1") else "hf"


# TRL name -> (fastgrpo field, value conversion or None)
ALIASES = {
    "num_generations": ("group_size", None),
    "max_completion_length": ("max_new_tokens", None),
    "learning_rate": ("lr", None),
    "max_steps": ("steps", None),
    "num_iterations": ("ppo_epochs", None),
    "max_grad_norm": ("grad_clip", None),
    "output_dir": ("out_dir", None),
    "model_name_or_path": ("model", None),
    "epsilon": ("epsilon_low", None),
    "mask_truncated_completions": ("mask_truncated", None),
    "scale_rewards": ("scale_rewards", _scale),
    "eval_steps": ("eval_every", None),
    "save_steps": ("save_every", None),
    "save_total_limit": ("keep_last", None),
    "use_vllm": ("rollout", _use_vllm),
    "generation_batch_size": ("gen_batch_size", None),
    "stop_strings": ("stop", None),
    "system_prompt": ("system_prompt", None),
}

# TRL names fastgrpo does not take: what to use instead
REFUSED = {
    "per_device_train_batch_size": "--prompts-per-step (fastgrpo counts prompts: TRL's "
                                   "per_device_train_batch_size x gradient_accumulation_steps / "
                                   "num_generations) with --group-size",
    "gradient_accumulation_steps": "--micro-batch-tokens (each step is one optimizer step over "
                                   "--prompts-per-step x --group-size completions, packed into "
                                   "micro-batches of this many tokens)",
    "per_device_eval_batch_size": "--gen-batch-size",
    "num_train_epochs": "--steps (optimizer steps; each draws --prompts-per-step prompts)",
    "warmup_ratio": "--warmup-steps",
    "lr_scheduler_type": "--min-lr-ratio (the schedule is linear warm-up then cosine)",
    "max_prompt_length": "--max-new-tokens (prompts are never cut: a prompt longer than the "
                         "model's positions is an error naming its row)",
    "logging_steps": "--sample-every (metrics.jsonl has every step)",
    "dataset_name": "--train-file (a JSONL, JSON, parquet or CSV file, or a datasets directory)",
    "dataset_train_split": "--train-file DIR/SPLIT (a save_to_disk DatasetDict's split folder)",
    "reward_funcs": "--rewards / --reward module:function",
    "reward_weights": "--rewards name=weight,...",
    "gradient_checkpointing_kwargs": "--gradient-checkpointing",
}


def _nearest(name: str, fields) -> str:
    flags = [f.replace("_", "-") for f in fields] + [a.replace("_", "-") for a in ALIASES]
    close = difflib.get_close_matches(name.replace("_", "-"), flags, n=1, cutoff=0.6)
    if not close:
        return ""
    target = ALIASES.get(close[0].replace("-", "_"), (close[0].replace("-", "_"),))[0]
    return f"; did you mean `--{target.replace('_', '-')}`?"


def _refusal(key: str, name: str) -> str:
    flag, _, why = REFUSED[name].partition(" ")
    return (f"option {key!r} (TRL's {name}) has no fastgrpo equivalent; did you mean `{flag}`?"
            + (f" {why}" if why else ""))


def translate_key(key: str, value, fields, where: str = ""):
    """``(field, value)`` for a config-file key (a field name, in - or _ spelling, or a TRL
    alias); ``ConfigError`` for a refused or unknown key, naming the option to use."""
    name = key.replace("-", "_")
    prefix = f"{where}: " if where else ""
    if name in ALIASES:
        target, conv = ALIASES[name]
        return target, value if conv is None else conv(value)
    if name in fields:
        return name, value
    if name in REFUSED:
        raise ConfigError(prefix + _refusal(key, name))
    raise ConfigError(f"{prefix}unknown key {key!r}{_nearest(name, fields)} (valid keys: "
                      f"{', '.join(sorted(fields))}; TRL names: {', '.join(sorted(ALIASES))})")


def translate_argv(argv: list[str], fields) -> list[str]:
    """``argv`` with TRL alias flags rewritten to fastgrpo's (``--num-generations 8`` ->
    ``--group-size 8``; ``--use-vllm`` -> ``--rollout vllm``); ``ConfigError`` for a refused
    TRL flag, and for an unknown flag that is no abbreviation of a known one (with the
    nearest option)."""
    known = {"--" + f.replace("_", "-") for f in fields}
    known |= {"--no-" + f.replace("_", "-") for f in fields} | {"--config", "--help"}
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out += argv[i:]
            break
        flag, eq, val = a.partition("=")
        name = flag[2:].replace("-", "_")
        if not a.startswith("--") or (flag in known and name not in ALIASES):
            out.append(a)
        elif name in ALIASES:
            target, conv = ALIASES[name]
            if conv is _use_vllm:  # a switch in TRL
                out += ["--rollout", _use_vllm(val if eq else True)]
            elif eq:
                out.append(f"--{target.replace('_', '-')}={conv(val) if conv else val}")
            elif conv is not None and i + 1 < len(argv):
                out += [f"--{target.replace('_', '-')}", conv(argv[i + 1])]
                i += 1
            else:
                out.append(f"--{target.replace('_', '-')}")
        elif name in REFUSED:
            raise ConfigError(_refusal(flag, name))
        elif not any(k.startswith(flag) for k in known):
            raise ConfigError(f"unknown option {flag!r}{_nearest(name, fields)}")
        else:
            out.append(a)  # an abbreviation: argparse resolves it
        i += 1
    return out
