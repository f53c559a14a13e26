"""Session-scoped, offline fixtures: a tiny tokenizer and causal LM built in-process, small
datasets, and a helper that launches OpenRLHF CLIs the way users do (torchrun -m)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from openrlhf_dual.tiny import build_tiny_lm, build_tokenizer

WORDS = [f"w{i}" for i in range(40)] + ["good", "fine", "kind", "bad", "harm", "rude"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init 2-layer Llama (hidden 32) with its word-level tokenizer, in one HF dir."""
    out = tmp_path_factory.mktemp("tiny_lm")
    tok = build_tokenizer(out, WORDS)
    build_tiny_lm(out, tok, seed=0)
    return out


@pytest.fixture(scope="session")
def dpo_dataset_dir(tmp_path_factory) -> Path:
    """64 preference pairs in OpenRLHF's JSONL convention: chosen is always polite, rejected rude."""
    out = tmp_path_factory.mktemp("dpo_data")
    rng = random.Random(0)
    with open(out / "train.jsonl", "w") as f:
        for _ in range(64):
            prompt = " ".join(rng.choice(WORDS[:40]) for _ in range(4))
            row = {"prompt": prompt, "chosen": "good fine kind", "rejected": "bad harm rude"}
            f.write(json.dumps(row) + "\n")
    return out


def cpu_env(**extra: str) -> dict[str, str]:
    """Environment for launching OpenRLHF on CPU: DeepSpeed's CPU accelerator, one thread per
    rank (2 ranks on 2 cores), no wandb, no hub."""
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def torchrun(module: str, args: list[str], *, nproc: int = 2, cwd: Path, timeout: int = 600) -> str:
    """Run `torchrun --nproc_per_node N -m module args...`; return its combined output, failing
    the test with the output tail if it exits non-zero."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", module, *args]
    proc = subprocess.run(cmd, cwd=cwd, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-6000:]}")
    return out


def tensorboard_scalars(logdir: Path, tag: str) -> list[float]:
    """All values of one scalar tag written under `logdir` (OpenRLHF's tensorboard logger)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for run in sorted({p.parent for p in Path(logdir).rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(run))
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            values += [e.value for e in acc.Scalars(tag)]
    return values
