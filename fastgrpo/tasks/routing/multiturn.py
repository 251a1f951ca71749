"""Multi-turn retrieval rollouts: R1-Router's online form (``--rollout-mode online``).

One prompt per question; the policy writes every step of the trajectory in ONE sequence::

    prompt  <think>..</think><sub-question>q1</sub-question><ret>text</ret>    policy (retrieve)
            \\n<result>\\n[1] ... [3] ...\\n</result>\\n                          tool (search of text)
            <think>..</think><answer>a1</answer>                              policy (answer)
            <think>..</think><sub-question>none</sub-question><ret>none</ret>  policy (retrieve: stop)
            <think>..</think><answer>final</answer>                           policy (final answer)

Generation of a step stops at ``</ret>``, ``</answer>`` or EOS.  After ``<ret>KB</ret>`` with a
configured KB the sub-question is searched in that KB (``fastgrpo.kb``, SQLite FTS5 / BM25,
top ``--kb-top-k``) and the results are appended as **tool tokens**: the tokenizer's ids of
:func:`fastgrpo.tasks.routing.data.tool_text`, with ``Sample.loss_mask`` False, so they never enter
the loss (packing gives them ``ignore_index`` targets).  An answer step right after a search
answers that hop; any other answer step is the final answer and ends the rollout, as do EOS,
a step that hits ``--max-new-tokens`` without a closing tag (``truncated``) and the step limit
``--max-turns``.

Token-in, token-out: the model's next context is always ``prompt_ids + completion_ids`` of the
sample, and ``completion_ids`` is exactly the sampled ids and the tool ids concatenated -- the
conversation is never decoded and re-tokenized.

Rewards (:func:`score_turns`): the j-th retrieval step is scored against the teacher's j-th hop
(``none``/``none`` past the last hop) with :func:`fastgrpo.rewards.retrieval_step_score`; an
answer step after the j-th search against that hop's answer, the final answer against the gold
answer, with :func:`fastgrpo.rewards.answer_step_score`; a step without its closing tag gets 0.
Token advantages (:func:`turn_advantages`): ``fastgrpo.ops.process_advantages`` -- the step
rewards normalised over all steps of the group, a token's advantage the sum over its step and
the later ones; tool tokens belong to no step (advantage 0, and masked anyway).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from fastgrpo.kb import KnowledgeBase
from fastgrpo.ops.advantages import process_advantages
from fastgrpo.rewards import RewardResult
from fastgrpo.rewards.retrieval import (answer_step_score, lexical_similarity, parse_retrieval_step,
                                        retrieval_step_score)
from fastgrpo.tasks.routing.data import tool_text
from fastgrpo.trainer.rollout import Rollout, cache_kwarg, left_pad, new_cache, pick_token
from fastgrpo.trainer.sample import Sample

__all__ = ["STOPS", "TurnSample", "KBTool", "hf_step_fn", "engine_step_fn", "rollout_turns", "score_turns",
           "turn_advantages", "turn_metrics"]

STOPS = ("</ret>", "</answer>")

# a policy step: contexts (token ids) -> one (generated ids, their log-probs) per context
StepFn = Callable[[list[list[int]]], list[tuple[list[int], list[float]]]]


@dataclass
class TurnSample(Sample):
    """A multi-turn sample: ``steps`` are the policy's steps, each a dict with ``kind``
    (``retrieve`` | ``answer`` | ``invalid``), ``start``/``end`` (completion token indices),
    ``text``, and after scoring ``reward``; ``kb``/``query`` for retrievals, ``final`` for answers."""
    steps: list[dict] = field(default_factory=list)
    step_limit: bool = False                # stopped by --max-turns before a final answer


class KBTool:
    """The retrieval tool: ``{name: KnowledgeBase}`` searched with a top-k."""

    def __init__(self, kbs: dict[str, KnowledgeBase | str | Path], top_k: int = 3):
        self.kbs = {str(n).lower(): kb if isinstance(kb, KnowledgeBase) else KnowledgeBase(kb)
                    for n, kb in kbs.items()}
        self.top_k = top_k
        self.calls: list[tuple[str, str]] = []

    @property
    def names(self) -> list[str]:
        return list(self.kbs)

    def __call__(self, kb: str, query: str) -> str:
        """The tool output text for a call (``kb`` unknown: a message saying so)."""
        self.calls.append((kb, query))
        if kb not in self.kbs:
            return tool_text(None, kb)
        return tool_text(self.kbs[kb].search(query, k=self.top_k), kb)

    def close(self) -> None:
        for kb in self.kbs.values():
            kb.close()


@torch.no_grad()
def _decode_until(model, tokenizer, contexts: list[list[int]], max_new_tokens: int,
                  temperature: float | None, top_p: float, stops: Sequence[str]):
    """Sample from each context until EOS, a stop string or ``max_new_tokens``; returns the
    generated ids and their log-probs (one list per context)."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    width = max(len(c) for c in contexts)
    inp, att, pos = left_pad(contexts, pad, device)
    padded = not bool(att.all())
    cache, key = new_cache(model, width + max_new_tokens), cache_kwarg(model)
    out = model(input_ids=inp, attention_mask=att if padded else None, position_ids=pos,
                use_cache=True, logits_to_keep=1, **{key: cache})
    logits = out.logits[:, -1].float()
    n = len(contexts)
    alive = list(range(n))
    next_pos = pos[:, -1] + 1
    gen: list[list[int]] = [[] for _ in range(n)]
    lps: list[list[float]] = [[] for _ in range(n)]
    tail = 12
    for t in range(max_new_tokens):
        tok, lp = pick_token(logits, temperature, top_p)
        for i, x, v in zip(alive, tok.tolist(), lp.tolist()):
            gen[i].append(x)
            lps[i].append(v)
        texts = tokenizer.batch_decode([gen[i][-tail:] for i in alive], skip_special_tokens=True)
        done = [gen[i][-1] == eos or any(tx.endswith(s) for s in stops) for i, tx in zip(alive, texts)]
        if t == max_new_tokens - 1 or all(done):
            break
        if any(done):
            keep_rows = [r for r, d in enumerate(done) if not d]
            keep = torch.tensor(keep_rows, dtype=torch.long, device=device)
            cache.batch_select_indices(keep)
            alive = [alive[r] for r in keep_rows]
            tok, att, next_pos = tok[keep], att[keep], next_pos[keep]
        att = torch.cat([att, att.new_ones((att.shape[0], 1))], 1)
        out = model(input_ids=tok[:, None], attention_mask=att if padded else None,
                    position_ids=next_pos[:, None], use_cache=True, **{key: cache})
        next_pos = next_pos + 1
        logits = out.logits[:, -1].float()
    return gen, lps


