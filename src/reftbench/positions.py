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

        The paper's rule (pyreft's get_intervention_locations): each side is capped at floor(n/2),
        so the two sides never overlap. The positions that are cut (and, for odd n, the middle
        token) are simply not intervened on; pyreft points them at a padding slot, which changes
        nothing either.
        """
        f = min(n // 2, self.first)
        l = min(n // 2, self.last)
        return list(range(f)), list(range(n - l, n))

    def index(self, prompt_lengths: list[int], offsets: list[int], share_weights: bool):
        """Per group: (index [B, K] into the padded sequence, valid [B, K] bool).

        `offsets` is where each prompt starts in its padded row (0 for right padding, the pad
        count for left padding). Invalid slots point at the prompt's first token and are masked.
        """
        out = {}
        for group in self.groups(share_weights):
            width = {"tied": self.first + self.last, "first": self.first, "last": self.last}[group]
            idx = torch.zeros(len(prompt_lengths), width, dtype=torch.long)
            valid = torch.zeros(len(prompt_lengths), width, dtype=torch.bool)
            for b, (n, off) in enumerate(zip(prompt_lengths, offsets)):
                first, last = self.for_prompt(n)
                pos = {"tied": first + last, "first": first, "last": last}[group]
                idx[b, : len(pos)] = torch.tensor(pos, dtype=torch.long) + off
                idx[b, len(pos):] = off
                valid[b, : len(pos)] = True
            out[group] = (idx, valid)
        return out
