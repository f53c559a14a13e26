"""Atomic artifact writes: every file appears whole or not at all (write to a temporary file in
the same directory, fsync, then rename), so an interrupted run never leaves a torn shard."""

from __future__ import annotations

import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterable, Iterator

import numpy as np


@contextmanager
def open_atomic(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file ("w" text, utf-8, or "wb") that appears at `path` whole when the block ends, or not
    at all: written to a temporary file beside it, fsynced, then renamed. Streams: nothing is held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with open_atomic(path, "wb") as f:
        f.write(data)


def write_figure(path: str | Path, fig) -> None:
    """A matplotlib figure, in the format its suffix names (.png, .pdf, ...)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png")
    write_bytes_atomic(path, buf.getvalue())


def write_json(path: str | Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """One JSON object a line, written as `rows` yields them (an iterator is never held whole)."""
    with open_atomic(path) as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_npy(path: str | Path, array: np.ndarray) -> None:
    """.npy is byte-deterministic for equal arrays (unlike .npz, whose zip entries carry times)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    write_bytes_atomic(path, buf.getvalue())


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """The rows of a JSONL file, one line in memory at a time."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def read_jsonl(path: str | Path) -> list[dict]:
    return list(iter_jsonl(path))
