"""Launch OpenRLHF-style training modules the way users do (`torchrun -m`), and read back what
OpenRLHF's tensorboard logger wrote. Used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cpu_env(**extra: str) -> dict[str, str]:
    """Environment for OpenRLHF on CPU: DeepSpeed's CPU accelerator (unless one is set), one
    thread per rank, no wandb, no hub."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's JIT-built ops (fused_adam, shm_comm) per environment: two venvs sharing one build
    # folder rebuild over each other's files and wait on each other's lock files
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_launcher(nproc: int) -> list[str]:
    """`torchrun --nproc_per_node N` with its rendezvous on 127.0.0.1 at a free port: concurrent runs
    on one machine do not clash on 29500, and no host name has to resolve (`--standalone` hands the
    ranks this machine's FQDN, which hangs where the host name does not resolve)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]  # fmt: skip


def torchrun(module: str, args: list[str], *, nproc: int = 2, cwd: str | Path | None = None,
             timeout: float | None = None) -> subprocess.CompletedProcess:
    """`torchrun_launcher(nproc) -m module args...` with `cpu_env()`; output captured as text.
    However it ends (timeout, or the caller interrupted), torchrun gets SIGTERM first, which it passes
    on to its ranks (they run in sessions of their own, so killing torchrun alone orphans them)."""
    cmd = [*torchrun_launcher(nproc), "-m", module, *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # drain the pipes while it stops, so its last output cannot block it
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@contextmanager
def ray_cluster(num_gpus: int, num_cpus: int = 8) -> Iterator[str]:
    """A private Ray instance in this process with `num_gpus` GPUs: logical ones on a machine without
    CUDA (OpenRLHF's {"GPU": 1} placement bundles then schedule, and vLLM's CPU build ignores the
    CUDA_VISIBLE_DEVICES Ray sets), the first `num_gpus` real ones on a CUDA machine. While it runs,
    RAY_ADDRESS holds its address, so subprocesses (prepare, evaluate, train_ppo_ray) join it.
    Yields that address; shuts the instance down on exit."""
    import ray
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < num_gpus:
        raise RuntimeError(f"asked for {num_gpus} GPUs, this machine has {torch.cuda.device_count()}")
    ray.init(address="local", num_gpus=num_gpus, num_cpus=num_cpus, include_dashboard=False)
    before = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = address = ray.get_runtime_context().gcs_address
    try:
        yield address
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = before


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
