"""Rollouts: G sampled completions per prompt with the KV cache (``model.generate``).

Prompts are left-padded into batches; completions are returned grouped by prompt
(``completions[i * G + j]`` is the j-th sample of prompt i), trimmed after the first EOS (the
EOS itself is kept, so the policy is trained to stop), with a ``truncated`` flag for those that
hit ``max_new_tokens`` without an EOS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

__all__ = ["Rollout", "generate"]


@dataclass
class Rollout:
    prompt_ids: list[list[int]]          # one per completion (prompt repeated G times)
    completion_ids: list[list[int]]      # trimmed after EOS (EOS kept)
    texts: list[str]                     # decoded completions, special tokens skipped
    truncated: list[bool]                # hit max_new_tokens without EOS
    prompt_index: list[int]              # which prompt each completion belongs to
    seconds: float = 0.0
    generated_tokens: int = 0
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completion_ids)


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], *, group_size: int = 1,
             max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
             do_sample: bool = True, batch_size: int = 64) -> Rollout:
    """Sample ``group_size`` completions for each prompt (greedy when ``do_sample=False``).

    ``batch_size`` bounds the number of sequences generated together.
    """
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen_cfg = GenerationConfig(
        do_sample=do_sample, temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None, top_k=0 if do_sample else None,
        max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, use_cache=True,
        bos_token_id=tokenizer.bos_token_id,
    )
    # expanded list of (prompt index) in grouped order
    flat = [i for i in range(len(prompt_ids)) for _ in range(group_size)]
    comps: list[list[int]] = []
    trunc: list[bool] = []
    t0 = time.perf_counter()
    for s in range(0, len(flat), batch_size):
        idx = flat[s:s + batch_size]
        width = max(len(prompt_ids[i]) for i in idx)
        inp = torch.full((len(idx), width), pad, dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            p = prompt_ids[i]
            inp[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            att[r, width - len(p):] = 1
        out = model.generate(input_ids=inp.to(device), attention_mask=att.to(device),
                             generation_config=gen_cfg)
        new = out[:, width:].tolist()
        for row in new:
            if eos in row:
                row = row[:row.index(eos) + 1]
                trunc.append(False)
            else:
                trunc.append(True)
            comps.append(row)
    seconds = time.perf_counter() - t0
    if was_training:
        model.train()
    texts = tokenizer.batch_decode(comps, skip_special_tokens=True)
    return Rollout(prompt_ids=[list(prompt_ids[i]) for i in flat], completion_ids=comps,
                   texts=texts, truncated=trunc, prompt_index=flat, seconds=seconds,
                   generated_tokens=sum(len(c) for c in comps))
