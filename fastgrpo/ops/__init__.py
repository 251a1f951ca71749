"""The fused operations other RL codebases import: log-probs and entropies from hidden states,
the clipped GRPO-family objective, group advantages.  They know tensors only."""

from fastgrpo.ops.advantages import group_advantages, process_advantages
from fastgrpo.ops.logprobs import fused_logprobs
from fastgrpo.ops.loss import FusedGRPOLoss, grpo_loss
from fastgrpo.ops.loss_config import LossConfig

__all__ = ["fused_logprobs", "grpo_loss", "FusedGRPOLoss", "LossConfig", "group_advantages",
           "process_advantages"]
