"""A Python file with OpenRLHF's `reward_func(queries, prompts, labels, **kwargs)`.

The file is the user's own code and is executed on load, as `--reward.remote_url file.py` does in
OpenRLHF. Canonical text: queries = prompt + response; labels are empty strings (no label key).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from openrlhf_dual.scoring.batch import ScoreBatch


def _floats(values) -> list[float]:
    """Rewards as OpenRLHF accepts them: a list of floats or 1-element tensors, or a tensor."""
    if hasattr(values, "tolist"):
        values = values.tolist()
    return [float(v.item() if hasattr(v, "item") else v) for v in values]


class RewardFileScorer:
    def __init__(self, path: str, batch_size: int = 64):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reward file {path} not found")
        spec = importlib.util.spec_from_file_location(f"openrlhf_dual_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, "reward_func", None)):
            raise ValueError(f"{path} defines no reward_func(queries, prompts, labels)")
        self.func, self.batch_size = module.reward_func, batch_size

    def score(self, batch: ScoreBatch) -> np.ndarray:
        queries, out = batch.queries, []
        for i in range(0, len(batch), self.batch_size):
            j = i + self.batch_size
            result = self.func(queries[i:j], batch.prompts[i:j], [""] * len(queries[i:j]))
            out += _floats(result["rewards"] if isinstance(result, dict) else result)
        return np.asarray(out, dtype=np.float64)
