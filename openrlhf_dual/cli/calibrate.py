"""The closed loop for when one shot misses: the next lambda from evaluated policies, and whether
the constraint is certified.

    python -m openrlhf_dual.cli.calibrate --dual.prep_dir prep/ --eval.report eval/report.json \
        [--eval.report eval-round2/report.json ...] [--calibrate.tolerance 0.05] --calibrate.out calib/

Each evaluate report (openrlhf_dual.cli.evaluate) holds policies trained at a known lambda (the
one given as NAME=PATH:LAMBDA, else the prep directory's lambda*) with their achieved safety and
its standard error on held-out prompts. The latest measurement (the last policy of the last
report, or the last one named by --eval.policy) is corrected from: the dual on the prep
directory's scores is re-solved for thresholds shifted by the measured miss (openrlhf_dual.calibration).
No new samples of pi_ref: retrain with the printed `--dual.lambda`. Writes calibration.json.
Certified: every constraint's one-sided 95% lower bound >= b_j - tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from openrlhf_dual.artifacts import write_json
from openrlhf_dual.calibration import Measurement, certify, next_lambda
from openrlhf_dual.prep import PrepError, load_scores


def measurements(reports: list[dict], names: list[str] | None) -> list[tuple[str, Measurement]]:
    """(name, measurement) of every evaluated policy (not the reference), reports in order; only
    `names` (in that order) when given."""
    found = {}
    for report in reports:
        for name, p in report["policies"].items():
            if name == "reference":
                continue
            if "predicted" not in p:
                raise ValueError(f"policy {name!r} has no lambda in its evaluate report: evaluate it as NAME=PATH:LAMBDA")
            values = [c["value"] for c in p["constraints"]]
            found[name] = Measurement(np.asarray(p["predicted"]["lambda"], dtype=np.float64),
                                      np.array([v["mean"] for v in values]), np.array([v["se"] for v in values]))  # fmt: skip
    missing = [n for n in names or [] if n not in found]
    if missing or not found:
        raise ValueError(f"no evaluated policy named {missing}" if missing else "the reports hold no trained policy")
    return [(n, found[n]) for n in names] if names else list(found.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dual.prep_dir", required=True, help="the prep directory the policies were trained from")
    p.add_argument("--eval.report", nargs="+", required=True, help="evaluate report.json files, oldest first")
    p.add_argument("--eval.policy", nargs="+", default=None, help="the policies to use, oldest first (default: all)")
    p.add_argument("--calibrate.tolerance", type=float, nargs="+", default=[0.0],
                   help="certify E[g_j] >= b_j - tolerance_j (one value, or one per constraint; thresholds' units)")
    p.add_argument("--calibrate.out", required=True, help="output directory (calibration.json)")
    return p


def load_prep(prep_dir: Path) -> tuple[dict, np.ndarray]:
    """(dual.json, scores [N, K, 1 + m]: reward then each safety) of a finished prepare."""
    return json.loads((prep_dir / "dual.json").read_text()), load_scores(prep_dir)


def calibrate(a: dict) -> dict:
    prep_dir = Path(a["dual.prep_dir"])
    solution, scores = load_prep(prep_dir)
    reports = [json.loads(Path(r).read_text()) for r in a["eval.report"]]
    for path, report in zip(a["eval.report"], reports):
        if report["thresholds"] != solution["thresholds"]:
            raise ValueError(f"{path} was evaluated against thresholds {report['thresholds']}, "
                             f"{prep_dir} holds {solution['thresholds']}")  # fmt: skip
    measured = measurements(reports, a["eval.policy"])
    b = np.asarray(solution["thresholds"], dtype=np.float64)
    tolerance = np.asarray(a["calibrate.tolerance"], dtype=np.float64)
    if tolerance.shape not in ((1,), b.shape):
        raise ValueError(f"--calibrate.tolerance takes 1 or {len(b)} values, got {len(tolerance)}")
    step = next_lambda(scores[..., 0], scores[..., 1:], b, solution["beta"], [m for _, m in measured],
                       form=solution["form"])  # fmt: skip
    certificates = [(name, certify(m, b, np.broadcast_to(tolerance, b.shape))) for name, m in measured]
    algo = "pecan" if solution["form"] == "margin" else "mocan"
    lam = " ".join(f"{v:.6g}" for v in step.lam)
    result = {
        "prep_dir": str(prep_dir),
        "thresholds": b.tolist(),
        "tolerance": np.broadcast_to(tolerance, b.shape).tolist(),
        "measurements": [{"policy": name, "lambda": m.lam.tolist(), "achieved": m.achieved.tolist(),
                          "stderr": m.stderr.tolist(), "lower_bound": c.lower_bound.tolist(),
                          "certified": c.certified} for (name, m), (_, c) in zip(measured, certificates)],  # fmt: skip
        "certified": certificates[-1][1].certified,
        "lambda": step.lam.tolist(),
        "lambda_interval": step.interval.tolist(),
        "corrected_thresholds": step.corrected_thresholds.tolist(),
        "offset": step.offset.tolist(),
        "gain": step.gain.tolist(),
        "predicted_safety": step.predicted.tolist(),
        "command": (f"<your openrlhf_dual.cli.train_sft launch and flags (or train_dpo, as you trained)> --dual.algo {algo} "
                    f"--dual.prep_dir {prep_dir} --dual.lambda {lam}"),
    }
    write_json(Path(a["calibrate.out"]) / "calibration.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    a = vars(build_parser().parse_args(argv))
    try:
        result = calibrate(a)
    except (ValueError, FileNotFoundError, PrepError) as err:
        print(f"calibrate: {err}", file=sys.stderr)
        return 2
    except KeyError as err:
        print(f"calibrate: an input lacks the field {err}: is it an evaluate report.json / a prep directory?", file=sys.stderr)
        return 2
    for m in result["measurements"]:
        verdict = "certified" if m["certified"] else "not certified"
        print(f"{m['policy']}: lambda {m['lambda']} achieved {m['achieved']} (95% lower bound {m['lower_bound']}) "
              f"against thresholds {result['thresholds']} - tolerance {result['tolerance']}: {verdict}")  # fmt: skip
    print(f"next lambda {result['lambda']} (95% interval {result['lambda_interval']}), solved for corrected "
          f"thresholds {result['corrected_thresholds']}; train with:\n  {result['command']}")  # fmt: skip
    print("CERTIFIED" if result["certified"] else "not certified yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
