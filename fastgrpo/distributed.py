"""Data parallelism for the trainer: ``torchrun --nproc-per-node K -m fastgrpo.train ...``.

API::

    from fastgrpo import distributed as dist_

    info = dist_.init_distributed()          # DistInfo(rank, world_size, local_rank, device, backend)
    # rollouts: this rank generates whole groups only
    groups = dist_.groups_for_rank(num_prompts, info.rank, info.world_size)       # prompt indices
    seqs = dist_.split_groups_across_ranks(num_prompts, G, info.rank, info.world_size)  # completion indices
    # ... generate + reward + group advantages locally (groups are whole) ...
    # training: gather every rank's sequences, balance them by length across ranks
    everything = dist_.all_gather_objects(local_rows)           # list per rank -> flatten
    plan = dist_.balance_microbatches(lengths, cfg.micro_batch_tokens, info.world_size)
    my_bins = plan[info.rank]            # same number of micro-batches on every rank; [] = padding
    batches = dist_.pack_bins(my_bins, prompt_ids, completion_ids, advantages)  # MicroBatch each
    # normalizer over the GLOBAL batch (real sequences only)
    n_seq = dist_.global_sum(sum(mb.num_sequences for mb in batches))
    n_tok = dist_.global_sum(sum(mb.num_loss_tokens for mb in batches))
    num_items = <n_seq | n_tok | n_seq * max_new_tokens by loss type>
    policy = dist_.wrap_model(model, info.device)     # returns (hidden, lm_head weight) when called
    for i, mb in enumerate(batches):
        with dist_.sync_gradients(policy, last=(i == len(batches) - 1)):
            hidden, weight = policy(mb.input_ids, mb.position_ids, **attn_kwargs)
            loss, m = grpo_loss(hidden, weight, ..., num_items_in_batch=num_items)
            (loss * dist_.loss_scale(info.world_size)).backward()
    clip_grad_norm_ / optimizer.step() as usual (identical on every rank)

Why ``loss_scale``: DDP and FSDP2 *average* gradients over ranks.  Each rank's loss is its
share of the global loss (``num_items_in_batch`` is the global count), so the global-batch
gradient is the *sum* over ranks; multiplying each rank's loss by ``world_size`` turns the
average back into that sum.  (Equivalently pass ``num_items_in_batch / world_size``.)  Report
the unscaled ``loss`` in metrics; sum it over ranks with ``global_sum`` for the global loss.

Why ``PolicyHiddenStates`` (what ``wrap_model`` wraps): DDP synchronises gradients only for a
forward that went through the DDP wrapper, and the trainer never calls the lm_head; so the
wrapped module's forward runs the backbone and returns ``(hidden, lm_head.weight)``.  The
lm_head weight is then a forward output of the wrapper, and its gradient (from the fused loss)
is synchronised like any other.  Generation uses the plain model (``unwrap_model``): with DDP
the parameters are the same tensors; with FSDP2 generate inside ``gather_for_generation``.

Empty micro-batches (``[]`` in the plan) keep the number of forward/backward calls equal on
every rank (collectives must match); ``pack_bins`` turns them into a one-token dummy with no
loss tokens and no sequences: ``grpo_loss`` returns 0 with zero gradients for it.

Backends: ``nccl`` on CUDA, ``gloo`` on CPU.  ``wrap_model`` uses FSDP2 ``fully_shard`` (per
decoder layer, then the root) on CUDA and DDP elsewhere (or when ``strategy="ddp"``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "PolicyHiddenStates",
    "all_gather_objects",
    "balance_microbatches",
    "barrier",
    "broadcast_object",
    "cleanup_distributed",
    "gather_for_generation",
    "gather_rng_states",
    "global_sum",
    "groups_for_rank",
    "init_distributed",
    "is_distributed",
    "loss_scale",
    "pack_bins",
    "split_groups_across_ranks",
    "sync_gradients",
    "unwrap_model",
    "wrap_model",
]


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


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ----------------------------------------------------------------------------- splitting work


def groups_for_rank(num_groups: int, rank: int, world: int) -> list[int]:
    """Contiguous block of group (prompt) indices for ``rank``; sizes differ by at most one
    (the first ``num_groups % world`` ranks take one more)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    base, extra = divmod(int(num_groups), world)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (1 if rank < extra else 0)))


