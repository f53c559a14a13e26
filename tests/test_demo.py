"""The embedded default end to end: MoCAN on the toy world lands on the exact constrained optimum."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from openrlhf_dual.launch import cpu_env

KEYS = {"threshold", "beta", "lambda", "reference", "reachable_safety", "predicted", "optimum", "achieved",
        "kl_to_optimum", "kl_ref_to_optimum"}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("seed, threshold", [(1, 1.0), (2, 0.0)])
def test_demo_reaches_the_exact_constrained_optimum(seed, threshold, tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "openrlhf_dual.demo", "--out", str(out), "--seed", str(seed),
         "--dual.threshold", str(threshold)],
        env=cpu_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert KEYS <= set(report)
    ref, reach = report["reference"]["safety"][0], report["reachable_safety"][0]
    assert ref < threshold < reach
    assert report["achieved"]["safety"][0] >= threshold - 0.1 * (threshold - ref)
    assert report["kl_to_optimum"] <= 0.05 * report["kl_ref_to_optimum"]
    assert abs(report["lambda"][0] - report["optimum"]["lambda"][0]) <= 0.1 * report["optimum"]["lambda"][0]
    assert abs(report["optimum"]["safety"][0] - threshold) < 1e-8  # the exact optimum meets it exactly
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "KL(trained || optimum)" in proc.stdout
