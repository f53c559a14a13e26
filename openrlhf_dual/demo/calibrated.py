"""Calibration rounds on a finished toy-world demo: the closed loop of openrlhf_dual.calibration,
measured exactly.

    python -m openrlhf_dual.demo --out DIR [the demo's flags] --calibrate R

Round 0 is the demo's one-shot policy (DIR/report.json; the demo is run first when DIR holds none).
Each round re-solves the dual on the demo's own prep directory for the thresholds corrected by the
measured miss (calibration.next_lambda; no new samples of pi_ref), retrains with `--dual.lambda`
(same objective, epochs and seed as the one-shot run: only the labels or weights change) and
evaluates the new policy exactly on the whole response distribution (demo.exact). The measurement
fed back is that exact safety, moved to the prep directory's threshold units (PeCAN: the margin
over the reference's true safety); its interval [lo, hi] enters as mean (lo + hi) / 2 with
standard error (hi - lo) / (2 x 1.645), so the certificate's one-sided lower bound is the
enumeration's rigorous lower bound. Certified: lower bound >= b_j - tolerance_j with tolerance 5%
of each gap b_j - E_ref[g_j]. All R rounds are run (the evidence wants each; recipes/calibrated.sh
stops at the first certificate). Writes DIR/calibration.json (one entry per round, rewritten after
each: a rerun with a larger R resumes) and DIR/calibration.png (achieved safety against round).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from openrlhf_dual.artifacts import write_json
from openrlhf_dual.calibration import Z95_ONE_SIDED, Measurement, certify, next_lambda
from openrlhf_dual.cli.calibrate import load_prep
from openrlhf_dual.demo import world as W
from openrlhf_dual.demo.exact import ToyJudge
from openrlhf_dual.demo.steps import primal_step, run_flags

TOLERANCE = 0.05  # of each gap b_j - E_ref[g_j]: what a round may fall short of b_j and still certify


def thresholds_of(report: dict) -> np.ndarray:
    """[m] the demo's thresholds in the world's true units."""
    return np.asarray(report.get("thresholds", [report.get("threshold")]), dtype=np.float64)


def check_same_demo(report: dict, a: argparse.Namespace) -> None:
    """Refuse rounds whose flags differ from the finished demo they continue (its world, samples,
    trainer and thresholds, as report.json records them)."""
    if "flags" not in report:
        raise SystemExit("--calibrate continues a demo whose report.json records its flags; this one does not: rerun the demo")
    want, got = {"algo": a.algo, **run_flags(a)}, {"algo": report["algo"], **report["flags"]}
    if want != got:
        differ = {k: (got.get(k), want.get(k)) for k in want.keys() | got.keys() if want.get(k) != got.get(k)}
        raise SystemExit(f"--calibrate continues the demo in its --out directory; these flags differ from the ones it "
                         f"ran with (name: (demo, now)): {differ}")  # fmt: skip


def entry(k: int, lam: Sequence[float] | np.ndarray, whole: dict, shift: np.ndarray, b: np.ndarray, tol: np.ndarray, seconds: float | None) -> dict:
    """One round's record: the policy trained at lam, judged on the whole distribution, its
    measurement in the prep directory's units and certificate."""
    safety = np.asarray(whole["achieved"]["safety"], dtype=np.float64)  # [m, 2] true units
    mid = safety.mean(axis=1)
    measured = Measurement(np.asarray(lam, dtype=np.float64), mid - shift, (safety[:, 1] - safety[:, 0]) / (2 * Z95_ONE_SIDED))
    cert = certify(measured, b - shift, tol)
    return {
        "round": k, "lambda": measured.lam.tolist(), "safety": safety.tolist(), "reward": whole["achieved"]["reward"],
        "kl_to_optimum": whole["kl_to_optimum"], "kl_ref_to_optimum": whole["kl_ref_to_optimum"],
        "mass_on_set": whole["achieved"]["mass_on_set"], "miss": np.abs(mid - b).tolist(),
        "violation": np.maximum(b - mid, 0.0).tolist(), "lower_bound": (cert.lower_bound + shift).tolist(),
        "certified": cert.certified, "train_seconds": None if seconds is None else round(seconds, 1),
        "measurement": {"lam": measured.lam.tolist(), "achieved": measured.achieved.tolist(), "stderr": measured.stderr.tolist()},
    }  # fmt: skip


