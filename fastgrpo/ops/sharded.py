"""An lm_head weight sharded by FSDP2 (a ``DTensor`` parameter), inside the fused autograd
functions.

A model wrapped with ``fully_shard`` keeps its parameters as sharded DTensors outside its own
forward; a loss that reads ``lm_head.weight`` after the backbone's forward (TRL's adapter, any
code calling ``fused_logprobs(hidden, model.lm_head.weight, ...)``) gets one.  The autograd
functions gather it (``full_tensor()``: one all-gather) for the forward and again for the
backward's recompute, so the whole weight lives only while a pass runs, as FSDP's own
unshard / reshard does; the gradient, computed in full on each rank from that rank's tokens, goes
back as a DTensor with the weight's placements: averaged over the mesh and scattered to the shards
(``Partial("avg")`` redistributed: a reduce-scatter for ``Shard``, an all-reduce for
``Replicate``).  Averaging is FSDP's own default reduction, so the lm_head's gradient matches the
gradients of the parameters FSDP reduces; on a tensor-parallel mesh (the same tokens on every
rank) the average is the rank's own full gradient, as it should be.
"""

from __future__ import annotations

import torch

__all__ = ["is_dtensor", "full_weight", "sharded_grad", "refuse_partitioned"]


def refuse_partitioned(w) -> None:
    """A DeepSpeed ZeRO-3 partitioned parameter (read outside its module's forward, it holds no
    data) is refused by name: the op does not gather ZeRO-3 partitions."""
    if hasattr(w, "ds_id") and getattr(w, "ds_status", None) is not None \
            and w.numel() != getattr(w, "ds_numel", w.numel()):
        raise ValueError(f"weight is a DeepSpeed ZeRO-3 partitioned parameter (full shape "
                         f"{tuple(getattr(w, 'ds_shape', ()))}, holding {w.numel()} elements "
                         f"here): fastgrpo's fused op does not gather ZeRO-3 partitions; use "
                         f"FSDP2 (accelerate fsdp_version 2) or ZeRO-1/2, or pass the weight "
                         f"gathered (deepspeed.zero.GatheredParameters) for forward-only use")


def is_dtensor(w) -> bool:
    return type(w).__name__ == "DTensor" and hasattr(w, "device_mesh")


def full_weight(w: torch.Tensor) -> torch.Tensor:
    """The whole weight as a plain tensor (gathered when ``w`` is a DTensor)."""
    return w.full_tensor() if is_dtensor(w) else w


def sharded_grad(dw: torch.Tensor | None, w: torch.Tensor):
    """``dw`` (this rank's full gradient, or None) as the gradient of ``w``: a DTensor with
    ``w``'s mesh and placements when ``w`` is one, ``dw`` itself otherwise."""
    if dw is None or not is_dtensor(w):
        return dw
    from torch.distributed.tensor import DTensor, Partial
    mesh = w.device_mesh
    part = DTensor.from_local(dw, mesh, [Partial("avg")] * mesh.ndim, run_check=False)
    return part.redistribute(mesh, w.placements)
