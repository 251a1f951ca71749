"""The order in which training prompts are drawn: shuffled epochs, resumable."""

from __future__ import annotations

import random

__all__ = ["PromptOrder"]


class PromptOrder:
    """Draws prompt indices epoch by epoch, each epoch a fresh shuffle of ``range(n)``.

    ``state_dict()`` / ``load_state_dict()`` hold the generator state and the indices left in
    the current epoch, so a resumed run draws exactly the prompts the killed run would have."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.rng = random.Random(seed)
        self.pending: list[int] = []

    def take(self, k: int) -> list[int]:
        while len(self.pending) < k:  # k > n: several epochs
            more = list(range(self.n))
            self.rng.shuffle(more)
            self.pending += more
        taken, self.pending = self.pending[:k], self.pending[k:]
        return taken

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "order": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.pending = list(state["order"])
