"""Which prompt tokens an intervention reads and writes: the paper's `fN+lM` positions."""
import re
from dataclasses import dataclass

import torch

from .errors import ConfigError

_POSITION_RE = re.compile(r"^(?:f(\d+)\+l(\d+)|f(\d+)|l(\d+))$")


@dataclass(frozen=True)
class Positions:
    first: int
    last: int

    @classmethod
    def parse(cls, text: str) -> "Positions":
        text = str(text).strip()
        m = _POSITION_RE.match(text)
        if not m:
            raise ConfigError(
                f"intervention.positions={text!r} is malformed: use fN, lM or fN+lM (e.g. f7+l7, f3, l5)"
            )
        f1, l1, f2, l2 = m.groups()
        first, last = int(f1 or f2 or 0), int(l1 or l2 or 0)
        if first + last == 0:
            raise ConfigError(f"intervention.positions={text!r} selects no token: N+M must be at least 1")
        return cls(first, last)

    def groups(self, share_weights: bool) -> list[str]:
        """Names of the position groups that get their own intervention at each layer."""
        if share_weights or self.first == 0 or self.last == 0:
            return ["tied"]
        return ["first", "last"]

    def for_prompt(self, n: int) -> tuple[list[int], list[int]]:
        """First and last prompt positions for a prompt of n tokens.

        pyreft's rule (get_intervention_locations, checked against it for n = 1..40): each side
        is capped at floor(n/2), so the two sides never overlap. The positions that are cut (and,
        for odd n, the middle token) are not intervened on; pyreft points them at a masked pad
        token (its "sink"), which changes no real token either.
        """
        f = min(n // 2, self.first)
        l = min(n // 2, self.last)
        return list(range(f)), list(range(n - l, n))

    def group_positions(self, n: int, group: str) -> list[int]:
        first, last = self.for_prompt(n)
        return {"tied": first + last, "first": first, "last": last}[group]

    def index(self, prompt_lengths: list[int], offsets: list[int], share_weights: bool):
        """Per group: (rows, cols), two flat LongTensors naming every intervened token of the
        padded batch once. `offsets` is where each prompt starts in its padded row (0 for right
        padding, the pad count for left padding)."""
        out = {}
        for group in self.groups(share_weights):
            rows, cols = [], []
            for b, (n, off) in enumerate(zip(prompt_lengths, offsets)):
                pos = self.group_positions(int(n), group)
                rows += [b] * len(pos)
                cols += [p + int(off) for p in pos]
            out[group] = (torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long))
        return out
