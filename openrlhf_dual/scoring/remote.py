"""A reward server speaking OpenRLHF's `serve_rm` API: POST {"query": [str]} -> {"rewards": [float]}.

serve_rm scores the query text with add_special_tokens=False, left padding and truncation to its
--data.max_len, normalised when it was started with --reward.normalize_enable. Canonical text:
queries = prompt + response, as OpenRLHF's PPO sends them.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import numpy as np

from openrlhf_dual.scoring.batch import ScoreBatch


class RemoteScorer:
    def __init__(self, url: str, batch_size: int = 64, timeout: float = 60.0, retries: int = 3):
        self.url, self.batch_size, self.timeout, self.retries = url, batch_size, timeout, retries

    def _post(self, queries: list[str]) -> list[float]:
        body = json.dumps({"query": queries}).encode()
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    rewards = json.loads(response.read())["rewards"]
                break
            except urllib.error.HTTPError as err:
                raise RuntimeError(f"{self.url} answered {err.code}: {err.read()[:500]!r}") from err
            except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
                if attempt == self.retries:
                    raise RuntimeError(f"{self.url} unreachable after {self.retries + 1} tries: {err}") from err
                time.sleep(0.5 * 2**attempt)
        if len(rewards) != len(queries):
            raise RuntimeError(f"{self.url} returned {len(rewards)} rewards for {len(queries)} queries")
        return [float(r) for r in rewards]

    def score(self, batch: ScoreBatch) -> np.ndarray:
        queries = batch.queries
        out = []
        for i in range(0, len(queries), self.batch_size):
            out += self._post(queries[i : i + self.batch_size])
        return np.asarray(out, dtype=np.float64)
