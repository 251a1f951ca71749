"""fastgrpo: memory-lean StepGRPO training with fused log-prob / GRPO-loss kernels."""

from fastgrpo.advantages import group_advantages, process_advantages
from fastgrpo.logprobs import fused_logprobs
from fastgrpo.loss import FusedGRPOLoss, grpo_loss

__all__ = ["fused_logprobs", "grpo_loss", "FusedGRPOLoss", "group_advantages",
           "process_advantages"]
__version__ = "0.1.0"
