"""The embedded default: CAN end to end on the enumerable toy world, checked against the exact
constrained optimum.

    python -m openrlhf_dual.demo --out DIR [--algo mocan|pecan|ppo] [--seed N] [--dual.threshold B]
    python -m openrlhf_dual.demo --out DIR --constraints 2 [--dual.threshold B1 B2]
    python -m openrlhf_dual.demo --out DIR [flags as above] --calibrate R

MoCAN (default): fit the tiny reference LM; prepare on a local Ray (hf sampling actors, the toy
reward and safety scored through the real reward-file adapter, the dual, pairs); the primal step
with a real OpenRLHF trainer under torchrun (2 ranks, ZeRO-2): --objective likelihood (default;
the dual-weighted likelihood of prepare's samples on OpenRLHF's SFT trainer) or dpo (the paper's
pseudo-preference DPO, optionally with --anchor C); exact evaluation of the trained checkpoint
(demo.exact: the whole response distribution, and the distribution renormalised to the world's
64 responses, side by side).
PeCAN: the same world without reward models: Bradley-Terry preference data from the true reward
and safety, two pre-alignment DPO runs, prepare on the implicit rewards (margin dual), PeCAN
training, exact evaluation. Writes DIR/report.json (same keys for all) and DIR/frontier.png.
PPO (vLLM tier: needs vLLM): one-shot constrained PPO, OpenRLHF's train_ppo_ray on r + lambda*.g,
exact evaluation over the whole response distribution (demo/ppo.py; further train_ppo_ray flags
pass through, e.g. `--algo.advantage.estimator group_norm`).
Several constraints (MoCAN): --constraints 2 adds the world's engagement (demo.world.ENGAGEMENT,
in part at odds with safety: refusing is safe and unengaged) as a second constraint E[g_2] >= B2,
scored through its own reward file, and DIR/constraints.png (demo.pictures: the two safeties
against each other, both thresholds, the reference, the exact optimum and the trained policy)
instead of the one-constraint frontier. The default thresholds (0.5 1.0) make both bind; with
`--dual.threshold 0.5 0.3` engagement is slack and safety active (lambda_2 = 0 exactly).
Calibration (MoCAN or PeCAN): --calibrate R then runs R rounds of the closed loop on the same prep
directory (demo.calibrated; continues a finished demo in DIR run with the same flags).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from openrlhf_dual.demo.steps import EPOCHS, OBJECTIVES

# defaults by number of constraints m. Two binding constraints tilt about twice as far as one
# (KL(ref || optimum) ~2 nats against ~0.9): more samples per prompt keep the weighted samples'
# effective size, and a third epoch fits the larger tilt (at seed 1, K = 128 and 2 epochs land at
# KL(trained || optimum) = 0.059 KL(ref || optimum); K = 256 and 3 epochs at 0.011).
THRESHOLDS = {1: (0.5,), 2: (0.5, 1.0)}  # all bind
SAMPLES = {1: 128, 2: 256}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--algo", choices=("mocan", "pecan", "ppo"), default="mocan")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--constraints", type=int, choices=sorted(THRESHOLDS), default=1,
                   help="m: the world's first m constraints (1: safety; 2: safety and engagement, MoCAN only)")
    p.add_argument("--dual.threshold", dest="threshold", type=float, nargs="+", default=None,
                   help="E[g_j] >= B_j, one per constraint, in the world's true units (PeCAN: converted to a margin; "
                        "default 0.5; with --constraints 2: 0.5 1.0, both binding)")  # fmt: skip
    p.add_argument("--dual.beta", dest="beta", type=float, default=0.5)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=None, help=f"K reference samples per prompt (default {SAMPLES})")
    p.add_argument("--objective", choices=OBJECTIVES, default=OBJECTIVES[0], help="the primal step")
    p.add_argument("--anchor", type=float, default=0.0, help="dpo: --dual.anchor coefficient (0: the paper's DPO)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"of the primal step (default {EPOCHS}; with --constraints 2: 3)")  # fmt: skip
    p.add_argument("--pairs", type=int, default=128, help="PeCAN: preference pairs per prompt for each pre-alignment")
    p.add_argument("--calibrate", type=int, default=0, metavar="R",
                   help="then R calibration rounds (demo.calibrated: retrain at the corrected lambda, no new samples); "
                        "a finished demo in --out with the same flags is continued, not rerun")  # fmt: skip
    p.add_argument("--ppo.steps", dest="ppo_steps", type=int, default=60, help="PPO: rollouts (one per episode)")
    p.add_argument("--ppo.samples", dest="ppo_samples", type=int, default=8, help="PPO: responses per prompt per rollout")
    p.add_argument("--ppo.minibatches", dest="ppo_minibatches", type=int, default=1,
                   help="PPO: optimizer steps per rollout")  # fmt: skip
    p.add_argument("--ppo.lr", dest="ppo_lr", type=float, default=2e-3)
    p.add_argument("--ppo.reward_server", dest="ppo_reward_server", action="store_true",
                   help="PPO: reward from openrlhf_dual.cli.serve_reward instead of the prep directory's reward file")  # fmt: skip
    a, extra = p.parse_known_args(argv)
    if extra and a.algo != "ppo":
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if a.anchor and a.objective != "dpo":
        p.error("--anchor is a coefficient of the dpo objective")
    if a.calibrate and a.algo == "ppo":
        p.error("--calibrate retrains with the primal step of MoCAN or PeCAN")
    if a.calibrate < 0:
        p.error("--calibrate takes a number of rounds >= 0")
    if a.constraints > 1 and a.algo != "mocan":
        p.error("--constraints > 1 is a MoCAN demo")
    a.threshold = a.threshold or list(THRESHOLDS[a.constraints])
    if len(a.threshold) != a.constraints:
        p.error(f"--dual.threshold takes {a.constraints} values with --constraints {a.constraints}, got {a.threshold}")
    a.threshold = a.threshold[0] if a.constraints == 1 else a.threshold  # one constraint: a float, as before
    a.samples = a.samples or SAMPLES[a.constraints]
    a.epochs = a.epochs or (EPOCHS[a.objective] if a.constraints == 1 else 3)
    a.extra = extra  # PPO: more train_ppo_ray flags, given after ours
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    out = Path(a.out)
    if a.calibrate and (out / "report.json").exists():
        from openrlhf_dual.demo.calibrated import run as rounds

        return rounds(a, out, a.calibrate)
    if out.exists():
        shutil.rmtree(out)
    if a.algo == "pecan":
        from openrlhf_dual.demo.pecan import run
    elif a.algo == "ppo":
        from openrlhf_dual.demo.ppo import run
    else:
        from openrlhf_dual.demo.mocan import run
    report = run(a, out)
    if a.calibrate:
        from openrlhf_dual.demo.calibrated import run as rounds

        return rounds(a, out, a.calibrate)
    return report


if __name__ == "__main__":
    main()
