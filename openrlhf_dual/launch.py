"""Launch OpenRLHF-style training modules the way users do (`torchrun -m`), and read back what
OpenRLHF's tensorboard logger wrote. Used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def cpu_env(**extra: str) -> dict[str, str]:
    """Environment for OpenRLHF on CPU: DeepSpeed's CPU accelerator (unless one is set), one
    thread per rank, no wandb, no hub."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def torchrun(module: str, args: list[str], *, nproc: int = 2, cwd: str | Path | None = None,
             timeout: float | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m module args...` with `cpu_env()`; output captured
    as text. Standalone rendezvous takes a free port, so concurrent runs on one machine do not clash."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", module, *args]
    return subprocess.run(cmd, cwd=cwd, env=cpu_env(), capture_output=True, text=True, timeout=timeout)


def read_scalars(logdir: str | Path, tag: str) -> list[tuple[int, float, float]]:
    """(step, wall time in s, value) of one scalar tag under `logdir`, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = []
    for run in sorted({p.parent for p in Path(logdir).rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(run))
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            rows += [(e.step, e.wall_time, e.value) for e in acc.Scalars(tag)]
    return sorted(rows)
