"""The charts task's own held-out measures (used by its warm-up): greedy final-answer and
bar-reading accuracy, and a teacher-forced bar-reading probe."""

from __future__ import annotations

import torch

from fastgrpo.tasks.arithmetic.data import answer_correct
from fastgrpo.tasks.charts.data import description_accuracy
from fastgrpo.tasks.tokenizer import encode_prompt
from fastgrpo.trainer.rollout import generate

__all__ = ["evaluate_charts", "teacher_forced_reading", "encode_rows"]


def encode_rows(adapter, rows, encode_fn):
    out = []
    for r in rows:
        ids, inputs = adapter.encode(r["prompt"], [r["image"]], encode_fn or encode_prompt)
        out.append((ids, inputs))
    return out


def evaluate_charts(model, tok, adapter, rows, max_new_tokens: int = 72) -> dict:
    """Greedy held-out accuracy (final answer) and bar-reading accuracy (Image Description)."""
    enc = encode_rows(adapter, rows, None)
    ro = generate(model, tok, [e[0] for e in enc], group_size=1, do_sample=False,
                  max_new_tokens=max_new_tokens, prompt_inputs=[e[1] for e in enc], vision=adapter)
    acc = sum(answer_correct(t, r["answer"]) for t, r in zip(ro.texts, rows)) / max(1, len(rows))
    read = sum(description_accuracy(t, r["heights"]) for t, r in zip(ro.texts, rows)) / max(1, len(rows))
    return {"accuracy": acc, "bar_reading": read, "example": ro.texts[0] if ro.texts else ""}


def teacher_forced_reading(model, tok, adapter, rows, enc=None) -> float:
    """Bar-reading accuracy with the reference solution teacher-forced: the fraction of the
    three description digits that are the model's argmax next token (cheap, no generation;
    a progress probe of the warm-up, not the held-out metric)."""
    enc = enc or encode_rows(adapter, rows, None)
    hits = total = 0
    was = model.training
    model.eval()
    with torch.no_grad():
        for (ids, inputs), r in zip(enc, rows):
            comp = tok(r["solution"], add_special_tokens=False)["input_ids"]
            full = torch.tensor([list(ids) + comp])
            pos = adapter.positions(model, full[0], inputs)
            kw = adapter.forward_inputs(full, inputs)
            if pos is not None:
                kw["position_ids"] = pos.unsqueeze(1)
            logits = model(input_ids=full, **kw).logits[0]
            toks = tok.convert_ids_to_tokens(comp)
            where = [i for i in range(2, len(toks)) if toks[i - 1] == " is" and toks[i - 2] in (" A", " B", " C")][:3]
            for i in where:
                hits += int(logits[len(ids) + i - 1].argmax()) == comp[i]
                total += 1
    model.train(was)
    return hits / max(1, total)