def split_groups_across_ranks(num_groups: int, group_size: int, rank: int, world: int) -> list[int]:
    """Indices of the completions (``group * group_size + j``) this rank generates: whole
    groups only, so group-relative advantages need no communication."""
    return [g * group_size + j for g in groups_for_rank(num_groups, rank, world)
            for j in range(group_size)]


def balance_microbatches(lengths: Sequence[int], token_budget: int,
                         world: int) -> list[list[list[int]]]:
    """Plan ``plan[rank][micro_batch] = [sequence indices]`` for the global batch.

    1. Sequences are assigned to ranks longest first, each to the rank with the fewest tokens
       so far (LPT greedy; ties -> lower rank), so every rank gets about the same work.
    2. Each rank's sequences are packed first-fit-decreasing into micro-batches of at most
       ``token_budget`` tokens (``fastgrpo.packing.ffd_bins``; a longer sequence gets its own).
    3. Ranks with fewer micro-batches get empty ones (``[]``) appended, so every rank runs the
       same number of forward/backward passes and the collectives line up.

    Deterministic: every rank computes the same plan from the same (gathered) lengths.
    """
    from fastgrpo.packing import ffd_bins

    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if token_budget <= 0:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    load = [0] * world
    count = [0] * world
    per_rank: list[list[int]] = [[] for _ in range(world)]
    for i in order:
        r = min(range(world), key=lambda k: (load[k], count[k], k))
        per_rank[r].append(i)
        load[r] += int(lengths[i])
        count[r] += 1
    plan = []
    for members in per_rank:
        bins = ffd_bins([lengths[i] for i in members], token_budget) if members else []
        plan.append([sorted(members[j] for j in b) for b in bins])
    n = max((len(p) for p in plan), default=0)
    for p in plan:
        p.extend([] for _ in range(n - len(p)))
    return plan


def pack_bins(bins: Sequence[Sequence[int]], prompt_ids, completion_ids, advantages,
              pad_token_id: int = 0) -> list:
    """One ``fastgrpo.packing.MicroBatch`` per bin of a rank's plan (sequence indices are
    global; ``seq_index`` keeps them).  An empty bin becomes a one-token dummy with no loss
    tokens and ``num_sequences == 0``."""
    from fastgrpo.packing import MicroBatch, pack_sequences

    out = []
    for b in bins:
        if not b:
            out.append(MicroBatch(
                input_ids=torch.tensor([[pad_token_id]]), position_ids=torch.zeros(1, 1, dtype=torch.long),
                cu_seqlens=torch.tensor([0, 1], dtype=torch.int32),
                targets=torch.tensor([-100]), advantages=torch.zeros(1),
                seq_index=torch.empty(0, dtype=torch.long), max_seqlen=1))
            continue
        adv = [advantages[i] for i in b] if advantages is not None else None
        (mb,) = pack_sequences([prompt_ids[i] for i in b], [completion_ids[i] for i in b], adv,
                               max_tokens=10 ** 12)
        mb.seq_index = torch.tensor([b[j] for j in mb.seq_index.tolist()], dtype=torch.long)
        out.append(mb)
    return out


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
    from fastgrpo.checkpoint import capture_rng_state
    return all_gather_objects(capture_rng_state())


def loss_scale(world_size: int | None = None) -> float:
    """Factor on each rank's loss so that averaged (DDP/FSDP2) gradients equal the gradient of
    the global-batch loss when ``num_items_in_batch`` is the global count: the world size."""
    if world_size is None:
        world_size = dist.get_world_size() if is_distributed() else 1
    return float(world_size)


# ----------------------------------------------------------------------------- model wrapping


