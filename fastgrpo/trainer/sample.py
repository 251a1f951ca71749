"""What flows from rollout to loss: one :class:`Sample` per sampled completion.

A sample is filled in stage by stage, and each stage reads only what the earlier ones wrote::

    rollout     prompt_ids, prompt_inputs, completion_ids, loss_mask, text, truncated, group, row
    score       reward (the weighted total; per-function values stay in the RewardResult)
    advantages  advantage (one float, or one per completion token)
    pack        -> fastgrpo.trainer.packing.MicroBatch (token rows for the fused loss)

Fields for what later steps need ride along without reshaping the loop: ``prompt_inputs``
holds model inputs beyond the token ids (a vision-language prompt's ``pixel_values`` and
``image_grid_thw``), ``loss_mask`` marks completion tokens the policy did not write (tool
outputs) as unscored, ``sampling_logp`` keeps a rollout engine's own log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Sample"]


@dataclass
class Sample:
    prompt_ids: list[int]                  # the prompt as the model saw it
    completion_ids: list[int]              # exactly as generated (EOS kept), plus tool tokens
    group: int                             # index of its prompt group within the step
    row: int                               # index of its prompt in the training data
    text: str = ""                         # the decoded completion (special tokens skipped)
    truncated: bool = False                # hit the token limit without an EOS
    loss_mask: list[bool] | None = None    # per completion token; None = every token scored
    prompt_inputs: dict[str, Any] = field(default_factory=dict)   # pixel_values, image_grid_thw...
    sampling_logp: list[float] | None = None   # the rollout engine's log-probs, when it gives them
    reward: float = 0.0
    advantage: float | list[float] = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def num_scored(self) -> int:
        """Completion tokens that enter the loss."""
        if self.loss_mask is None:
            return len(self.completion_ids)
        return sum(bool(m) for m in self.loss_mask)
