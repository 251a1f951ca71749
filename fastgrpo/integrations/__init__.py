"""Using fastgrpo's fused loss inside other RL codebases.

* ``fastgrpo.integrations.generic``: framework-neutral ``policy_loss`` (hidden states +
  lm_head weight + batch -> loss, metrics), ``backbone_hidden_states``, ``lm_head_weight``
  and thin verl / OpenRLHF argument adapters.  Re-exported here.
* ``fastgrpo.integrations.trl``: ``FastGRPOTrainer`` / ``patch_grpo_trainer`` for TRL's
  ``GRPOTrainer`` (needs ``pip install "fastgrpo[trl]"``; imported on demand, not here).
* ``fastgrpo.integrations.verl``: importing it registers ``impl_backend="fastgrpo"`` for verl's
  own fused-kernel actor forward (``use_fused_kernels``; needs verl; imported on demand).
"""

from fastgrpo.integrations.generic import (backbone_hidden_states, lm_head_weight,
                                           openrlhf_policy_loss, policy_loss, verl_policy_loss)

__all__ = ["policy_loss", "backbone_hidden_states", "lm_head_weight", "verl_policy_loss",
           "openrlhf_policy_loss"]
