"""The prompt order of training: shuffled passes over the examples, reproducible from (seed, epoch)."""

from __future__ import annotations

import torch

__all__ = ["PromptSampler"]


class PromptSampler:
    """Shuffled passes over a list of indices; the permutation depends only on (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self, k: int) -> list[int]:
        """The next ``k`` indices; distinct when ``k <= n`` (a new epoch started inside a call puts the
        indices already taken by that call last)."""
        out: list[int] = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
                if out:
                    taken = set(out)
                    self._perm = [i for i in self._perm if i not in taken] + [
                        i for i in self._perm if i in taken
                    ]
            take = min(k - len(out), self.n - self.pos)
            out.extend(self._perm[self.pos : self.pos + take])
            self.pos += take
        return out

    def state_dict(self) -> dict:
        """Epoch, position and permutation (a resumed run continues the same stream)."""
        return {"epoch": self.epoch, "pos": self.pos, "perm": list(self._perm)}

    def load_state_dict(self, s: dict) -> None:
        """Restore :meth:`state_dict` (a state without ``perm`` recomputes it from seed and epoch)."""
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._perm = list(s["perm"]) if "perm" in s else self._permutation()
