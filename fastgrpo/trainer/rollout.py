"""Rollouts: G sampled completions per prompt with the KV cache (``model.generate``).

Prompts are left-padded into batches; the samples come back grouped by prompt
(``samples[i * G + j]`` is the j-th sample of prompt i, ``group == i``), trimmed after the first
EOS (the EOS itself is kept, so the policy is trained to stop), with ``truncated`` set for those
that hit ``max_new_tokens`` without an EOS.  Token ids are exactly as generated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fastgrpo.trainer.sample import Sample

__all__ = ["Rollout", "generate"]


@dataclass
class Rollout:
    samples: list[Sample] = field(default_factory=list)   # grouped by prompt
    seconds: float = 0.0                                    # wall time of the generation
    generated_tokens: int = 0

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.samples]


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], *, group_size: int = 1,
             max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
             do_sample: bool = True, batch_size: int = 64, rows: list[int] | None = None) -> Rollout:
    """Sample ``group_size`` completions for each prompt (greedy when ``do_sample=False``).

    ``batch_size`` bounds the number of sequences generated together; ``rows[i]`` (default
    ``i``) is the data row of prompt ``i``, kept in each sample's ``row``.
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
    samples = [Sample(prompt_ids=list(prompt_ids[i]), completion_ids=c, group=i,
                      row=i if rows is None else rows[i], text=t,
                      truncated=tr) for i, c, t, tr in zip(flat, comps, texts, trunc)]
    return Rollout(samples, seconds=seconds, generated_tokens=sum(len(c) for c in comps))
