"""The arithmetic task's word-level tokenizer: its vocabulary covers the task's stories and
solutions (``fastgrpo.tasks.tokenizer`` describes the pre-tokenization and the chat template)."""

from __future__ import annotations

import string

from fastgrpo.tasks.arithmetic.data import ITEMS, NAMES, make_splits
from fastgrpo.tasks.tokenizer import word_level_tokenizer

__all__ = ["build_tokenizer"]


def _corpus() -> list[str]:
    train, evals = make_splits(seed=12345, n_train=3000, n_eval=10)
    texts = [r["prompt"] + "\n" + r["solution"] for r in train + evals]
    texts += [" ".join(g) for r in train[:200] for g in r["key_steps"]]
    words = [n for n, _ in NAMES] + [p for _, p in NAMES] + ITEMS
    words += ["He", "She", "The", "Then", "Step", "answer", "final", "is", "Rationales"]
    texts += [" " + " ".join(words), " ".join(words)]
    texts += [" ".join(string.digits), string.digits]
    texts += [" ".join(string.punctuation), string.punctuation, "\n\n  "]
    return texts


def build_tokenizer(extra_texts: list[str] | None = None):
    """A ``PreTrainedTokenizerFast`` whose vocabulary covers the built-in task (+ ``extra_texts``)."""
    return word_level_tokenizer(_corpus() + list(extra_texts or []))
