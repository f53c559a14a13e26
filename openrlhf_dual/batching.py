"""Micro-batching for callers that arrive one query at a time from many threads.

OpenRLHF's PPO asks for one reward per generated sample (its agent executor calls a reward file
through `asyncio.to_thread`, and posts one query per HTTP request), many in flight at once. A
`MicroBatcher` gathers whatever is waiting into one batch for the scoring models and hands each
caller back exactly its own rows.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Sequence

import numpy as np


class MicroBatcher:
    """Calls `fn(*columns) -> [n] or [n, c] array` on batches of up to `max_batch` rows, gathered
    from concurrent `__call__`s for at most `max_wait_s` after the first one arrives. Each call gets
    its own rows back, or its own exception: when a batch fails, each of its requests is retried
    alone, so one bad request never fails the others it was batched with."""

    def __init__(self, fn: Callable[..., np.ndarray], max_batch: int = 64, max_wait_s: float = 0.005):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.fn, self.max_batch, self.max_wait_s = fn, max_batch, max_wait_s
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name="openrlhf-dual-batcher", daemon=True).start()

    def __call__(self, *columns: Sequence) -> np.ndarray:
        """Rows of `fn` for these columns (each a list of the same length n)."""
        n = len(columns[0])
        if any(len(c) != n for c in columns):
            raise ValueError(f"columns of different lengths: {[len(c) for c in columns]}")
        future: Future = Future()
        self._queue.put((columns, future))
        return future.result()

    def _take(self) -> list:
        """The next batch of requests: the first waiting one, then whatever arrives within the window."""
        items = [self._queue.get()]
        rows = len(items[0][0][0])
        deadline = time.monotonic() + self.max_wait_s
        while rows < self.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            items.append(item)
            rows += len(item[0][0])
        return items

    def _rows(self, items: list) -> list[np.ndarray]:
        """fn on the joined columns of these requests, split back per request."""
        columns = [sum((list(cols[j]) for cols, _ in items), []) for j in range(len(items[0][0]))]
        out = np.asarray(self.fn(*columns))
        if out.shape[0] != len(columns[0]):
            raise RuntimeError(f"batch function returned {out.shape[0]} rows for {len(columns[0])}")
        cuts = np.cumsum([0] + [len(cols[0]) for cols, _ in items])
        return [out[lo:hi] for lo, hi in zip(cuts[:-1], cuts[1:])]

    def _alone(self, item) -> None:
        future = item[1]
        try:
            future.set_result(self._rows([item])[0])
        except BaseException as err:  # anything, even SystemExit from user code: this thread must live
            future.set_exception(err)

    def _run(self) -> None:
        while True:
            items = self._take()
            try:
                results = self._rows(items) if len(items) > 1 else None
            except BaseException:  # some request's content failed the batch: each is scored alone
                results = None
            if results is None:
                for item in items:
                    self._alone(item)
                continue
            for (_, future), rows in zip(items, results):
                future.set_result(rows)
