"""An lm_head weight sharded by FSDP2 (a ``DTensor`` parameter) or partitioned by DeepSpeed
ZeRO-3, inside the fused autograd functions.

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

A DeepSpeed ZeRO-3 partitioned parameter (read outside its module's forward it holds an empty
tensor; ``ds_shape`` is its real shape) is gathered the way ``deepspeed.zero.GatheredParameters``
does it, which is what that context is: ``fused_logprobs`` / ``grpo_loss`` run whole inside one
(``gathers_partitioned_weight``), so autograd records the weight's full shape, and the
backward's recompute gathers it again (``gathered``), keeping it gathered until autograd has
accumulated its gradient.  The gradient goes back full-size, as a ZeRO-3 module's own backward
produces it, and DeepSpeed's gradient hook on the parameter reduce-scatters it into its
partition (averaged over the data-parallel ranks).  A weight
already gathered (``AVAILABLE``: inside a ``GatheredParameters`` of the caller's, a persistent
small parameter, a tied embedding still in use) is used as it is, as TRL's
``maybe_gather_lm_head_ctx`` does.
"""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["is_dtensor", "sharded_grad", "is_partitioned", "gather_partitioned",
           "gathers_partitioned_weight", "gathered", "is_zero3", "cast_weight"]


def is_partitioned(w) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter whose data is not gathered here now."""
    if not is_zero3(w):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    return w.ds_status != ZeroParamStatus.AVAILABLE


def gather_partitioned(w):
    """A context in which ``w`` holds its whole data: ``deepspeed.zero.GatheredParameters`` (read
    only: partitioned again on exit) for a partitioned ZeRO-3 parameter, nothing otherwise."""
    if not is_partitioned(w):
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters([w], modifier_rank=None)


def gathers_partitioned_weight(fn):
    """Run ``fn(hidden, weight, ...)`` with a ZeRO-3 partitioned ``weight`` gathered."""
    @functools.wraps(fn)
    def wrapper(hidden, weight, *args, **kwargs):
        with gather_partitioned(weight):
            return fn(hidden, weight, *args, **kwargs)
    return wrapper


@contextlib.contextmanager
def gathered(w, grad_follows: bool = False):
    """The whole weight as a plain tensor while the block runs: a DTensor's ``full_tensor()``,
    a partitioned ZeRO-3 parameter gathered, else ``w``.

    ``grad_follows`` (a backward about to return ``w``'s gradient): the ZeRO-3 parameter stays
    gathered until autograd has accumulated that gradient, and a one-shot post-accumulate-grad
    hook partitions it then.  Autograd's ``AccumulateGrad`` lays the new gradient out like the
    parameter's data *as it is then*, and a partitioned parameter's data is an empty tensor (a
    module's own ZeRO-3 backward accumulates while its parameters are still gathered, too).
    DeepSpeed's own hook, registered first, reduce-scatters the gradient before ours runs; a
    parameter some module still holds (a tied embedding inside its backward) is left to that
    module's release."""
    if is_dtensor(w):
        yield w.full_tensor()
    elif not (grad_follows and is_partitioned(w)):
        with gather_partitioned(w):
            yield w
    else:
        w.all_gather(param_list=[w])                    # as GatheredParameters.__enter__ does
        handle = None

        def release(p):
            handle.remove()
            if not p.ds_active_sub_modules:
                p.partition(param_list=[p], has_been_updated=False)

        handle = w.register_post_accumulate_grad_hook(release)
        yield w


class _CastPartitioned(torch.autograd.Function):
    """``w.to(dtype)`` of a gathered ZeRO-3 parameter whose backward gathers it again for the
    gradient's accumulation (see ``gathered``); a plain ``.to`` would accumulate into the
    partitioned (empty) parameter."""

    @staticmethod
    def forward(ctx, w, dtype):
        ctx.save_for_backward(w)
        return w.to(dtype)

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        with gathered(w, grad_follows=ctx.needs_input_grad[0]):
            return g.to(w.dtype), None


def cast_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w.to(dtype)``, for a ZeRO-3 partitioned parameter too (gathered for the cast, and for
    its gradient's accumulation in the backward)."""
    if w.dtype == dtype:
        return w
    if not is_zero3(w):
        return w.to(dtype)
    with gather_partitioned(w):
        return _CastPartitioned.apply(w, dtype)


def is_zero3(w) -> bool:
    """A DeepSpeed ZeRO-3 parameter, gathered now or not."""
    return hasattr(w, "ds_id") and getattr(w, "ds_status", None) is not None


def is_dtensor(w) -> bool:
    return type(w).__name__ == "DTensor" and hasattr(w, "device_mesh")


def sharded_grad(dw: torch.Tensor | None, w: torch.Tensor):
    """``dw`` (this rank's full gradient, or None) as the gradient of ``w``: a DTensor with
    ``w``'s mesh and placements when ``w`` is one, ``dw`` itself otherwise."""
    if dw is None or not is_dtensor(w):
        return dw
    from torch.distributed.tensor import DTensor, Partial
    mesh = w.device_mesh
    part = DTensor.from_local(dw, mesh, [Partial("avg")] * mesh.ndim, run_check=False)
    return part.redistribute(mesh, w.placements)
