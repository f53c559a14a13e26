"""MoCAN on the toy world: reward and safety models given (here: the world's own, as reward files)."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from openrlhf_dual.demo import world as W
from openrlhf_dual.demo.steps import build_reference, dpo, exact_optimum, finish, prepare, summary


def run(a: argparse.Namespace, out: Path) -> dict:
    t0 = time.time()
    print(f"[1/4] reference: tiny Llama fitted to the toy world ({a.prompts} prompts, 64 responses each)")
    ref_dir, prompts = build_reference(out, a.prompts, a.seed)
    ref = W.exact_policy(ref_dir, prompts)
    reward, safety = W.score_table(prompts)
    lam_opt, opt = exact_optimum(ref, reward, safety, a.threshold, a.beta)

    print(f"[2/4] prepare: {a.samples} samples per prompt on a local Ray, scored, dual solved, pairs written")
    prep = out / "prep"
    solution = prepare(out, ref_dir, f"file:{out / 'reward.py'}", f"file:{out / 'safety.py'},sign=+1", a.threshold,
                       a.beta, a.prompts, a.samples, a.seed)  # fmt: skip
    shutil.copy(prep / "frontier.png", out / "frontier.png")

    print(f"[3/4] MoCAN: OpenRLHF DPO trainer on pseudo-preferences, lambda = {solution['lam'][0]:.4f}")
    ckpt = dpo(out, "mocan", "openrlhf_dual.cli.train_dpo", ref_dir, a.beta, a.epochs,
               ["--dual.algo", "mocan", "--dual.prep_dir", str(prep)])  # fmt: skip

    print("[4/4] exact evaluation of the trained policy by enumeration")
    trained = W.exact_policy(ckpt, prompts)
    report = {
        "algo": "mocan",
        "threshold": a.threshold,
        "beta": a.beta,
        "lambda": solution["lam"],
        "reference": {"reward": ref.expect(reward), "safety": [ref.expect(safety)]},
        "reachable_safety": [float(np.mean(safety.max(axis=1)))],
        "predicted": {k: solution["predicted"][k] for k in ("reward", "safety", "kl")},
        "optimum": {"lambda": [lam_opt], **summary(opt, reward, safety, ref)},
        "achieved": summary(trained, reward, safety, ref),
        "kl_to_optimum": trained.kl(opt),
        "kl_ref_to_optimum": ref.kl(opt),
    }
    return finish(out, report, t0, solution["lam"][0])
