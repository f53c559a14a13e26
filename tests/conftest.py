"""Session-scoped, offline fixtures: a tiny tokenizer and causal LM built in-process, small
datasets, and helpers that launch OpenRLHF CLIs the way users do (torchrun -m)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from openrlhf_dual import launch
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


cpu_env = launch.cpu_env


def torchrun(module: str, args: list[str], *, nproc: int = 2, cwd: Path, timeout: int = 600) -> str:
    """Run a module under torchrun on CPU; return its output, failing the test with the tail of it."""
    proc = launch.torchrun(module, args, nproc=nproc, cwd=cwd, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"torchrun -m {module} exited {proc.returncode}:\n{out[-6000:]}")
    return out


def tensorboard_scalars(logdir: Path, tag: str) -> list[float]:
    return [value for _, _, value in launch.read_scalars(logdir, tag)]


@pytest.fixture(scope="session")
def tiny_policies(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Two more random-init LMs on tiny_model_dir's tokenizer (seeds 1 and 2): stand-ins for PeCAN's
    pre-aligned pi_r and pi_g, different from the reference so every log-ratio is non-zero."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = []
    for seed in (1, 2):
        path = tmp_path_factory.mktemp(f"tiny_policy_{seed}")
        build_tiny_lm(path, tok, seed=seed)
        out.append(path)
    return out[0], out[1]