def hf_step_fn(model, tokenizer, *, max_new_tokens: int, temperature: float = 1.0,
               top_p: float = 1.0, do_sample: bool = True, batch_size: int = 64,
               stops: Sequence[str] = STOPS) -> StepFn:
    """The policy's step: KV-cached sampling (greedy without ``do_sample``) until a stop."""

    def step(contexts: list[list[int]]):
        was_training = model.training
        model.eval()
        out = []
        try:
            for s in range(0, len(contexts), batch_size):
                g, lp = _decode_until(model, tokenizer, contexts[s:s + batch_size], max_new_tokens,
                                      temperature if do_sample else None, top_p, stops)
                out += list(zip(g, lp))
        finally:
            if was_training:
                model.train()
        return out

    return step


def engine_step_fn(engine, *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                   do_sample: bool = True, stops: Sequence[str] = STOPS) -> StepFn:
    """The policy's step on a rollout engine (``--rollout vllm``): one ``engine.generate`` per
    turn on the contexts as token ids, ending at EOS or a stop string (kept)."""

    def step(contexts: list[list[int]]):
        ro = engine.generate(contexts, group_size=1, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, do_sample=do_sample,
                             stop=list(stops))
        return [(s.completion_ids, s.sampling_logp) for s in ro.samples]

    return step


