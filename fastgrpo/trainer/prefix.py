"""Shared prompts: a packed row whose G samples of one prompt carry that prompt once.

GRPO samples G completions per prompt; packed as they are, a micro-batch holds the same
prompt G times and the backbone computes it G times (every linear layer, every attention).
:func:`share_prompts` rewrites the row so that each distinct prompt appears once, followed by
the completions that continue it::

    packed row   [P c1] [P c2] [P c3] [Q d1]          (L tokens)
    shared row   [P c1 c2 c3] [Q d1]                  (L' = L - 2|P| tokens)

Completion tokens keep their positions (``|P| + j``); each completion attends to its prompt
and causally to itself, never to a sibling (``sdpa_varlen`` reads the layout from the
``shared_prefix_groups`` forward kwarg).  ``expand`` maps every position of the original row
to its row in the shared one, so ``hidden_shared[expand]`` is the original row's hidden
states: the loss, its targets and every per-token tensor keep the packed layout, and the
gradient of a shared prompt position is the sum over its completions (``index_select``'s
backward), exactly what the G separate copies would receive in total.

The prompt of a sequence is everything up to and including the position that predicts its
first loss target (the tokens before it are identical across a group; the hidden state at
that position predicts the first completion token of each member, and ``expand`` hands it to
each).  Rows with extra model inputs (images), 3-D positions, or models with sliding-window
attention are left alone (``None``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["SharedRow", "share_prompts", "enabled"]


@dataclass
class SharedRow:
    input_ids: torch.Tensor       # [1, L'] long
    position_ids: torch.Tensor    # [1, L'] long
    expand: torch.Tensor          # [L] long: row of the shared layout for each original position
    groups: tuple                 # ((prompt_start, prompt_len, ((start, len), ...)), ...) in L'


def enabled() -> bool:
    """On unless ``FASTGRPO_SHARE_PROMPTS=0`` (for measuring what it saves)."""
    return os.environ.get("FASTGRPO_SHARE_PROMPTS", "1") != "0"


def _has_sliding_window(config) -> bool:
    types = getattr(config, "layer_types", None)
    if types:
        return any("sliding" in t for t in types)
    return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True)


def share_prompts(mb, config=None) -> SharedRow | None:
    """The shared-prompt layout of micro-batch ``mb`` (``fastgrpo.trainer.packing.MicroBatch``),
    or None when no two sequences of the row share a prompt (or the row cannot be shared)."""
    if mb.model_inputs or mb.position_ids.dim() != 2 or mb.input_ids.shape[0] != 1:
        return None
    if config is not None and _has_sliding_window(config):
        return None
    ids = mb.input_ids[0].tolist()
    loss = (mb.targets != mb.ignore_index).tolist()
    cu = mb.cu_seqlens.tolist()
    order: dict[tuple, list[tuple[int, int, int]]] = {}  # prompt -> [(start, end, prompt_len)]
    for s, e in zip(cu[:-1], cu[1:]):
        first = next((t for t in range(s, e) if loss[t]), None)
        p = e - s if first is None else first - s + 1
        order.setdefault((p, tuple(ids[s:s + p])), []).append((s, e, p))
    if all(len(m) == 1 for m in order.values()):
        return None
    new_ids, new_pos, groups = [], [], []
    expand = [0] * len(ids)
    for members in order.values():
        s0, _, p = members[0]
        ps = len(new_ids)
        new_ids += ids[s0:s0 + p]
        new_pos += range(p)
        comps = []
        for s, e, _ in members:
            expand[s:s + p] = range(ps, ps + p)
            cs = len(new_ids)
            new_ids += ids[s + p:e]
            new_pos += range(p, e - s)
            expand[s + p:e] = range(cs, cs + e - s - p)
            if e - s - p:
                comps.append((cs, e - s - p))
        groups.append((ps, p, tuple(comps)))
    dev = mb.input_ids.device
    return SharedRow(torch.tensor([new_ids], device=dev), torch.tensor([new_pos], device=dev),
                     torch.tensor(expand, device=dev), tuple(groups))
