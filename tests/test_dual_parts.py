"""The dual's parts against formulas written out independently: D, its derivatives and pi_lambda's
predictions at any lambda, the solvers from far starts, the frontier's and solution's records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import logsumexp, softmax

from openrlhf_dual.dual import frontier, predict, solve_dual
from openrlhf_dual.dual.objective import OneConstraint, dual_value, evaluate, log_weights
from openrlhf_dual.dual.uncertainty import bootstrap_stderr


def instance(n=50, k=16, m=2, seed=0):
    rng = np.random.default_rng(seed)
    reward = rng.normal(0, 1, (n, k)) + rng.normal(0, 0.5, (n, 1))
    return reward, -0.6 * reward[..., None] + rng.normal(0, 1, (n, k, m))


def by_hand(reward, safety, lam, beta, b):
    """D(lam), E_w[g] per prompt, Hessian, reward and KL of pi_lambda on the samples."""
    n, k, _ = safety.shape
    z = (reward + safety @ lam) / beta
    w = softmax(z, axis=1)
    value = beta * np.mean(logsumexp(z, axis=1) - np.log(k)) - lam @ b
    per = np.einsum("nk,nkm->nm", w, safety)
    centred = safety - per[:, None, :]
    hess = np.einsum("nk,nkj,nkl->jl", w, centred, centred) / (n * beta)
    kl = np.mean(np.sum(w * np.log(k * w), axis=1))
    return value, per, hess, float(np.mean(np.sum(w * reward, axis=1))), kl


@pytest.mark.parametrize("m", [1, 2])
def test_evaluate_and_dual_value_match_the_formulas(m):
    reward, safety = instance(m=m)
    lam, b, beta = np.array([0.7, 0.2])[:m], np.array([0.1, -0.3])[:m], 0.4
    value, per, hess, rew, kl = by_hand(reward, safety, lam, beta, b)
    ev = evaluate(reward, safety, lam, beta, b)
    assert ev.value == pytest.approx(value, rel=1e-12) and dual_value(reward, safety, lam, beta, b) == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(ev.per_prompt_safety, per, rtol=1e-12)
    np.testing.assert_allclose(ev.safety, per.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(ev.hess, hess, rtol=1e-10)
    assert ev.reward == pytest.approx(rew, rel=1e-12) and ev.kl == pytest.approx(kl, rel=1e-10)
    # the gradient of D is E[g] - b: central differences of the formula
    for j in range(m):
        e = np.eye(m)[j] * 1e-6
        fd = (by_hand(reward, safety, lam + e, beta, b)[0] - by_hand(reward, safety, lam - e, beta, b)[0]) / 2e-6
        assert ev.safety[j] - b[j] == pytest.approx(fd, rel=1e-6)


def test_one_constraint_derivatives_match_the_formulas():
    reward, safety = instance(m=1)
    beta, b, lam = 0.3, 0.2, 0.8
    f = OneConstraint(reward, safety, beta)
    g, h, t, ev = f.derivatives(lam, b)
    _, per, hess, rew, kl = by_hand(reward, safety, np.array([lam]), beta, np.array([b]))
    assert g == pytest.approx(per.mean() - b, rel=1e-12) and h == pytest.approx(hess[0, 0], rel=1e-10)
    np.testing.assert_allclose(ev.per_prompt_safety[:, 0], per[:, 0], rtol=1e-12)
    assert ev.reward == pytest.approx(rew, rel=1e-12) and ev.kl == pytest.approx(kl, rel=1e-10)
    assert ev.hess[0, 0] == pytest.approx(h) and ev.safety[0] == pytest.approx(per.mean())
    assert isinstance(ev.value, float) and np.isnan(ev.value)  # not computed on this path
    # the third derivative: central differences of the Hessian
    hp = by_hand(reward, safety, np.array([lam + 1e-5]), beta, np.array([b]))[2][0, 0]
    hm = by_hand(reward, safety, np.array([lam - 1e-5]), beta, np.array([b]))[2][0, 0]
    assert t == pytest.approx((hp - hm) / 2e-5, rel=1e-5)


def test_predict_matches_the_formulas_in_float64_whatever_it_is_given():
    reward, safety = instance(m=1)
    _, per, _, rew, kl = by_hand(reward, safety, np.array([0.5]), 0.25, np.zeros(1))
    p = predict(reward.astype(np.float32), safety[..., 0].astype(np.float32), np.float32(0.5), 0.25)
    q = predict(reward.astype(np.float32).astype(np.float64), safety[..., 0].astype(np.float32).astype(np.float64), 0.5, 0.25)
    assert p["reward"] == q["reward"] and p["kl"] == q["kl"] and np.array_equal(p["safety"], q["safety"])
    p = predict(reward, safety, [0.5], 0.25)
    assert p["reward"] == pytest.approx(rew, rel=1e-12) and p["kl"] == pytest.approx(kl, rel=1e-10)
    assert p["safety"] == pytest.approx(per.mean(axis=0), rel=1e-12)


@pytest.mark.parametrize("m, lam0", [(1, [60.0]), (2, [40.0, 40.0]), (2, [0.0, 25.0])])
def test_far_starts_land_on_the_same_lambda(m, lam0):
    """Warm starts far from lambda* (the projected Newton line search must backtrack; the 1-D
    bracket must bisect) land where the cold start does, in few iterations."""
    reward, safety = instance(n=200, m=m, seed=3)
    b = safety.mean(axis=(0, 1)) + np.array([0.4, 0.3])[:m]
    cold = solve_dual(reward, safety, b, 0.5)
    warm = solve_dual(reward, safety, b, 0.5, lam0=np.array(lam0))
    np.testing.assert_allclose(warm.lam, cold.lam, rtol=1e-8)
    assert cold.kkt_residual <= 1e-10 and warm.kkt_residual <= 1e-10
    assert cold.iterations <= 12 and warm.iterations <= 60, (cold.iterations, warm.iterations)


def test_large_n_solution_matches_a_direct_bracket():
    """N > 1024 (the solver warm-starts from a strided subset): still the exact root."""
    from scipy.optimize import brentq

    reward, safety = instance(n=3000, k=8, m=1, seed=5)
    b = float(safety.mean()) + 0.3
    sol = solve_dual(reward, safety, b, 0.5)
    root = brentq(lambda x: by_hand(reward, safety, np.array([x]), 0.5, np.array([b]))[1].mean() - b, 0, 50, xtol=1e-14)
    assert sol.lam[0] == pytest.approx(root, rel=1e-9)


def test_solution_record_is_plain_json():
    reward, safety = instance(m=2)
    b = safety.mean(axis=(0, 1)) + np.array([0.3, -5.0])
    sol = solve_dual(reward, safety, b, 0.5)
    d = json.loads(json.dumps(sol.to_dict()))
    assert d["lam"] == sol.lam.tolist() and d["feasible"] is True and d["form"] == "model"
    assert d["predicted"]["safety"] == sol.predicted["safety"].tolist() and d["predicted"]["kl"] == sol.predicted["kl"]
    assert d["reference"]["safety"] == sol.reference["safety"].tolist() and d["thresholds"] == b.tolist()
    assert (d["n_prompts"], d["n_samples"], d["beta"]) == (50, 16, 0.5)
    bad = solve_dual(reward, safety, [100.0, 100.0], 0.5).to_dict()
    assert bad["lam"] == [None, None] and bad["predicted"]["safety"] == [None, None] and bad["bootstrap_stderr"] is None


def test_frontier_record_and_lookup():
    reward, safety = instance(m=1, seed=4)
    curve = frontier(reward, safety[..., 0], 0.5, num=30)
    d = curve.to_dict()
    assert d["lam"] == curve.lam.tolist() and d["threshold"] == curve.safety.tolist()
    assert d["reward"] == curve.reward.tolist() and d["kl"] == curve.kl.tolist()
    assert d["reachable"] == curve.reachable and d["reference"] == {"reward": reward.mean(), "safety": safety.mean()}
    assert len(curve.lam) == 30 and curve.lam[1] == pytest.approx(curve.lam[-1] * 1e-4)
    mid = float(curve.safety[15])
    assert curve.lam_for(mid) == pytest.approx(curve.lam[15], rel=1e-12)
    assert curve.lam_for(float(curve.safety[0])) == 0.0 and curve.lam_for(float(curve.safety[-1])) == curve.lam[-1]
    for outside in (curve.safety[0] - 1e-9, curve.safety[-1] + 1e-9):
        with pytest.raises(ValueError, match=f"threshold {outside} outside the frontier"):
            curve.lam_for(float(outside))
    with pytest.raises(ValueError, match="the frontier is for one constraint, got 2"):
        frontier(reward, safety[..., :1].repeat(2, axis=2), 0.5)
    # the grid stops at the first doubling that gets within gap of the reachable maximum
    top = curve.lam[-1]
    half = frontier(reward, safety[..., 0], 0.5, num=3)
    assert half.lam[-1] == top
    from openrlhf_dual.dual.objective import evaluate as ev

    target = curve.reachable - 1e-3 * (curve.reachable - curve.safety[0])
    s = safety[..., :1]
    assert ev(reward, s, np.array([top]), 0.5, np.zeros(1)).safety[0] >= target
    if top > 0.5 / safety.std():
        assert ev(reward, s, np.array([top / 2]), 0.5, np.zeros(1)).safety[0] < target


def test_log_weights_normalise_each_prompt_on_its_own_scale():
    """Prompts whose logits lie thousands of nats apart: each prompt's weights and log-normaliser
    are still exact (no prompt underflows against another's maximum)."""
    reward, safety = instance(n=3, k=5, m=2, seed=4)
    reward[1] += 3000.0
    reward[2] -= 3000.0
    lam, beta = np.array([0.3, 1.1]), 0.5
    log_w, log_mean = log_weights(reward, safety, lam, beta)
    z = (reward + safety @ lam) / beta
    np.testing.assert_allclose(log_w, z - logsumexp(z, axis=1, keepdims=True), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(log_mean, logsumexp(z, axis=1) - np.log(5), rtol=1e-12)


def test_bootstrap_stderr_is_the_std_of_the_refits_and_inf_where_one_is_unreachable():
    """Column 0: every refit finite, its std (ddof 1); column 1: one refit is inf, so inf, without
    numpy's invalid-value warning (the std of values with an inf)."""
    import warnings

    n, seen = 7, []

    def refit(idx):
        seen.append(idx)
        return np.array([idx.mean(), np.inf if len(seen) == 2 else 1.0])

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = bootstrap_stderr(n, refit, n_boot=5, seed=3)
    assert len(seen) == 5 and all(len(i) == n and i.min() >= 0 and i.max() < n for i in seen)
    assert out[0] == pytest.approx(np.std([i.mean() for i in seen], ddof=1), rel=1e-12) and out[1] == np.inf


def test_bootstrap_marks_exactly_unreachable_resamples_and_keeps_small_slacks():
    """A resample whose reachable maximum equals the threshold cannot satisfy it strictly: inf.
    Resamples that reach it by a small margin (< 1 score unit) are solved as usual."""
    rng = np.random.default_rng(0)
    reward, safety = rng.normal(size=(10, 4)), np.zeros((10, 4))
    safety[0, 0] = 10.0
    sol = solve_dual(reward, safety, 0.0, 1.0, bootstrap=30, seed=1)  # resamples without prompt 0 reach exactly 0
    assert sol.lam.tolist() == [0.0] and sol.bootstrap_stderr.tolist() == [np.inf]
    reward, safety = instance(n=100, m=1, seed=2)
    safety = 0.1 * safety  # every slack below 1
    b = float(safety.mean()) + 0.05
    sol = solve_dual(reward, safety, b, 0.5, bootstrap=20, seed=0)
    assert 0 < sol.bootstrap_stderr[0] < np.inf


@pytest.mark.parametrize("scale", [0.05, 20.0])
def test_frontier_grid_doubles_from_beta_over_the_spread(scale):
    """The grid's top is beta / sd(g) doubled until pi_lambda's safety is within gap (relative to
    the range from pi_0's safety) of the reachable maximum, whatever the score scale."""
    reward, safety = instance(m=1, seed=6)
    g = scale * safety[..., 0]
    curve = frontier(reward, g, 0.5)
    assert len(curve.lam) == 60  # the default num
    start = 0.5 / g.std()
    doublings = np.log2(curve.lam[-1] / start)
    assert doublings == pytest.approx(round(doublings), abs=1e-9) and round(doublings) >= 1
    target = curve.reachable - 1e-3 * (curve.reachable - curve.safety[0])
    before = predict(reward, g, curve.lam[-1] / 2, 0.5)["safety"][0]
    assert curve.safety[-1] >= target > before
    lo, hi = curve.safety[0], curve.safety[-1]
    with pytest.raises(ValueError, match=rf"outside the frontier \[{lo}, {hi}\]"):
        curve.lam_for(float(hi) + 1.0)
