"""Pack variable-length (prompt + completion) sequences into token-budget micro-batches.

Bins are filled first-fit-decreasing: sequences sorted longest first, each placed into the
first bin with room left under ``max_tokens``, a new bin opened otherwise (a sequence longer
than the budget gets a bin of its own).  Each micro-batch is ONE row, no padding::

    input_ids    [1, L]   the sequences back to back
    position_ids [1, L]   restarting at 0 for every sequence
    cu_seqlens   [S+1]    int32 offsets of the sequences in the row
    targets      [L]      next token of the same sequence at completion positions;
                          ignore_index at prompt positions and at each sequence's last position
    advantages   [L]      float32, the advantage of the target at each position (0 elsewhere)
    seq_index    [S]      which input sequence each packed sequence is, to map results back

Position ``t`` of a sequence predicts token ``t + 1``; it is a loss position when token
``t + 1`` belongs to the completion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from fastgrpo.trainer.sample import Sample

__all__ = ["ffd_bins", "pack_sequences", "MicroBatch", "unpack_per_token", "balance_microbatches",
           "pack_bins"]


def ffd_bins(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """First-fit-decreasing bin packing; returns lists of indices into ``lengths``.

    Ties keep input order (stable sort), so the result is deterministic.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(lengths[i])
        for b, left in enumerate(room):
            if n <= left:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_tokens - n)
    return bins


@dataclass
class MicroBatch:
    input_ids: torch.Tensor      # [1, L] long
    position_ids: torch.Tensor   # [1, L] long
    cu_seqlens: torch.Tensor     # [S+1] int32
    targets: torch.Tensor        # [L] long
    advantages: torch.Tensor     # [L] float32
    seq_index: torch.Tensor      # [S] long
    max_seqlen: int
    ignore_index: int = -100
    extras: dict = field(default_factory=dict)  # per-token tensors added later (old_logp, ref_logp)
    # extra forward inputs of a multimodal row (pixel_values, image_grid_thw...: fastgrpo.vl);
    # then position_ids may be [4, 1, L] (text positions + 3-D mrope)
    model_inputs: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_sequences(self) -> int:
        return int(self.seq_index.numel())

    @property
    def num_loss_tokens(self) -> int:
        return int((self.targets != self.ignore_index).sum())

    def to(self, device) -> "MicroBatch":
        mv = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return MicroBatch(mv(self.input_ids), mv(self.position_ids), mv(self.cu_seqlens),
                          mv(self.targets), mv(self.advantages), self.seq_index, self.max_seqlen,
                          self.ignore_index, {k: mv(v) for k, v in self.extras.items()},
                          {k: mv(v) for k, v in self.model_inputs.items()})


def pack_sequences(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                   advantages: Sequence[float] | torch.Tensor | Sequence[Sequence[float]] | None,
                   max_tokens: int, *, loss_masks: Sequence[Sequence[bool] | None] | None = None,
                   ignore_index: int = -100) -> list[MicroBatch]:
    """Pack ``prompt_ids[i] + completion_ids[i]`` into micro-batches of at most ``max_tokens``.

    ``advantages``: one float per sequence (broadcast over its completion tokens), or one
    sequence of floats per sequence with one value per completion token, or None (zeros).
    ``loss_masks[i]`` (one bool per completion token, or None for all) marks the tokens that
    are scored; an unscored token (a tool output the policy did not write) gets
    ``ignore_index`` as its target, so it adds nothing to the loss or its gradient.
    """
    n = len(prompt_ids)
    if len(completion_ids) != n:
        raise ValueError(f"{n} prompts but {len(completion_ids)} completions")
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    batches = []
    for members in ffd_bins(lengths, max_tokens):
        ids, pos, tgt, adv, cu = [], [], [], [], [0]
        for i in members:
            p, c = list(prompt_ids[i]), list(completion_ids[i])
            seq = p + c
            m = len(seq)
            ids += seq
            pos += range(m)
            # position t predicts seq[t+1]; a loss position when t+1 is a completion token
            t_tgt = [ignore_index] * m
            t_adv = [0.0] * m
            if advantages is None:
                per_tok = [0.0] * len(c)
            else:
                a = advantages[i]
                if isinstance(a, torch.Tensor):
                    a = a.tolist()
                per_tok = list(a) if isinstance(a, (list, tuple)) else [float(a)] * len(c)
                if len(per_tok) != len(c):
                    raise ValueError(f"sequence {i}: {len(per_tok)} per-token advantages for "
                                     f"{len(c)} completion tokens")
            scored = loss_masks[i] if loss_masks is not None else None
            if scored is not None and len(scored) != len(c):
                raise ValueError(f"sequence {i}: loss mask of {len(scored)} for {len(c)} "
                                 f"completion tokens")
            for j in range(len(c)):
                t = len(p) + j - 1
                if t < 0 or (scored is not None and not scored[j]):
                    continue  # no predictor (empty prompt), or a token the policy did not write
                t_tgt[t] = c[j]
                t_adv[t] = float(per_tok[j])
            tgt += t_tgt
            adv += t_adv
            cu.append(cu[-1] + m)
        seqlens = [cu[k + 1] - cu[k] for k in range(len(members))]
        batches.append(MicroBatch(
            input_ids=torch.tensor([ids], dtype=torch.long),
            position_ids=torch.tensor([pos], dtype=torch.long),
            cu_seqlens=torch.tensor(cu, dtype=torch.int32),
            targets=torch.tensor(tgt, dtype=torch.long),
            advantages=torch.tensor(adv, dtype=torch.float32),
            seq_index=torch.tensor(members, dtype=torch.long),
            max_seqlen=max(seqlens), ignore_index=ignore_index,
        ))
    return batches