class PolicyHiddenStates(torch.nn.Module):
    """Forward = backbone hidden states + the lm_head weight, for the fused loss.

    ``forward(input_ids [1, L], position_ids [1, L], **attn_kwargs) -> (hidden [L, D], weight [V, D])``
    (a packed row: the batch dimension of 1 is dropped, as ``grpo_loss``'s packed layout
    takes it; ``[B, T, D]`` is returned unchanged for B > 1).  Packed rows: ``position_ids``
    restart per sequence, no attention mask, no cache.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids=None, **attn_kwargs):
        out = self.model.base_model(input_ids=input_ids, position_ids=position_ids,
                                    use_cache=False, **attn_kwargs)
        head = self.model.get_output_embeddings()
        hidden = out.last_hidden_state
        return (hidden[0] if hidden.shape[0] == 1 else hidden), head.weight


def _decoder_layers(model) -> list[torch.nn.Module]:
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    return list(layers) if layers is not None else []


def wrap_model(model: torch.nn.Module, device=None, *, strategy: str = "auto",
               mixed_precision: bool = False) -> torch.nn.Module:
    """Wrap ``model`` (a HF causal LM) for data-parallel training.

    Returns a module whose forward gives ``(hidden, lm_head_weight)`` (``PolicyHiddenStates``):
    not distributed -> the plain ``PolicyHiddenStates``; ``strategy="auto"`` -> FSDP2
    ``fully_shard`` on CUDA, DDP on CPU (gloo); ``"ddp"`` / ``"fsdp"`` force one.
    Build the optimizer from ``wrapped.parameters()`` *after* wrapping (FSDP2 replaces the
    parameters by sharded DTensors).  ``mixed_precision`` (FSDP2 only): bf16 compute, fp32
    gradient reduction.
    """
    policy = PolicyHiddenStates(model)
    if not is_distributed():
        return policy
    device = torch.device(device) if device is not None else \
        (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    if strategy not in ("auto", "ddp", "fsdp"):
        raise ValueError(f"strategy must be auto, ddp or fsdp, got {strategy!r}")
    use_fsdp = strategy == "fsdp" or (strategy == "auto" and device.type == "cuda")
    model.to(device)
    if use_fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        kw = {}
        if mixed_precision:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                   reduce_dtype=torch.float32)
        for layer in _decoder_layers(model):
            fully_shard(layer, **kw)
        fully_shard(policy, **kw)
        # one forward through the root now (every rank, token id 0): FSDP2 initialises lazily
        # at the first forward, and generation later calls the inner layers directly, which
        # would otherwise each initialise as a root of their own.  The root keeps its
        # parameters unsharded after a forward: reshard, so that ``policy.parameters()`` (the
        # optimizer's) are the sharded ones again
        with torch.no_grad():
            one = torch.zeros(1, 1, dtype=torch.long, device=device)
            policy(one, one)
        policy.reshard()
        return policy
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    return DDP(policy, device_ids=ids)


def unwrap_model(wrapped: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside ``wrap_model``'s result (for generate, save, eval)."""
    m = wrapped
    if type(m).__name__ == "DistributedDataParallel":
        m = m.module
    if isinstance(m, PolicyHiddenStates):
        m = m.model
    return m


@contextlib.contextmanager
def sync_gradients(wrapped: torch.nn.Module, last: bool):
    """Gradient accumulation: communicate only on the ``last`` micro-batch of a step.

    DDP: ``no_sync()`` on the others.  FSDP2: ``set_requires_gradient_sync(last)``.
    Otherwise a no-op.  Every rank must run the same number of micro-batches.
    """
    if type(wrapped).__name__ == "DistributedDataParallel":
        ctx = contextlib.nullcontext() if last else wrapped.no_sync()
        with ctx:
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


@contextlib.contextmanager
def gather_for_generation(wrapped: torch.nn.Module):
    """Context in which ``unwrap_model(wrapped).generate(...)`` may run.

    FSDP2: every ``fully_shard``-ed module is all-gathered once (``unshard``) and kept
    unsharded (``set_reshard_after_forward(False)``), so generation runs *no* collectives and
    ranks may generate different numbers of tokens; resharded on exit.  DDP / single process:
    nothing to do (the parameters are the model's own).
    """
    fsdp_mods = [m for m in wrapped.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]
    if not fsdp_mods:
        yield
        return
    for m in fsdp_mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in fsdp_mods:
            # back to FSDP2's own settings: inner modules reshard after forward; the root does
            # not (its lazy init sets that), and must not here since the lm_head weight it
            # returns is used by the loss after the forward
            m.set_reshard_after_forward(m is not wrapped, recurse=False)
            m.reshard()
