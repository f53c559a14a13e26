"""MoCAN on the toy world: reward and safety models given (here: the world's own, as reward files)."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from openrlhf_dual.demo.exact import ToyJudge
from openrlhf_dual.demo.steps import build_reference, finish, prepare, primal_step


def run(a: argparse.Namespace, out: Path) -> dict:
    t0 = time.time()
    print(f"[1/4] reference: tiny Llama fitted to the toy world ({a.prompts} prompts, 64 responses each)")
    ref_dir, prompts = build_reference(out, a.prompts, a.seed)
    judge = ToyJudge(ref_dir, prompts, a.threshold, a.beta)

    print(f"[2/4] prepare: {a.samples} samples per prompt on a local Ray, scored, dual solved, pairs written")
    prep = out / "prep"
    solution = prepare(out, ref_dir, f"file:{out / 'reward.py'}", f"file:{out / 'safety.py'},sign=+1", a.threshold,
                       a.beta, a.prompts, a.samples, a.seed)  # fmt: skip
    shutil.copy(prep / "frontier.png", out / "frontier.png")

    print(f"[3/4] MoCAN primal step ({a.objective}) with OpenRLHF's trainer, lambda = {solution['lam'][0]:.4f}")
    ckpt = primal_step(out, "mocan", a, ref_dir, "mocan")

    print("[4/4] exact evaluation of the trained policy by enumeration (whole distribution and renormalised)")
    report = {
        "algo": "mocan",
        "objective": a.objective,
        "threshold": a.threshold,
        "beta": a.beta,
        "lambda": solution["lam"],
        "reachable_safety": [float(np.mean(judge.safety.max(axis=1)))],  # over the world's 64 responses
        "predicted": {k: solution["predicted"][k] for k in ("reward", "safety", "kl")},
        **judge.evaluate_dir(ckpt),
    }
    return finish(out, report, t0)