def _kind(text: str) -> str:
    t = text.rstrip()
    if t.endswith("</ret>"):
        return "retrieve"
    if t.endswith("</answer>"):
        return "answer"
    return "invalid"


def rollout_turns(step_fn: StepFn, tokenizer, prompts: list[list[int]], tool: KBTool, *,
                  group_size: int = 1, max_turns: int = 8, rows: list[int] | None = None,
                  max_total_tokens: int | None = None, max_new_tokens: int = 0) -> Rollout:
    """``group_size`` multi-turn rollouts per prompt (grouped by prompt, as ``generate``).

    ``max_total_tokens``: a rollout whose next step could pass this many positions stops
    (``truncated``); ``max_new_tokens`` is the step's budget used for that check."""
    eos = tokenizer.eos_token_id
    t0 = time.perf_counter()
    samples = [TurnSample(prompt_ids=list(p), completion_ids=[], group=i,
                          row=i if rows is None else rows[i], loss_mask=[], sampling_logp=[])
               for i, p in enumerate(prompts) for _ in range(group_size)]
    after_search = [False] * len(samples)
    active = list(range(len(samples)))
    generated = 0
    for _turn in range(max_turns):
        if max_total_tokens:
            for k in [k for k in active if samples[k].num_tokens + max_new_tokens > max_total_tokens]:
                samples[k].truncated = True
            active = [k for k in active if not samples[k].truncated]
        if not active:
            break
        outs = step_fn([samples[k].prompt_ids + samples[k].completion_ids for k in active])
        still = []
        for k, (ids, lp) in zip(active, outs):
            s = samples[k]
            start = len(s.completion_ids)
            s.completion_ids += list(ids)
            s.loss_mask += [True] * len(ids)
            s.sampling_logp += list(lp)
            generated += len(ids)
            text = tokenizer.decode(list(ids), skip_special_tokens=True)
            kind = _kind(text)
            step = {"kind": kind, "start": start, "end": len(s.completion_ids), "text": text}
            s.steps.append(step)
            if kind == "invalid":  # EOS or the step's token limit before a closing tag
                s.truncated = eos not in ids
                continue
            if kind == "answer":
                step["final"] = not after_search[k]
                after_search[k] = False
                if not step["final"] and eos not in ids:
                    still.append(k)
                continue
            parsed = parse_retrieval_step(text.lower())
            step["kb"] = parsed[2] if parsed else None
            step["query"] = parsed[1] if parsed else None
            after_search[k] = False
            if parsed is not None and parsed[2] != "none":  # run the search: tool tokens
                tool_ids = tokenizer(tool(parsed[2], parsed[1]), add_special_tokens=False)["input_ids"]
                s.completion_ids += tool_ids
                s.loss_mask += [False] * len(tool_ids)
                s.sampling_logp += [0.0] * len(tool_ids)
                after_search[k] = True
            if eos not in ids:
                still.append(k)
        active = still
    for k in active:
        samples[k].step_limit = True
    for s, t in zip(samples, tokenizer.batch_decode([s.completion_ids for s in samples],
                                                    skip_special_tokens=True)):
        s.text = t
    return Rollout(samples, seconds=time.perf_counter() - t0, generated_tokens=generated)


def _references(row: dict) -> list[tuple[str, str, str]]:
    """The teacher's hops as ``(query, kb, answer)``, from ``hops`` (online rows)."""
    return [(h["query"], h["kb"], h["answer"]) for h in row.get("hops") or []]


