"""fastgrpo: memory-lean StepGRPO training with fused log-prob / GRPO-loss kernels.

Layers: ``fastgrpo.ops`` (the fused loss; what other codebases import), ``fastgrpo.rewards``,
``fastgrpo.trainer`` (``python -m fastgrpo.train``), ``fastgrpo.tasks`` (built-in tasks and
their data), ``fastgrpo.integrations`` (TRL, verl, OpenRLHF) and ``fastgrpo.hf`` (the Hugging
Face model helpers they share).
"""

from fastgrpo.ops import (FusedGRPOLoss, LossConfig, fused_logprobs, group_advantages, grpo_loss,
                          process_advantages)

__all__ = ["fused_logprobs", "grpo_loss", "FusedGRPOLoss", "LossConfig", "group_advantages",
           "process_advantages"]
__version__ = "0.1.0"
