"""Optional dependencies a run needs, checked before any work (``ConfigError`` + install command).

=============  ===================================  =========================================
package        needed by                            install
=============  ===================================  =========================================
Pillow         ``--task charts``, a vision-language  ``pip install 'fastgrpo[vl]'``
               ``--model``, data rows with images
peft           ``--lora-r N``                       ``pip install 'fastgrpo[lora]'``
tensorboard    ``--report-to tensorboard``          ``pip install 'fastgrpo[tensorboard]'``
wandb          ``--report-to wandb``                ``pip install 'fastgrpo[wandb]'``
vLLM           ``--rollout vllm``                   ``pip install 'fastgrpo[vllm]'`` (README)
matplotlib     nothing: ``curves.png`` falls back   ``pip install matplotlib`` (nicer plots)
               to a built-in PNG writer
=============  ===================================  =========================================
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from fastgrpo.trainer.config import ConfigError, report_targets

__all__ = ["require", "check_dependencies", "PACKAGES"]

# name -> (import name, install command)
PACKAGES = {
    "Pillow": ("PIL", "pip install 'fastgrpo[vl]'"),
    "peft": ("peft", "pip install 'fastgrpo[lora]'"),
    "tensorboard": ("tensorboard", "pip install 'fastgrpo[tensorboard]'"),
    "wandb": ("wandb", "pip install 'fastgrpo[wandb]'"),
    "vLLM": ("vllm", "pip install 'fastgrpo[vllm]' (on CPU: README, Rollouts)"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(package: str, why: str) -> None:
    """``ConfigError`` naming ``why`` and the install command when ``package`` is missing."""
    module, install = PACKAGES[package]
    if not _installed(module):
        raise ConfigError(f"{why} needs {package}, which is not installed: {install}")


def _is_vision_model_dir(model: str) -> bool:
    try:
        conf = json.loads((Path(model) / "config.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return False
    return isinstance(conf, dict) and "vision_config" in conf


def check_dependencies(cfg) -> None:
    """Every optional package the options of ``cfg`` (a ``TrainConfig``) need is installed."""
    if cfg.task == "charts":
        require("Pillow", "--task charts (chart images)")
    if cfg.model and _is_vision_model_dir(cfg.model):
        require("Pillow", f"--model {cfg.model} (a vision-language model: its images)")
    if cfg.lora_r:
        require("peft", f"--lora-r {cfg.lora_r}")
    for target in report_targets(cfg.report_to):
        require({"tensorboard": "tensorboard", "wandb": "wandb"}[target], f"--report-to {target}")
    if cfg.rollout == "vllm":
        require("vLLM", "--rollout vllm")
