"""MoCAN on the toy world: reward and safety models given (here: the world's own, as reward files)."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from openrlhf_dual.demo import world as W
from openrlhf_dual.demo.exact import ToyJudge, columns
from openrlhf_dual.demo.steps import build_reference, finish, prepare, primal_step, run_flags


def run(a: argparse.Namespace, out: Path) -> dict:
    t0 = time.time()
    print(f"[1/4] reference: tiny Llama fitted to the toy world ({a.prompts} prompts, 64 responses each)")
    ref_dir, prompts = build_reference(out, a.prompts, a.seed)
    thresholds = np.atleast_1d(a.threshold).tolist()  # one per constraint: the world's first m
    judge = ToyJudge(ref_dir, prompts, a.threshold, a.beta)

    print(f"[2/4] prepare: {a.samples} samples per prompt on a local Ray, scored, dual solved, pairs written")
    prep = out / "prep"
    safety = [f"file:{out / name},sign=+1" for name, _ in W.CONSTRAINT_FILES[: len(thresholds)]]
    solution = prepare(out, ref_dir, f"file:{out / 'reward.py'}", safety, thresholds, a.beta, a.prompts, a.samples,
                       a.seed)  # fmt: skip
    if (prep / "frontier.png").exists():  # one constraint: the frontier curve
        shutil.copy(prep / "frontier.png", out / "frontier.png")

    lams = ", ".join(f"{x:.4f}" for x in solution["lam"])
    print(f"[3/4] MoCAN primal step ({a.objective}) with OpenRLHF's trainer, lambda = {lams}")
    ckpt = primal_step(out, "mocan", a, ref_dir, "mocan")

    print("[4/4] exact evaluation of the trained policy by enumeration (whole distribution and renormalised)")
    report = {
        "algo": "mocan",
        "objective": a.objective,
        "flags": run_flags(a),
        **({"threshold": thresholds[0]} if len(thresholds) == 1 else {}),  # one constraint: a float, as before
        "thresholds": thresholds,
        "beta": a.beta,
        "lambda": solution["lam"],
        "lambda_stderr": solution["stderr"],  # the dual's sandwich standard error over prompts, per constraint
        "reachable_safety": columns(judge.safety).max(axis=1).mean(axis=0).tolist(),  # over the world's 64 responses
        "predicted": {k: solution["predicted"][k] for k in ("reward", "safety", "kl")},
        **judge.evaluate_dir(ckpt),
    }
    if len(thresholds) == 2:  # the two safeties against each other
        from openrlhf_dual.demo.pictures import plot_constraints

        plot_constraints(report, out / "constraints.png")
    return finish(out, report, t0)
