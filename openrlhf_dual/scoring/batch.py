"""What every score source takes and returns: a batch of (prompt, response) texts -> float64 [n]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class ScoreBatch:
    """n (prompt, response) pairs. raw_prompts: the user's text (for scorers with their own
    conversation template); prompts: the exact text the policy was given; responses: generated text."""

    raw_prompts: list[str]
    prompts: list[str]
    responses: list[str]

    @property
    def queries(self) -> list[str]:
        """prompt + response, as OpenRLHF's PPO sends them to reward models and reward functions."""
        return [p + r for p, r in zip(self.prompts, self.responses)]

    def __len__(self) -> int:
        return len(self.responses)


class Scorer(Protocol):
    def score(self, batch: ScoreBatch) -> np.ndarray:
        """float64 [n]."""
