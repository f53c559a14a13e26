"""Two constraints (m = 2) on the toy world: safety and engagement, which conflict in part.

Fast: the exact whole-distribution optimum for m = 2 (demo.whole.exact_multiplier and
optimum_distribution, what demo.exact.ToyJudge calls) on the distribution the demo's reference is
fitted to, enumerated whole, checked by its KKT conditions and against two independent scipy
optimisers (the dual by L-BFGS-B, the primal by SLSQP over the response distributions).
Slow: `python -m openrlhf_dual.demo --constraints 2` end to end, both constraints binding at two
seeds, and one slack and one active."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import logsumexp

from openrlhf_dual.demo import world as W
from openrlhf_dual.demo.__main__ import THRESHOLDS
from openrlhf_dual.demo.tree import log_prob_floor
from openrlhf_dual.demo.whole import Enumeration, exact_multiplier, optimum_distribution, whole_distribution
from openrlhf_dual.launch import cpu_env
from test_whole import enumerations as tree_enumerations, grow, models  # noqa: F401 (models: test_whole's fixture)

BETA = 0.5
PROMPTS = W.make_prompts(32, 0)
BOTH = THRESHOLDS[2]  # the demo's default: both bind
SLACK = (0.5, 0.3)  # engagement slack, safety active (the setting __main__ documents)


LOGREF = np.log(W.reference_table(PROMPTS))  # [P, 64]: the i.i.d. words the demo's LM is fitted to
REWARD, SAFETY = W.score_table(PROMPTS, 2)  # [P, 64], [P, 64, 2]


def enumerations() -> list[Enumeration]:
    """The whole distribution: every response enumerated, nothing cut."""
    scores = np.concatenate([REWARD[..., None], SAFETY], axis=-1)
    none = np.zeros(0)
    return [Enumeration(logp=lp, logp_ref=lp, scores=s, on_set=np.ones(len(lp), dtype=bool), cut_logp=none,
                        cut_logp_ref=none, cut_scores=np.zeros((0, 3)), cut_tokens=none, token_scores=np.zeros((1, 3)))
            for lp, s in zip(LOGREF, scores)]  # fmt: skip


def optimum(lam: np.ndarray) -> np.ndarray:
    """pi_lam = pi_ref exp((r + lam . g) / beta) / Z, [P, 64]."""
    x = LOGREF + (REWARD + SAFETY @ lam) / BETA
    return np.exp(x - logsumexp(x, axis=1, keepdims=True))


def primal_value(q: np.ndarray) -> float:
    """E_q[r] - beta KL(q || pi_ref), averaged over prompts."""
    return float(np.mean(np.sum(q * (REWARD - BETA * (np.log(np.maximum(q, 1e-300)) - LOGREF)), axis=1)))


def scipy_dual(b) -> np.ndarray:
    """argmin_{lam >= 0} beta mean_i log E_ref exp((r + lam . g) / beta) - lam . b, by L-BFGS-B."""
    b = np.asarray(b)

    def dual(lam):
        x = LOGREF + (REWARD + SAFETY @ lam) / BETA
        return BETA * np.mean(logsumexp(x, axis=1)) - lam @ b, np.einsum("pr,prm->m", optimum(lam), SAFETY) / len(PROMPTS) - b

    res = minimize(dual, np.ones(2), jac=True, method="L-BFGS-B", bounds=[(0, None)] * 2,
                   options={"ftol": 1e-15, "gtol": 1e-11, "maxiter": 1000})  # fmt: skip
    return res.x


def scipy_primal(b) -> tuple[np.ndarray, np.ndarray]:
    """The constrained optimum found directly in the space of distributions by SLSQP (each
    distribution a softmax of free logits). The world's prompts are of two kinds (risky or not)
    with one reference and one score table each, so the problem is solved over those two
    distributions [2, 64], weighted by how many prompts each has. Returns (q [P, 64], SLSQP's
    multipliers of the two constraints)."""
    kinds = [np.array([W.RISKY in p.split() for p in PROMPTS]) == k for k in (False, True)]
    first = [int(np.argmax(k)) for k in kinds]
    share = np.array([k.mean() for k in kinds])[:, None]
    logref, r, g = LOGREF[first], REWARD[first], SAFETY[first]

    def dist(x):
        logq = x.reshape(2, -1) - logsumexp(x.reshape(2, -1), axis=1, keepdims=True)
        return np.exp(logq), logq

    def through_softmax(q, f):  # d/dx of sum q f for q = softmax(x), per row
        return (share * q * (f - np.sum(q * f, axis=1, keepdims=True))).ravel()

    def objective(x):
        q, logq = dist(x)
        value = np.sum(share * q * (r - BETA * (logq - logref)))
        return -value, -through_softmax(q, r - BETA * (logq - logref))  # sum q d(log q) = 0 drops out

    cons = [{"type": "ineq", "fun": lambda x, j=j: np.sum(share * dist(x)[0] * g[..., j]) - b[j],
             "jac": lambda x, j=j: through_softmax(dist(x)[0], g[..., j])} for j in range(2)]  # fmt: skip
    res = minimize(objective, logref.ravel(), jac=True, method="SLSQP", constraints=cons,
                   options={"ftol": 1e-14, "maxiter": 2000})  # fmt: skip
    assert res.success, res.message
    q = np.empty_like(LOGREF)
    for kind, row in zip(kinds, dist(res.x)[0]):
        q[kind] = row
    return q, np.asarray(res.multipliers)


@pytest.mark.parametrize("b", [BOTH, SLACK], ids=["both-bind", "one-slack"])
def test_two_constraint_optimum_meets_kkt_and_independent_optimisers(b):
    lam = exact_multiplier(enumerations(), b, BETA)
    opt = optimum_distribution(enumerations(), lam, BETA)["optimum"]
    achieved = np.array([lo for lo, hi in opt["safety"]])
    assert all(hi - lo < 1e-12 for lo, hi in opt["safety"])  # nothing unseen: exact
    gap = achieved - np.asarray(b)
    assert (gap >= -1e-8).all(), gap  # primal feasible at lambda*
    assert (np.abs(lam * gap) < 1e-8).all(), (lam, gap)  # complementary slackness
    if b == BOTH:
        assert (lam > 0.3).all() and (np.abs(gap) < 1e-8).all(), lam  # both active, both met exactly
    else:
        assert lam[0] > 0.3 and lam[1] == 0.0, lam  # exactly zero, not small
        assert gap[1] > 0.1  # engagement slack: pi_lambda* exceeds its bar
    np.testing.assert_allclose(lam, scipy_dual(b), atol=1e-5)  # the dual, solved independently
    q, (direct, multipliers) = optimum(lam), scipy_primal(b)  # the primal, solved directly
    np.testing.assert_allclose(multipliers, lam, atol=1e-5)  # its multipliers are lambda*
    assert abs(primal_value(q) - primal_value(direct)) < 1e-8, (primal_value(q), primal_value(direct))
    assert np.abs(q - direct).max() < 1e-5
    # no duality gap: the primal value of pi_lambda* equals the dual value at lambda*
    dual = BETA * np.mean(logsumexp(LOGREF + (REWARD + SAFETY @ lam) / BETA, axis=1)) - lam @ np.asarray(b)
    assert abs(primal_value(q) - dual) < 1e-8


def test_the_second_constraint_conflicts_with_the_first_and_reward_files_score_it():
    """Safety alone lowers engagement: pi_lambda for the first constraint alone misses the second's
    default bar, which is why both bind; the engagement reward file scores text like the world."""
    lam1 = exact_multiplier([Enumeration(e.logp, e.logp_ref, e.scores[:, :2], e.on_set, e.cut_logp, e.cut_logp_ref,
                                         e.cut_scores[:, :2], e.cut_tokens, e.token_scores[:, :2]) for e in enumerations()],
                            BOTH[:1], BETA)  # fmt: skip
    engagement = np.einsum("pr,pr->", optimum(np.r_[lam1, 0.0]), SAFETY[..., 1]) / len(PROMPTS)
    reference = np.einsum("pr,pr->", np.exp(LOGREF), SAFETY[..., 1]) / len(PROMPTS)
    assert engagement < reference < BOTH[1], (engagement, reference)
    assert SLACK[1] < engagement - 0.1  # the slack setting's bar sits well below it
    namespace: dict = {}
    exec(W.ENGAGEMENT_FILE, namespace)
    out = namespace["reward_func"](["q sorry tips tips"], ["q"], None)["rewards"]
    assert out == [pytest.approx(-1.0 + 2 * 0.6)]
    assert [name for name, _ in W.CONSTRAINT_FILES] == ["safety.py", "engagement.py"]
    with pytest.raises(ValueError, match="2 constraints"):
        W.score_table(PROMPTS, 3)


def test_whole_distribution_bounds_hold_with_two_constraints(models):
    """demo.whole with m = 2 (a tiny LM and a perturbed copy, random token values for r, g_1, g_2):
    a full enumeration gives the directly computed values, pruned ones bracket them."""
    policy, ref, eos, values, heads = models
    values = np.c_[values, np.random.default_rng(1).normal(size=len(values))]  # [V, 3]
    lam = np.array([0.8, 0.4])
    full = tree_enumerations(grow([policy, ref], heads, eos, 0.0, values), values, eos)
    truth = {"kl": [], "kl_ref": [], "g": [], "opt_g": []}
    for e in full:
        p, r = np.exp(e.logp), np.exp(e.logp_ref)
        q = r * np.exp((e.scores[:, 0] + e.scores[:, 1:] @ lam) / BETA)
        q /= q.sum()
        truth["kl"].append(np.sum(p * np.log(p / q)))
        truth["kl_ref"].append(np.sum(r * np.log(r / q)))
        truth["g"].append(p @ e.scores[:, 1:])
        truth["opt_g"].append(q @ e.scores[:, 1:])
    truth = {k: np.mean(v, axis=0) for k, v in truth.items()}
    bound = -log_prob_floor(ref)

    def pairs(w):
        return [(w["kl_to_optimum"], truth["kl"]), (w["kl_ref_to_optimum"], truth["kl_ref"])] + [
            (w["policy"]["safety"][j], truth["g"][j]) for j in range(2)] + [
            (w["optimum"]["safety"][j], truth["opt_g"][j]) for j in range(2)]  # fmt: skip

    for got, want in pairs(whole_distribution(full, optimum_distribution(full, lam, BETA), lam, BETA, bound)):
        np.testing.assert_allclose(got, [want, want], rtol=1e-9, atol=1e-12)  # nothing unseen: no width
    assert truth["kl"] > 0.05 and abs(truth["g"][0] - truth["g"][1]) > 0.01  # two different constraints
    ref_part = tree_enumerations(grow([ref], heads, eos, 1e-3, values), values, eos)
    both = tree_enumerations(grow([policy, ref], heads, eos, 1e-3, values), values, eos)
    for (lo, hi), want in pairs(whole_distribution(both, optimum_distribution(ref_part, lam, BETA), lam, BETA, bound)):
        assert lo - 1e-12 <= want <= hi + 1e-12 and hi > lo, (lo, want, hi)


def colour_pixels(path: Path, colour: str, tol: float = 0.02) -> int:
    """How many pixels of the PNG at `path` have matplotlib colour `colour`."""
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    px = imread(str(path))[..., :3]
    return int(np.sum(np.all(np.abs(px - np.array(to_rgb(colour))) < tol, axis=-1)))


def test_two_constraint_picture_has_both_thresholds_and_every_point(tmp_path):
    """demo.pictures.plot_constraints on a report of the demo's shape: a 7.5 x 5 inch figure at
    110 dpi with both threshold lines (darkorange: one full height, one full width) and the
    reference, optimum and trained markers in their colours."""
    from matplotlib.image import imread

    from openrlhf_dual.demo.pictures import plot_constraints

    def part(s1, s2, r):
        return {"safety": [[s1 - 0.01, s1 + 0.01], [s2 - 0.02, s2 + 0.02]], "reward": [r - 0.01, r + 0.01]}

    report = {
        "thresholds": list(BOTH), "predicted": {"safety": [0.52, 1.01], "reward": 0.3},
        "whole": {"reference": part(-0.2, 0.8, 0.5), "optimum": {"lambda": [0.9, 0.4], **part(0.5, 1.0, 0.31)},
                  "achieved": part(0.49, 0.97, 0.32)},
    }  # fmt: skip
    path = tmp_path / "constraints.png"
    plot_constraints(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(str(path)).shape[:2] == (550, 825)
    assert colour_pixels(path, "darkorange") > 500  # two threshold lines across the axes
    for colour in ("crimson", "forestgreen", "C0"):  # reference, optimum, trained
        assert colour_pixels(path, colour) > 40, colour


def run_demo(out: Path, seed: int, thresholds) -> tuple[dict, str]:
    """`python -m openrlhf_dual.demo --constraints 2` (MoCAN, weighted likelihood) into out;
    (report, stdout)."""
    proc = subprocess.run(
        [sys.executable, "-m", "openrlhf_dual.demo", "--out", str(out), "--seed", str(seed), "--constraints", "2",
         "--dual.threshold", *map(str, thresholds)],
        env=cpu_env(), capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "report.json").read_text()), proc.stdout


def assert_meets_both(report: dict, thresholds) -> None:
    """The acceptance, on the whole distribution: each constraint met within 10% of its gap
    b_j - E_ref[g_j] (exactly met where the reference already meets it), lower bounds of the
    achieved values against upper bounds of the reference's; KL(trained || optimum) <= 0.05
    KL(reference || optimum) (upper bound against lower bound); pi_lambda* itself meets each
    active constraint with equality and each slack one strictly."""
    w = report["whole"]
    got, opt, ref = w["achieved"], w["optimum"], w["reference"]
    assert report["thresholds"] == list(thresholds) and len(report["lambda"]) == len(opt["lambda"]) == 2
    assert max(w["unseen"].values()) < 1e-3  # the enumeration reached all but a sliver, bounded below
    for j, b in enumerate(thresholds):
        assert b < report["reachable_safety"][j]
        if opt["lambda"][j] > 0:
            assert opt["safety"][j][0] - 1e-3 <= b <= opt["safety"][j][1] + 1e-3, (j, opt["safety"][j])
        else:
            assert opt["safety"][j][0] > b, (j, opt["safety"][j])
        gap = max(b - ref["safety"][j][1], 0.0)
        assert got["safety"][j][0] >= b - 0.1 * gap, (j, got["safety"][j], b, gap)
    assert w["kl_to_optimum"][1] <= 0.05 * w["kl_ref_to_optimum"][0], (w["kl_to_optimum"], w["kl_ref_to_optimum"])


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """Demo outputs by (seed, thresholds), run on first use."""
    root, done = tmp_path_factory.mktemp("demo2"), {}

    def get(seed: int, thresholds) -> tuple[dict, str, Path]:
        if (seed, thresholds) not in done:
            out = root / f"seed{seed}-{len(done)}"
            done[seed, thresholds] = (*run_demo(out, seed, thresholds), out)
        return done[seed, thresholds]

    return get


@pytest.mark.slow
@pytest.mark.timeout(1800)  # pyproject's 900 s would cut the demo's own subprocess timeout short
@pytest.mark.parametrize("seed", [0, 1])
def test_two_binding_constraints_are_met_on_the_whole_distribution(seed, demos):
    report, stdout, _ = demos(seed, BOTH)
    exact, ref = report["whole"]["optimum"]["lambda"], report["whole"]["reference"]["safety"]
    assert min(exact) > 0.3, exact  # both bind
    assert all(hi < b for (lo, hi), b in zip(ref, BOTH))  # the reference misses both
    for lam, se, want in zip(report["lambda"], report["lambda_stderr"], exact):  # from prepare's samples
        assert abs(lam - want) <= 3 * se and se < 0.1 * want, (report["lambda"], report["lambda_stderr"], exact)
    assert_meets_both(report, BOTH)
    assert "engagement reference" in stdout and "KL(trained || optimum)" in stdout and "constraints.png" in stdout


@pytest.mark.slow
@pytest.mark.timeout(1800)  # pyproject's 900 s would cut the demo's own subprocess timeout short
def test_one_slack_one_active_constraint(demos):
    """Engagement's bar below what pi_lambda* for safety alone gives: lambda_2 = 0 exactly, in the
    whole-distribution optimum and in the dual of prepare's samples, and the trained policy
    meets both (training lowers engagement, so the slack one is checked too)."""
    report, _, _ = demos(0, SLACK)
    exact = report["whole"]["optimum"]["lambda"]
    assert exact[1] == 0.0 and report["lambda"][1] == 0.0 and exact[0] > 0.3, (exact, report["lambda"])
    assert report["whole"]["achieved"]["safety"][1][1] < report["whole"]["reference"]["safety"][1][0]  # it moved
    assert_meets_both(report, SLACK)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # pyproject's 900 s would cut the demo's own subprocess timeout short
def test_evaluate_reads_both_constraints_and_brackets_the_exact_values(demos, tmp_path):
    """openrlhf_dual.cli.evaluate on the two-constraint prep directory: one verdict per constraint,
    and its sampled intervals of reward, each E[g_j] and KL contain the exact whole-distribution
    values of the trained policy."""
    report, _, out = demos(1, BOTH)
    proc = subprocess.run(
        [sys.executable, "-m", "openrlhf_dual.cli.evaluate", "--dual.prep_dir", str(out / "prep"),
         "--eval.policy", f"mocan={out / 'mocan'}", "--eval.out", str(tmp_path / "eval"),
         "--data.prompt_dataset", str(out / "data" / "prompts.jsonl"), "--data.max_samples", "32",
         "--rollout.n_samples_per_prompt", "16"],
        env=cpu_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads((tmp_path / "eval" / "report.json").read_text())["policies"]["mocan"]
    assert [c["threshold"] for c in got["constraints"]] == list(BOTH)
    exact = report["whole"]["achieved"]
    pairs = [(got["reward"], exact["reward"]), (got["kl"], exact["kl"])]
    pairs += [(got["safety"][j], exact["safety"][j]) for j in range(2)]
    for est, (lo, hi) in pairs:
        assert est["lo"] <= hi and lo <= est["hi"], (est, lo, hi)
    assert got["safety"][1]["mean"] > json.loads((out / "prep" / "dual.json").read_text())["reference"]["safety"][1]