def score_turns(samples: list[TurnSample], rows: list[dict], similarity=None) -> RewardResult:
    """Each step's reward (into ``step["reward"]``) and per sample: ``total`` the mean step
    reward (for the logs; the advantages use the step rewards), and the per-function values
    ``retrieval_step``, ``answer_step`` (means over those steps), ``routing_accuracy`` (the
    teacher's retrieval steps, its stop included, whose KB the rollout's step at the same index
    named) and ``answer_recall`` (the final answer's reward, 0 without one)."""
    sim = similarity or lexical_similarity
    per = {k: [] for k in ("retrieval_step", "answer_step", "routing_accuracy", "answer_recall",
                           "steps")}
    total = []
    for s in samples:
        row = rows[s.row]
        hops = _references(row)
        kbs = row.get("kbs") or []
        j = -1  # index of the last retrieval step
        ret, ans, final = [], [], 0.0
        routed = 0
        for step in s.steps:
            if step["kind"] == "retrieve":
                j += 1
                q, kb = (hops[j][0], hops[j][1]) if j < len(hops) else ("none", "none")
                step["reward"] = retrieval_step_score(step["text"], q, kb, kbs, sim)
                routed += int(j <= len(hops) and step.get("kb") == kb)
                ret.append(step["reward"])
            elif step["kind"] == "answer":
                gold = row["answer"] if step["final"] or not 0 <= j < len(hops) else hops[j][2]
                step["reward"] = answer_step_score(step["text"], gold)
                ans.append(step["reward"])
                if step["final"]:
                    final = step["reward"]
            else:
                step["reward"] = 0.0
        rewards = [st["reward"] for st in s.steps]
        total.append(sum(rewards) / len(rewards) if rewards else 0.0)
        s.reward = total[-1]
        per["retrieval_step"].append(sum(ret) / len(ret) if ret else None)
        per["answer_step"].append(sum(ans) / len(ans) if ans else None)
        per["routing_accuracy"].append(routed / (len(hops) + 1))
        per["answer_recall"].append(final)
        per["steps"].append(float(len(s.steps)))
    return RewardResult(total, per, {k: 0.0 for k in per})


def turn_advantages(samples: list[TurnSample], group_size: int, *, drop_zero_std_groups: bool = True,
                    mask_truncated: bool = True, eps: float = 1e-4) -> list[TurnSample]:
    """Per-token advantages (``process_advantages`` on the scored steps) into each sample's
    ``advantage`` (one value per completion token, 0 on tool tokens); returns the samples that
    enter the loss: not in a group whose step rewards are all equal (no signal), not
    truncated (``mask_truncated``), not empty."""
    if not samples:
        return []
    n_steps = max(1, max(len(s.steps) for s in samples))
    n_tok = max(1, max(len(s.completion_ids) for s in samples))
    r = torch.full((len(samples), n_steps), math.nan, dtype=torch.float64)
    idx = torch.full((len(samples), n_tok), -1, dtype=torch.long)
    for b, s in enumerate(samples):
        for k, st in enumerate(s.steps):
            r[b, k] = st["reward"]
            idx[b, st["start"]:st["end"]] = k
    mask = torch.isfinite(r)
    if not bool(mask.any()):
        return []
    adv = process_advantages(torch.nan_to_num(r, nan=0.0), idx, group_size=group_size,
                             step_mask=mask, eps=eps)
    keep = []
    for b, s in enumerate(samples):
        s.advantage = adv[b, :len(s.completion_ids)].tolist()
        keep.append(len(s.completion_ids) > 0 and not (mask_truncated and s.truncated))
    if drop_zero_std_groups:
        for g0 in range(0, len(samples), group_size):
            vals = r[g0:g0 + group_size][mask[g0:g0 + group_size]]
            if vals.numel() == 0 or bool((vals == vals[0]).all()):
                for b in range(g0, min(g0 + group_size, len(samples))):
                    keep[b] = False
    return [s for s, k in zip(samples, keep) if k]


def turn_metrics(res: RewardResult) -> dict:
    """Held-out means: routing accuracy and final-answer recall of the rollouts."""
    st = res.stats()
    return {"routing_accuracy": st["routing_accuracy"]["mean"], "answer_recall": st["answer_recall"]["mean"],
            "steps": st["steps"]["mean"]}
