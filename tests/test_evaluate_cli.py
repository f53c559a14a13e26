"""`cli.evaluate` on a real PeCAN prep directory (prepare and evaluate in-process on one local Ray,
three tiny models): margins, units and the dual's prediction checked by identities that hold on
the very samples evaluate draws."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import WORDS

BETA = 0.5


@pytest.fixture(scope="module")
def pecan_eval(tiny_model_dir, tiny_policies, tmp_path_factory):
    """A PeCAN prep directory (pi_r, pi_g: policy sources; a binding margin threshold) and the
    report of evaluating pi_g itself against it."""
    import ray

    from openrlhf_dual.cli.evaluate import main as evaluate
    from openrlhf_dual.prep import PrepConfig, run_prepare

    root = tmp_path_factory.mktemp("pecan_eval")
    pi_r, pi_g = tiny_policies
    for name, offset in (("prompts", 0), ("heldout", 20)):
        rows = [{"input": f"{WORDS[i + offset]} {WORDS[i + offset + 1]}"} for i in range(4)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = PrepConfig(
        prep_dir=str(root / "prep"), ref_model=str(tiny_model_dir), prompt_dataset=str(root / "prompts.jsonl"),
        reward=f"policy:{pi_r}", safety=(f"policy:{pi_g},sign=+1",), thresholds=(-1.0,), beta=BETA, algo="pecan",
        apply_chat_template=True, max_samples=4, n_samples=6, max_new_tokens=4, seed=3,
    )  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        slack = run_prepare(cfg)
        margin = 0.5 * slack["reachable"][0]  # binding: between the reference's margin (0) and the reachable one
        solution = run_prepare(dataclasses.replace(cfg, thresholds=(margin,)))  # re-solves the dual only
        code = evaluate(["--dual.prep_dir", cfg.prep_dir, "--eval.policy", f"pig={pi_g}", "--eval.out",
                         str(root / "eval"), "--data.prompt_dataset", str(root / "heldout.jsonl"),
                         "--data.max_samples", "4", "--rollout.n_samples_per_prompt", "6"])  # fmt: skip
    finally:
        ray.shutdown()
    assert code == 0
    return root, solution, json.loads((root / "eval" / "report.json").read_text())


def test_pecan_report_is_in_margin_units_with_the_prep_dirs_threshold(pecan_eval):
    root, solution, report = pecan_eval
    assert solution["form"] == "margin" and solution["lam"][0] > 0
    assert report["margin"] is True and report["beta"] == BETA
    assert report["thresholds"] == solution["thresholds"] and (report["n_prompts"], report["n_samples"]) == (4, 6)
    ref, pig = report["policies"]["reference"], report["policies"]["pig"]
    # the reference's margin over itself is exactly 0, and so is its KL
    assert ref["constraints"][0]["value"]["mean"] == 0.0 and ref["kl"]["mean"] == 0.0
    assert ref["constraints"][0]["verdict"] == "violated"  # 0 < the threshold, with a zero-width interval
    # pi_g's safety is beta log(pi_g / pi_ref) on its own samples: beta times its KL estimate
    assert pig["safety"][0]["mean"] == pytest.approx(BETA * pig["kl"]["mean"], rel=1e-4, abs=1e-6)
    assert pig["kl"]["mean"] > 0
    # the constraint is on the margin: pi_g's E[g] minus the reference's, both in beta x log-ratio
    value = pig["constraints"][0]["value"]
    assert value["mean"] == pytest.approx(pig["safety"][0]["mean"] - ref["safety"][0]["mean"], abs=1e-9)
    assert pig["constraints"][0]["threshold"] == pytest.approx(solution["thresholds"][0])
    # the dual's prediction for lambda* is in the same units: the margin it was solved for
    assert pig["predicted"]["lambda"] == solution["lam"]
    assert pig["predicted"]["safety"][0] == pytest.approx(solution["thresholds"][0], abs=1e-8)
    assert pig["predicted"]["kl"] == pytest.approx(solution["predicted"]["kl"], rel=1e-9)
    md = (root / "eval" / "report.md").read_text()
    assert "| pig |" in md and "margins over the reference" in md
    from matplotlib.image import imread

    assert imread(str(root / "eval" / "plane.png")).shape[:2] == (550, 825)
