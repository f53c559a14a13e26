"""The embedded default end to end: MoCAN on the toy world lands on the exact constrained optimum
over the WHOLE response distribution (every response up to the generation cap, not only the
world's 64), and the evaluate step's estimates agree with the world's exact enumeration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from openrlhf_dual.artifacts import write_jsonl
from openrlhf_dual.launch import cpu_env

# (seed, threshold, K): the default, then two other seeds and thresholds. Seed 1 at b = 1.0 is
# stringent (KL(ref || optimum) 2.28 nats): with K = 128 one prompt's weights at lambda* rest on 3.4
# effective samples, lambda comes out 5% high and KL(trained || optimum) at 0.058 of KL(ref ||
# optimum); prepare warns and says to raise K, and with K = 256 (11.7 effective samples) it lands.
SETTINGS = [(0, 0.5, 128), (1, 1.0, 256), (2, 0.0, 128)]
TOO_FEW = (1, 1.0, 128)  # what prepare warns about
WARNING = "few samples carry lambda*"


def run_demo(out: Path, seed: int, threshold: float, samples: int) -> str:
    """The demo's stdout and stderr (prepare's warnings), after it succeeded."""
    proc = subprocess.run(
        [sys.executable, "-m", "openrlhf_dual.demo", "--out", str(out), "--seed", str(seed),
         "--dual.threshold", str(threshold), "--samples", str(samples)],
        env=cpu_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> dict:
    """Demo outputs by (seed, threshold, K), run on first use."""
    root, done = tmp_path_factory.mktemp("demo"), {}

    def get(seed: int, threshold: float, samples: int) -> tuple[Path, str]:
        if (seed, threshold, samples) not in done:
            out = root / f"seed{seed}-k{samples}"
            done[seed, threshold, samples] = out, run_demo(out, seed, threshold, samples)
        return done[seed, threshold, samples]

    return get


def assert_lands_on_the_optimum(report: dict, threshold: float) -> None:
    """The acceptance, on the whole distribution: on-set mass within 1 point of the optimum's,
    KL(trained || optimum) <= 0.05 KL(reference || optimum) (upper bound against lower bound),
    violation <= 10% of the gap b - E_ref[g] (lower bound of the achieved safety)."""
    w = report["whole"]
    got, opt, ref = w["achieved"], w["optimum"], w["reference"]
    ref_g = ref["safety"][0][1]
    assert ref_g < threshold < report["reachable_safety"][0]
    assert max(w["unseen"].values()) < 1e-3  # the enumeration reached all but a sliver, bounded below
    assert opt["safety"][0][0] - 1e-3 <= threshold <= opt["safety"][0][1] + 1e-3  # lambda* meets b exactly
    assert abs(report["lambda"][0] - opt["lambda"][0]) <= 0.1 * opt["lambda"][0]
    # the acceptance: on-set mass, KL and violation, all on the whole distribution
    # on-set mass within 1 point of the optimum's, whatever the true values within both intervals
    (got_lo, got_hi), (opt_lo, opt_hi) = got["mass_on_set"], opt["mass_on_set"]
    assert max(got_hi - opt_lo, opt_hi - got_lo) <= 0.01, (got["mass_on_set"], opt["mass_on_set"])
    assert w["kl_to_optimum"][1] <= 0.05 * w["kl_ref_to_optimum"][0], (w["kl_to_optimum"], w["kl_ref_to_optimum"])
    assert got["safety"][0][0] >= threshold - 0.1 * (threshold - ref_g), got["safety"]


@pytest.mark.slow
@pytest.mark.parametrize("seed, threshold, samples", SETTINGS)
def test_demo_reaches_the_exact_constrained_optimum_over_the_whole_distribution(seed, threshold, samples, demos):
    out, stdout = demos(seed, threshold, samples)
    report = json.loads((out / "report.json").read_text())
    assert report["objective"] == "likelihood" and {"whole", "renormalised"} <= set(report)
    assert_lands_on_the_optimum(report, threshold)
    assert "KL(trained || optimum)" in stdout and "renormalised" in stdout
    assert WARNING not in stdout


@pytest.mark.slow
def test_prepare_warns_when_few_samples_carry_lambda(demos):
    """Seed 1 at b = 1.0 with K = 128: prepare says that lambda* rests on few samples and to raise
    K (the run above with K = 256 lands); dual.json records the number it judged by."""
    out, stdout = demos(*TOO_FEW)
    dual = json.loads((out / "prep" / "dual.json").read_text())
    assert dual["n_samples"] == 128 and dual["min_effective_samples"] < 10
    assert WARNING in stdout and "--rollout.n_samples_per_prompt" in stdout
    exact = json.loads((out / "report.json").read_text())["whole"]["optimum"]["lambda"][0]
    more = json.loads((demos(*SETTINGS[1])[0] / "prep" / "dual.json").read_text())
    assert more["min_effective_samples"] >= 10
    assert abs(more["lam"][0] - exact) < abs(dual["lam"][0] - exact) / 2  # 0.011 against 0.071


@pytest.mark.slow
def test_frontier_picture_and_numbers_match_the_dual(demos):
    """frontier.json passes through (b, lambda*) with the dual's predictions, and frontier.png is
    a picture of the figure's size with the curve drawn, not only a PNG header."""
    from matplotlib.image import imread

    out, _ = demos(*SETTINGS[0])
    dual = json.loads((out / "prep" / "dual.json").read_text())
    curve = json.loads((out / "prep" / "frontier.json").read_text())
    b = dual["thresholds"][0]
    assert np.all(np.diff(curve["threshold"]) > 0) and np.all(np.diff(curve["lam"]) >= 0)
    assert abs(np.interp(b, curve["threshold"], curve["lam"]) - dual["lam"][0]) < 0.01 * dual["lam"][0]
    for key in ("reward", "kl"):
        assert abs(np.interp(b, curve["threshold"], curve[key]) - dual["predicted"][key]) < 0.01
    image = imread(out / "frontier.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert len(np.unique(image.reshape(-1, image.shape[2]), axis=0)) > 50  # drawn, not blank


@pytest.mark.slow
def test_both_views_agree_with_direct_computations(demos):
    """The judge's renormalised view against full-sequence forward passes (W.exact_policy), and its
    whole-view scores against the world's own functions on the decoded text of its leaves."""
    from openrlhf_dual.demo import world as W
    from openrlhf_dual.demo.exact import ToyJudge, load_lm

    out, _ = demos(*SETTINGS[0])
    report = json.loads((out / "report.json").read_text())
    prompts = W.make_prompts(32, 0)
    reward, safety = W.score_table(prompts)
    trained = W.exact_policy(out / "mocan", prompts)
    r = report["renormalised"]
    assert abs(r["achieved"]["safety"][0] - trained.expect(safety)) < 1e-6
    assert abs(r["achieved"]["reward"] - trained.expect(reward)) < 1e-6
    judge = ToyJudge(out / "reference", prompts[:4], 0.5, 0.5)
    model, tok = load_lm(out / "mocan")
    rng = np.random.default_rng(0)
    for i, tree in enumerate(judge._expand([model, judge.ref])):
        for k in rng.choice(len(tree.logp), 50, replace=False):
            text = tok.decode(list(tree.leaf(k)), skip_special_tokens=True)
            assert tree.scores[k].tolist() == pytest.approx([W.toy_reward(prompts[i], text), W.toy_safety(prompts[i], text)])


@pytest.mark.slow
def test_evaluate_agrees_with_exact_enumeration_within_its_intervals(demos, tmp_path):
    """Held-out prompts of the toy world: evaluate's sampled estimates (reference and the MoCAN
    policy; sampling sees every response, on the set or not) against the exact whole-distribution
    expectations and KL."""
    from matplotlib.image import imread

    from openrlhf_dual.demo import world as W
    from openrlhf_dual.demo.exact import ToyJudge

    out, _ = demos(*SETTINGS[1])
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
    judge = ToyJudge(out / "reference", held_out, 1.0, 0.5)
    exact = {"reference": judge.evaluate(judge.ref)["whole"], "mocan": judge.evaluate_dir(out / "mocan")["whole"]}
    for name, w in exact.items():
        got = report["policies"][name]
        for est, (lo, hi) in ((got["reward"], w["achieved"]["reward"]), (got["safety"][0], w["achieved"]["safety"][0]),
                              (got["kl"], w["achieved"]["kl"])):  # fmt: skip
            assert est["lo"] <= hi and lo <= est["hi"], (name, est, lo, hi)
    mocan = report["policies"]["mocan"]
    # the verdict is never wrong about the exact safety: "met" only above b, "violated" only below
    # (at K = 256 the policy lands at 0.89 on its training prompts, within the acceptance's 10% of
    # the gap below b = 1.0, so on held-out prompts "violated" is the true answer)
    (g_lo, g_hi), check = exact["mocan"]["achieved"]["safety"][0], mocan["constraints"][0]
    assert check["threshold"] == 1.0 and check["verdict"] in ("met", "violated", "inconclusive")
    assert check["verdict"] != "met" or g_hi >= 1.0, (check, g_lo, g_hi)
    assert check["verdict"] != "violated" or g_lo < 1.0, (check, g_lo, g_hi)
    assert mocan["win_rate"]["safety"][0]["mean"] > 0.5  # safer than the reference, as trained
    assert abs(mocan["predicted"]["lambda"][0] - json.loads((out / "prep" / "dual.json").read_text())["lam"][0]) < 1e-12
    assert "| mocan |" in (tmp_path / "eval" / "report.md").read_text()
    assert exact["mocan"]["achieved"]["kl"][0] > 0.5  # trained far from the reference: the check has teeth
    plane = imread(tmp_path / "eval" / "plane.png")
    assert plane.ndim == 3 and len(np.unique(plane.reshape(-1, plane.shape[2]), axis=0)) > 50