def balance_microbatches(lengths: Sequence[int], token_budget: int,
                         world: int) -> list[list[list[int]]]:
    """Plan ``plan[rank][micro_batch] = [sequence indices]`` for the global batch.

    1. Sequences are assigned to ranks longest first, each to the rank with the fewest tokens
       so far (LPT greedy; ties -> lower rank), so every rank gets about the same work.
    2. Each rank's sequences are packed first-fit-decreasing into micro-batches of at most
       ``token_budget`` tokens (:func:`ffd_bins`; a longer sequence gets its own).
    3. Ranks with fewer micro-batches get empty ones (``[]``) appended, so every rank runs the
       same number of forward/backward passes and the collectives line up.

    Deterministic: every rank computes the same plan from the same (gathered) lengths.
    """
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


def pack_bins(bins: Sequence[Sequence[int]], samples: Sequence[Sample], pad_token_id: int = 0,
              ignore_index: int = -100) -> list[MicroBatch]:
    """One :class:`MicroBatch` per bin of a rank's plan (``bins`` index into ``samples``;
    ``seq_index`` keeps those indices).  An empty bin becomes a one-token dummy with no loss
    tokens and ``num_sequences == 0`` (it keeps the number of forward/backward passes equal on
    every rank; the loss is 0 with zero gradients for it)."""
    out = []
    for b in bins:
        if not b:
            out.append(MicroBatch(
                input_ids=torch.tensor([[pad_token_id]]), position_ids=torch.zeros(1, 1, dtype=torch.long),
                cu_seqlens=torch.tensor([0, 1], dtype=torch.int32),
                targets=torch.tensor([ignore_index]), advantages=torch.zeros(1),
                seq_index=torch.empty(0, dtype=torch.long), max_seqlen=1))
            continue
        chosen = [samples[i] for i in b]
        (mb,) = pack_sequences([s.prompt_ids for s in chosen], [s.completion_ids for s in chosen],
                               [s.advantage for s in chosen], max_tokens=10 ** 12,
                               loss_masks=[s.loss_mask for s in chosen], ignore_index=ignore_index)
        mb.seq_index = torch.tensor([b[j] for j in mb.seq_index.tolist()], dtype=torch.long)
        out.append(mb)
    return out


def unpack_per_token(batches: Sequence[MicroBatch], values: Sequence[torch.Tensor],
                     num_sequences: int, ignore_index: int = -100) -> list[torch.Tensor]:
    """Map per-token results ``values[b]`` (shape ``[L_b]``) of packed batches back to one
    tensor per input sequence, holding the values at that sequence's loss positions in order
    (i.e. one value per completion token that has a predictor)."""
    out: list[torch.Tensor | None] = [None] * num_sequences
    for mb, v in zip(batches, values):
        cu = mb.cu_seqlens.tolist()
        for k, i in enumerate(mb.seq_index.tolist()):
            sl = slice(cu[k], cu[k + 1])
            keep = mb.targets[sl] != ignore_index
            out[i] = v[sl][keep.to(v.device)]
    return [o if o is not None else torch.empty(0) for o in out]
