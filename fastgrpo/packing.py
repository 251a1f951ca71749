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

__all__ = ["ffd_bins", "pack_sequences", "MicroBatch", "unpack_per_token"]


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
    extras: dict = field(default_factory=dict)  # per-token tensors added later (old_logp, ref_logp)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_sequences(self) -> int:
        return int(self.seq_index.numel())

    @property
    def num_loss_tokens(self) -> int:
        return int((self.targets != -100).sum())

    def to(self, device) -> "MicroBatch":
        mv = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return MicroBatch(mv(self.input_ids), mv(self.position_ids), mv(self.cu_seqlens),
                          mv(self.targets), mv(self.advantages), self.seq_index, self.max_seqlen,
                          {k: mv(v) for k, v in self.extras.items()})


def pack_sequences(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                   advantages: Sequence[float] | torch.Tensor | Sequence[Sequence[float]] | None,
                   max_tokens: int, *, ignore_index: int = -100) -> list[MicroBatch]:
    """Pack ``prompt_ids[i] + completion_ids[i]`` into micro-batches of at most ``max_tokens``.

    ``advantages``: one float per sequence (broadcast over its completion tokens), or one
    sequence of floats per sequence with one value per completion token, or None (zeros).
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
            for j in range(len(c)):
                t = len(p) + j - 1
                if t < 0:  # completion with an empty prompt: its first token has no predictor
                    continue
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
            max_seqlen=max(seqlens),
        ))
    return batches


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
