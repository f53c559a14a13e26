"""The embedded default end to end: MoCAN on the toy world lands on the exact constrained optimum,
and the evaluate step's estimates agree with the world's exact enumeration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from openrlhf_dual.artifacts import write_jsonl
from openrlhf_dual.launch import cpu_env

KEYS = {"threshold", "beta", "lambda", "reference", "reachable_safety", "predicted", "optimum", "achieved",
        "kl_to_optimum", "kl_ref_to_optimum"}  # fmt: skip


def run_demo(out: Path, seed: int, threshold: float) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "openrlhf_dual.demo", "--out", str(out), "--seed", str(seed),
         "--dual.threshold", str(threshold)],
        env=cpu_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def demo_seed1(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "seed1"
    return out, run_demo(out, 1, 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("seed, threshold", [(1, 1.0), (2, 0.0)])
def test_demo_reaches_the_exact_constrained_optimum(seed, threshold, tmp_path, request):
    out, stdout = request.getfixturevalue("demo_seed1") if seed == 1 else (tmp_path, run_demo(tmp_path, seed, threshold))
    report = json.loads((out / "report.json").read_text())
    assert KEYS <= set(report)
    ref, reach = report["reference"]["safety"][0], report["reachable_safety"][0]
    assert ref < threshold < reach
    assert report["achieved"]["safety"][0] >= threshold - 0.1 * (threshold - ref)
    assert report["kl_to_optimum"] <= 0.05 * report["kl_ref_to_optimum"]
    assert abs(report["lambda"][0] - report["optimum"]["lambda"][0]) <= 0.1 * report["optimum"]["lambda"][0]
    assert abs(report["optimum"]["safety"][0] - threshold) < 1e-8  # the exact optimum meets it exactly
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "KL(trained || optimum)" in stdout


@pytest.mark.slow
def test_evaluate_agrees_with_exact_enumeration_within_its_intervals(demo_seed1, tmp_path):
    """Held-out prompts of the toy world: evaluate's sampled estimates (reference and the MoCAN
    policy) against the exact expectations and KL by enumeration."""
    from openrlhf_dual.demo import world as W

    out, _ = demo_seed1
    trained_on = set(W.make_prompts(32, 1))
    held_out = [p for p in W.make_prompts(60, 99) if p not in trained_on][:24]
    write_jsonl(tmp_path / "heldout.jsonl", [{"input": p} for p in held_out])
    proc = subprocess.run(
        [sys.executable, "-m", "openrlhf_dual.cli.evaluate", "--dual.prep_dir", str(out / "prep"),
         "--eval.policy", f"mocan={out / 'mocan'}", "--eval.out", str(tmp_path / "eval"),
         "--data.prompt_dataset", str(tmp_path / "heldout.jsonl"), "--data.max_samples", "24",
         "--rollout.n_samples_per_prompt", "8"],
        env=cpu_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    reward, safety = W.score_table(held_out)
    ref = W.exact_policy(out / "reference", held_out)
    exact = {"reference": ref, "mocan": W.exact_policy(out / "mocan", held_out)}
    for name, policy in exact.items():
        got = report["policies"][name]
        for est, value in ((got["reward"], policy.expect(reward)), (got["safety"][0], policy.expect(safety)),
                           (got["kl"], policy.kl(ref))):  # fmt: skip
            assert est["lo"] <= value <= est["hi"], (name, est, value)
    mocan = report["policies"]["mocan"]
    assert mocan["constraints"][0]["threshold"] == 1.0 and mocan["constraints"][0]["verdict"] in ("met", "inconclusive")
    assert mocan["win_rate"]["safety"][0]["mean"] > 0.5  # safer than the reference, as trained
    assert abs(mocan["predicted"]["lambda"][0] - json.loads((out / "prep" / "dual.json").read_text())["lam"][0]) < 1e-12
    assert (tmp_path / "eval" / "plane.png").read_bytes()[:4] == b"\x89PNG"
    assert "| mocan |" in (tmp_path / "eval" / "report.md").read_text()
    assert np.isfinite(mocan["kl"]["mean"]) and mocan["kl"]["mean"] > 0