def as_measurement(e: dict) -> Measurement:
    """A round's record as the Measurement it fed back."""
    return Measurement(*(np.asarray(e["measurement"][k], dtype=np.float64) for k in ("lam", "achieved", "stderr")))


def run(a: argparse.Namespace, out: Path, rounds: int) -> dict:
    """R calibration rounds after the demo in `out` (see the module docstring); returns calibration.json."""
    from openrlhf_dual.demo.pictures import plot_rounds

    report = json.loads((out / "report.json").read_text())
    check_same_demo(report, a)
    solution, scores = load_prep(out / "prep")
    b = thresholds_of(report)
    shift = b - np.asarray(solution["thresholds"], dtype=np.float64)  # true units minus the prep's (PeCAN: E_ref[g])
    ref_safety = np.asarray(report["whole"]["reference"]["safety"], dtype=np.float64).mean(axis=1)
    tol = TOLERANCE * np.maximum(b - ref_safety, 0.0)
    path = out / "calibration.json"
    done = json.loads(path.read_text()) if path.exists() else {
        "algo": report["algo"], "objective": report["objective"], "epochs": a.epochs, "thresholds": b.tolist(),
        "tolerance": tol.tolist(), "reference_safety": ref_safety.tolist(),
        "optimum": {k: report["whole"]["optimum"][k] for k in ("lambda", "reward", "safety")},
        "one_shot_seconds": report["seconds"],
        "rounds": [entry(0, report["lambda"], report["whole"], shift, b, tol, None)],
    }  # fmt: skip
    write_json(path, done)
    algo = report["algo"]
    judge = None
    for k in range(len(done["rounds"]), rounds + 1):
        if judge is None:
            judge = ToyJudge(out / "reference", W.make_prompts(a.prompts, a.seed), a.threshold, a.beta)
        step = next_lambda(scores[..., 0], scores[..., 1:], solution["thresholds"], solution["beta"],
                           [as_measurement(e) for e in done["rounds"]], form=solution["form"])  # fmt: skip
        lam = " ".join(f"{x:.6g}" for x in step.lam)
        print(f"[round {k}/{rounds}] offset {step.offset.tolist()} gain {step.gain.tolist()}: corrected thresholds "
              f"{step.corrected_thresholds.tolist()} -> lambda {lam}; retraining ({a.objective}, {a.epochs} epochs)")  # fmt: skip
        t0 = time.time()
        ckpt = primal_step(out, f"round-{k}", a, out / "reference", algo, ["--dual.lambda", *lam.split()])
        seconds = time.time() - t0
        e = entry(k, step.lam, judge.evaluate_dir(ckpt)["whole"], shift, b, tol, seconds)
        e.update(lambda_interval=step.interval.tolist(), corrected_thresholds=step.corrected_thresholds.tolist(),
                 offset=step.offset.tolist(), gain=step.gain.tolist())  # fmt: skip
        done["rounds"].append(e)
        write_json(path, done)
    plot_rounds(done, out / "calibration.png")
    print(table(done))
    return done


def table(done: dict) -> str:
    """The rounds as text, constraint by constraint, with the certificate."""
    lines = [f"calibration ({done['algo']}, {done['objective']}, {done['epochs']} epochs), whole distribution; "
             f"thresholds {done['thresholds']}, tolerance {[round(t, 4) for t in done['tolerance']]}:"]  # fmt: skip
    for e in done["rounds"]:
        cells = ", ".join(f"E[g_{j + 1}] [{lo:+.4f}, {hi:+.4f}] |E[g]-b| {d:.4f} violation {v:.4f}"
                          for j, ((lo, hi), d, v) in enumerate(zip(e["safety"], e["miss"], e["violation"])))  # fmt: skip
        lb = ", ".join(f"{x:+.4f}" for x in e["lower_bound"])
        lines.append(f"  round {e['round']}: lambda {[round(x, 4) for x in e['lambda']]}: {cells}; reward "
                     f"{np.mean(e['reward']):+.4f}; KL(trained || optimum) {e['kl_to_optimum'][1]:.4f}; "
                     f"95% lower bound {lb}: {'CERTIFIED' if e['certified'] else 'not certified'}")  # fmt: skip
    return "\n".join(lines)
