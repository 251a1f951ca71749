"""Collectives for data parallelism: ``torchrun --nproc-per-node K -m fastgrpo.train ...``.

What K ranks do in one step (the loop in ``fastgrpo.trainer.loop``)::

    info = init_distributed()                       # DistInfo(rank, world_size, local_rank, device)
    groups = groups_for_rank(num_prompts, info.rank, info.world_size)   # whole prompt groups
    # ... generate + reward + group advantages locally (groups are whole) ...
    everything = all_gather_objects(local_samples)  # list per rank, in rank order
    plan = packing.balance_microbatches(lengths, budget, info.world_size)  # same count per rank
    num_items = global_sum(<sequences or tokens of this rank>)           # global normalizer
    (loss * loss_scale()).backward()                # DDP/FSDP2 average -> the global sum

Why ``loss_scale``: DDP and FSDP2 *average* gradients over ranks.  Each rank's loss is its
share of the global loss (``num_items_in_batch`` is the global count), so the global-batch
gradient is the *sum* over ranks; multiplying each rank's loss by ``world_size`` turns the
average back into that sum.  Model wrapping (DDP / FSDP2) lives in ``fastgrpo.trainer.policy``.

Backends: ``nccl`` on CUDA, ``gloo`` on CPU.  Every function is a no-op (or returns its input)
in a single process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "all_gather_objects", "barrier", "broadcast_object", "cleanup_distributed",
           "gather_rng_states", "global_sum", "groups_for_rank", "init_distributed",
           "is_distributed", "loss_scale"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(backend: str | None = None, device: str | torch.device | None = None,
                     timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``).

    Single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``): a no-op returning rank 0 of 1.
    ``backend`` defaults to ``nccl`` when CUDA is available (each process takes
    ``cuda:LOCAL_RANK``) and ``gloo`` otherwise.  ``device="cpu"`` forces gloo on a GPU host.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    want_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if want_cuda:
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistInfo(0, 1, 0, dev, None)
    if not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        kw: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
        if dev.type == "cuda" and backend == "nccl":
            kw["device_id"] = dev
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kw)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend())


def cleanup_distributed(synchronize: bool = False) -> None:
    """Destroy the process group; ``synchronize``: after a barrier (only where every rank is
    known to get there: a failed rank would leave the others waiting for the timeout)."""
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def groups_for_rank(num_groups: int, rank: int, world: int) -> list[int]:
    """Contiguous block of group (prompt) indices for ``rank``; sizes differ by at most one
    (the first ``num_groups % world`` ranks take one more)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    base, extra = divmod(int(num_groups), world)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (1 if rank < extra else 0)))


# ----------------------------------------------------------------------------- collectives


def global_sum(x, group=None):
    """Sum of ``x`` (a number or tensor) over all ranks; ``x`` itself when not distributed.
    Numbers come back as float; tensors are summed in place of a copy, on their device."""
    if not is_distributed():
        return x if isinstance(x, torch.Tensor) else float(x)
    if isinstance(x, torch.Tensor):
        t = x.detach().clone()
    else:
        dev = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(group) == "nccl" else torch.device("cpu")
        t = torch.tensor(float(x), dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t if isinstance(x, torch.Tensor) else float(t.item())


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when not distributed."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_rng_states() -> list[dict]:
    """Per-rank RNG states for ``checkpoint.save_checkpoint(rng_states=...)`` (collective)."""
    from fastgrpo.trainer.checkpoint import capture_rng_state
    return all_gather_objects(capture_rng_state())


def loss_scale(world_size: int | None = None) -> float:
    """Factor on each rank's loss so that averaged (DDP/FSDP2) gradients equal the gradient of
    the global-batch loss when ``num_items_in_batch`` is the global count: the world size."""
    if world_size is None:
        world_size = dist.get_world_size() if is_distributed() else 1
    return float(world_size)
