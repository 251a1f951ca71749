"""Rollouts: G sampled completions per prompt with the KV cache.

:func:`generate` (the ``hf`` rollout engine) prefills each prompt ONCE, repeats its KV cache for
its G samples (``Cache.batch_repeat_interleave``) and decodes them together; a finished sequence
(EOS) leaves the batch and the cache (``Cache.batch_select_indices``), so it costs no compute
after it stops.  Greedy outputs equal ``model.generate``'s (:func:`generate_reference`, the
previous implementation, kept as the test oracle).

Prompts are left-padded into batches; the samples come back grouped by prompt
(``samples[i * G + j]`` is the j-th sample of prompt i, ``group == i``), trimmed after the first
EOS (the EOS itself is kept, so the policy is trained to stop), with ``truncated`` set for those
that hit ``max_new_tokens`` without an EOS.  Token ids are exactly as generated (never decoded
and re-encoded); ``sampling_logp`` holds each token's log-prob under the sampling distribution
at ``temperature`` (before top-p / top-k / min-p truncation and the repetition penalty: the
distribution the trainer's loss computes, so the importance ratio is 1 on-policy).
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass, field

import torch

from fastgrpo.trainer.sample import Sample

__all__ = ["Rollout", "generate", "generate_reference", "left_pad", "make_samples", "new_cache", "cache_kwarg",
           "pick_token"]


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


def make_samples(tokenizer, prompt_ids: list[list[int]], group_size: int, comps: list[list[int]],
                 logps: list[list[float]] | None, rows: list[int] | None, seconds: float,
                 stop: list[str] | None = None) -> Rollout:
    """The :class:`Rollout` of raw completions (grouped by prompt): trimmed after the first EOS
    (kept), ``truncated`` when there is none and the text holds none of the ``stop`` strings,
    decoded for the rewards."""
    eos = tokenizer.eos_token_id
    samples = []
    for k, c in enumerate(comps):
        i = k // group_size
        lp = None if logps is None else logps[k]
        trunc = eos not in c
        if not trunc:
            n = c.index(eos) + 1
            c, lp = c[:n], None if lp is None else lp[:n]
        samples.append(Sample(prompt_ids=list(prompt_ids[i]), completion_ids=c, group=i,
                              row=i if rows is None else rows[i], truncated=trunc,
                              sampling_logp=lp))
    for s, t in zip(samples, tokenizer.batch_decode([s.completion_ids for s in samples],
                                                    skip_special_tokens=True)):
        s.text = t
        if s.truncated and stop and any(x in t for x in stop):  # ended at a stop string
            s.truncated = False
    return Rollout(samples, seconds=seconds,
                   generated_tokens=sum(len(s.completion_ids) for s in samples))


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], *, group_size: int = 1,
             max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
             do_sample: bool = True, batch_size: int = 64, rows: list[int] | None = None,
             prompt_inputs: list[dict] | None = None, vision=None, top_k: int = 0,
             min_p: float = 0.0, repetition_penalty: float = 1.0,
             stop: list[str] | None = None) -> Rollout:
    """Sample ``group_size`` completions for each prompt (greedy when ``do_sample=False``).

    ``batch_size`` bounds the number of sequences decoded together (``batch_size // G`` prompts
    per batch, at least one); ``rows[i]`` (default ``i``) is the data row of prompt ``i``,
    kept in each sample's ``row``.  Vision-language prompts: ``prompt_inputs[i]`` (pixel
    values...) and ``vision`` (a ``fastgrpo.vl.VisionAdapter``): the images enter the one prefill
    of each prompt, whose KV cache its G samples share; each sample keeps its prompt's inputs.

    ``top_k`` / ``min_p`` / ``repetition_penalty`` (as transformers' logits processors) shape
    the sampling distribution only (the recorded log-probs stay the policy's at
    ``temperature``, as with top-p; greedy decoding ignores them).  ``stop``: a completion
    ends once its decoded text contains one of these strings (kept, as transformers'
    ``stop_strings`` do), greedy or sampled.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    was_training = model.training
    model.eval()
    per_batch = max(1, batch_size // group_size)
    comps: list[list[int]] = []
    logps: list[list[float]] = []
    t0 = time.perf_counter()
    try:
        for s in range(0, len(prompt_ids), per_batch):
            c, lp = _decode(model, prompt_ids[s:s + per_batch], group_size, max_new_tokens,
                            eos, pad, temperature if do_sample else None, top_p,
                            None if prompt_inputs is None else prompt_inputs[s:s + per_batch],
                            vision, _Shaping(top_k, min_p, repetition_penalty, stop or [],
                                             tokenizer))
            comps += c
            logps += lp
    finally:
        if was_training:
            model.train()
    ro = make_samples(tokenizer, prompt_ids, group_size, comps, logps, rows,
                      time.perf_counter() - t0, stop)
    if prompt_inputs is not None:
        for smp in ro.samples:
            smp.prompt_inputs = prompt_inputs[smp.group]
    return ro


def new_cache(model, capacity: int):
    """A ``DynamicCache`` whose layers write into buffers of ``capacity`` positions (appending a
    token then costs a write, not a copy of the whole cache as ``torch.cat`` does); a plain
    ``DynamicCache`` where its layers are not the plain dynamic kind (sliding windows...)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()
    layers = getattr(cache, "layers", None)
    if layers and all(type(layer) is DynamicLayer for layer in layers):
        cache.layers = [_buffered_layer()(capacity) for _ in layers]
    return cache


@functools.cache
def _buffered_layer():
    """The buffered cache layer class (built on first use: transformers imports lazily)."""
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):
        """``keys``/``values`` are views of the first ``n`` positions of preallocated buffers."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.n, self.buf = capacity, 0, None

        def _views(self):
            self.keys, self.values = self.buf[0][:, :, :self.n], self.buf[1][:, :, :self.n]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            new = key_states.shape[-2]
            if self.buf is None or self.n + new > self.buf[0].shape[-2]:
                size = max(self.capacity, 2 * (self.n + new))
                bufs = []
                for x, old in zip((key_states, value_states), self.buf or (None, None)):
                    b = x.new_empty((*x.shape[:2], size, x.shape[-1]))
                    if old is not None:
                        b[:, :, :self.n] = old[:, :, :self.n]
                    bufs.append(b)
                self.buf = tuple(bufs)
            self.buf[0][:, :, self.n:self.n + new] = key_states
            self.buf[1][:, :, self.n:self.n + new] = value_states
            self.n += new
            self._views()
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.n:
                self.buf = tuple(b.repeat_interleave(repeats, dim=0) for b in self.buf)
                self._views()

        def batch_select_indices(self, indices) -> None:
            if self.n:
                self.buf = tuple(b[indices] for b in self.buf)
                self._views()

    return BufferedLayer


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache (``cache`` in transformers 5.2x, formerly
    ``past_key_values``)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class _Shaping:
    """The sampling options besides temperature and top-p, and the stop strings."""
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: list = field(default_factory=list)
    tokenizer: object = None

    def active(self, seen: torch.Tensor | None) -> bool:
        """Whether :meth:`penalize` changes anything."""
        return self.top_k > 0 or self.min_p > 0 or (seen is not None and self.repetition_penalty != 1.0)

    def penalize(self, scaled: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """transformers' RepetitionPenaltyLogitsProcessor: a seen token's logit divided by the
        penalty when positive, multiplied when negative; top-k; min-p (on the probabilities
        at temperature, as transformers' MinPLogitsWarper)."""
        if seen is not None and self.repetition_penalty != 1.0:
            p = self.repetition_penalty
            scaled = torch.where(seen, torch.where(scaled > 0, scaled / p, scaled * p), scaled)
        if self.top_k > 0 and self.top_k < scaled.shape[-1]:
            kth = scaled.topk(self.top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, -float("inf"))
        if self.min_p > 0:
            probs = scaled.softmax(-1)
            scaled = scaled.masked_fill(probs < self.min_p * probs.amax(-1, keepdim=True), -float("inf"))
        return scaled

    def stopped(self, toks: torch.Tensor, rows: torch.Tensor, t: int) -> torch.Tensor:
        """Which of ``rows`` (their tokens so far in ``toks[:, :t + 1]``) now contain a stop
        string: the text of the last tokens is enough (a stop string that ends at token t)."""
        done = torch.zeros(len(rows), dtype=torch.bool, device=toks.device)
        if not self.stop:
            return done
        width = max(len(s) for s in self.stop) + 1  # a token holds >= 1 character
        tails = self.tokenizer.batch_decode(toks[rows, max(0, t + 1 - width):t + 1].tolist(),
                                            skip_special_tokens=True)
        heads = self.tokenizer.batch_decode(toks[rows, max(0, t + 1 - width):t].tolist(),
                                            skip_special_tokens=True)
        for i, (a, b) in enumerate(zip(tails, heads)):  # new in this token's text only
            done[i] = any(s in a and s not in b for s in self.stop)
        return done


def pick_token(logits: torch.Tensor, temperature: float | None, top_p: float,
          shaping: _Shaping | None = None, seen: torch.Tensor | None = None):
    """Next tokens from float32 logits ``[B, V]`` and their log-probs at ``temperature``
    (greedy when ``temperature`` is None: the log-probs at temperature 1)."""
    if temperature is None:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0]
    scaled = logits if temperature == 1.0 else logits / temperature
    if top_p >= 1.0 and (shaping is None or not shaping.active(seen)):
        # one softmax pass serves the sample and its log-prob (large vocabularies)
        probs = scaled.softmax(-1)
        tok = torch.multinomial(probs, 1)
        return tok[:, 0], probs.gather(1, tok)[:, 0].log()
    logp = torch.log_softmax(scaled, -1)
    if shaping is not None:
        scaled = shaping.penalize(scaled, seen)
    if top_p < 1.0:  # as transformers' TopPLogitsWarper: drop the tail of mass <= 1 - top_p
        sorted_logits, order = torch.sort(scaled, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        scaled = scaled.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    tok = torch.multinomial(scaled.softmax(-1), 1)[:, 0]
    return tok, logp.gather(1, tok[:, None])[:, 0]


def left_pad(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token lists as one left-padded batch for a KV-cached prefill: ``input_ids``,
    ``attention_mask`` and ``position_ids`` (counting from 0 at each row's first real token)."""
    width = max(len(s) for s in seqs)
    inp = torch.full((len(seqs), width), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        inp[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
        att[r, width - len(s):] = 1
    inp, att = inp.to(device), att.to(device)
    return inp, att, (att.cumsum(-1) - 1).clamp(min=0)


def _decode(model, prompts: list[list[int]], group_size: int, max_new_tokens: int, eos: int,
            pad: int, temperature: float | None, top_p: float, inputs: list[dict] | None = None,
            vision=None, shaping: _Shaping | None = None):
    """Completions (untrimmed) and their log-probs for ``prompts``, G per prompt, in order."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    inp, att, pos = left_pad(prompts, pad, device)
    extra = {}
    if vision is not None:  # images in the prefill; mrope positions [3, B, W]
        extra, pos = vision.prefill_inputs(model, prompts, inputs or [{}] * len(prompts), inp, att)
    padded = not bool(att.all())  # no padding: no mask at all (as model.generate does)
    cache, key = new_cache(model, width + max_new_tokens), cache_kwarg(model)
    out = model(input_ids=inp, attention_mask=att if padded else None, position_ids=pos,
                use_cache=True, logits_to_keep=1, **{key: cache}, **extra)
    logits = out.logits[:, -1].float()
    ban = None if vision is None else torch.tensor(vision.banned_token_ids, device=device)
    if ban is not None:  # image tokens are never sampled
        logits[:, ban] = -float("inf")
    if group_size > 1:  # the prompt's cache, once per sample
        cache.batch_repeat_interleave(group_size)
        logits, att = logits.repeat_interleave(group_size, 0), att.repeat_interleave(group_size, 0)
    n = logits.shape[0]
    alive = torch.arange(n, device=device)           # batch row -> sequence
    last = pos[:, -1] if pos.dim() == 2 else pos.amax(dim=(0, 2))  # mrope: max over the prompt
    next_pos = last.repeat_interleave(group_size) + 1
    toks = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
    lps = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device)
    length = torch.zeros(n, dtype=torch.long, device=device)
    seen = None  # --repetition-penalty: the tokens each sequence holds (prompt and completion)
    if shaping is not None and shaping.repetition_penalty != 1.0 and temperature is not None:
        count = torch.zeros(logits.shape, dtype=torch.int32, device=device)
        count.scatter_add_(1, inp.repeat_interleave(group_size, 0), att.int())  # att: n rows already
        seen = count > 0
    for t in range(max_new_tokens):
        tok, lp = pick_token(logits, temperature, top_p, shaping, None if seen is None else seen[alive])
        toks[alive, t], lps[alive, t] = tok, lp
        length[alive] = t + 1
        if seen is not None:
            seen[alive, tok] = True
        done = tok == eos
        if shaping is not None and shaping.stop:
            done |= shaping.stopped(toks, alive, t)
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):  # finished rows leave the batch and the cache
            keep = (~done).nonzero()[:, 0]
            cache.batch_select_indices(keep)
            alive, tok, att, next_pos = alive[keep], tok[keep], att[keep], next_pos[keep]
        att = torch.cat([att, att.new_ones((att.shape[0], 1))], 1)
        out = model(input_ids=tok[:, None], attention_mask=att if padded else None,
                    position_ids=next_pos[:, None], use_cache=True, **{key: cache})
        next_pos = next_pos + 1
        logits = out.logits[:, -1].float()
        if ban is not None:
            logits[:, ban] = -float("inf")
    length = length.tolist()
    return ([row[:m] for row, m in zip(toks.tolist(), length)],
            [row[:m] for row, m in zip(lps.tolist(), length)])


@torch.no_grad()
def generate_reference(model, tokenizer, prompt_ids: list[list[int]], *, group_size: int = 1,
             max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
             do_sample: bool = True, batch_size: int = 64, rows: list[int] | None = None) -> Rollout:
    """``model.generate`` on the prompts repeated G times (the previous rollout; a test oracle).

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
        inp, att, _ = left_pad([prompt_ids[i] for i in idx], pad, device)
        out = model.generate(input_ids=inp, attention_mask=att, generation_config=gen_cfg)
        new = out[:, inp.shape[1]:].tolist()
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
