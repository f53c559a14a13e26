"""The dual core against an independent optimiser, its KKT conditions, edge cases and errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import brentq, minimize
from scipy.special import logsumexp

from openrlhf_dual.dual import frontier, plot_frontier, predict, solve_dual


def instance(n=300, k=24, m=1, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    reward = rng.normal(0, 1, (n, k)) + rng.normal(0, 0.5, (n, 1))
    safety = -0.6 * reward[..., None] + rng.normal(0, 1, (n, k, m))
    return scale * reward, scale * safety


def independent_lambda(reward, safety, b, beta):
    """lambda* from scipy (SLSQP, then a polish on the active set) on an objective written
    separately with scipy.special.logsumexp."""
    n, k, m = safety.shape

    def dual(lam):
        return beta * np.mean(logsumexp((reward + safety @ lam) / beta, axis=1) - np.log(k)) - lam @ b

    def grad(lam):
        z = (reward + safety @ lam) / beta
        w = np.exp(z - logsumexp(z, axis=1, keepdims=True))
        return np.einsum("nk,nkm->m", w, safety) / n - b

    if m == 1:  # the 1-D KKT system: lam = 0 if grad(0) >= 0, else the root of grad
        return np.zeros(1) if grad(np.zeros(1))[0] >= 0 else np.array([brentq(lambda x: grad(np.array([x]))[0], 0, 1e3, xtol=1e-15, rtol=1e-15)])
    res = minimize(dual, np.ones(m), jac=grad, bounds=[(0, None)] * m, method="L-BFGS-B",
                   options={"ftol": 1e-15, "gtol": 1e-13, "maxiter": 10000})
    lam = res.x
    active = lam > 1e-6
    for _ in range(50):  # Newton polish on the active set with finite-difference-free Hessian
        z = (reward + safety @ lam) / beta
        w = np.exp(z - logsumexp(z, axis=1, keepdims=True))
        mean_g = np.einsum("nk,nkm->nm", w, safety)
        h = (np.einsum("nk,nkj,nkl->jl", w, safety, safety) - mean_g.T @ mean_g) / (n * beta)
        g = grad(lam)
        lam[active] -= np.linalg.solve(h[np.ix_(active, active)], g[active])
    lam[~active] = 0.0
    return lam


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lambda_matches_independent_optimiser(m, seed):
    reward, safety = instance(m=m, seed=seed)
    base = safety.mean(axis=(0, 1))
    b = base + np.array([0.5, -2.0, 0.3])[:m]  # constraint 2 is slack (below the unconstrained optimum)
    sol = solve_dual(reward, safety, b, 0.5)
    ref = independent_lambda(reward, safety, b, 0.5)
    assert sol.feasible
    assert np.allclose(sol.lam, ref, rtol=1e-8, atol=1e-10), (sol.lam, ref)
    assert sol.kkt_residual <= 1e-10
    grad = sol.predicted["safety"] - b
    assert np.all(grad >= -1e-10) and np.all(np.abs(sol.lam * grad) <= 1e-10)
    active = sol.lam > 0
    assert np.allclose(sol.predicted["safety"][active], b[active], atol=1e-8)
    if m >= 2:
        assert sol.lam[1] == 0.0  # slack: exactly zero


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_stable_at_any_beta_and_score_scale(beta, scale):
    reward, safety = instance(m=1, seed=3, scale=scale)
    b = safety.mean() + 0.3 * (safety.max(axis=1).mean() - safety.mean())
    sol = solve_dual(reward, safety, b, beta * scale)
    assert sol.feasible and np.all(np.isfinite(sol.lam))
    assert sol.kkt_residual <= 1e-10
    assert abs(sol.predicted["safety"][0] - b) <= 1e-8 * scale
    assert np.allclose(sol.lam, independent_lambda(reward, safety, np.array([b]), beta * scale), rtol=1e-8)
    # raw 1e4-magnitude scores with a small beta: logits of 1e6, still finite
    sol = solve_dual(reward * 1e4 / scale, safety * 1e4 / scale, b * 1e4 / scale, beta)
    assert sol.feasible and np.isfinite(sol.predicted["kl"]) and sol.kkt_residual <= 1e-10


def test_infeasible_threshold_reports_reachable_not_a_huge_lambda():
    reward, safety = instance(m=1)
    reachable = safety[..., 0].max(axis=1).mean()
    for b in (reachable + 0.1, reachable):  # beyond, and exactly at, the reachable maximum
        sol = solve_dual(reward, safety, b, 0.5)
        assert not sol.feasible and np.isinf(sol.lam).all()
        assert sol.reachable[0] == pytest.approx(reachable)
        assert np.isnan(sol.predicted["safety"]).all()


def test_jointly_unreachable_thresholds_are_infeasible():
    """Each constraint reachable alone, not both: g1 and g2 are never high in the same response."""
    rng = np.random.default_rng(0)
    one = rng.random((200, 16)) < 0.5
    safety = np.stack([one, ~one], axis=-1).astype(float)  # every response has g1 + g2 = 1
    reward = rng.normal(size=(200, 16))
    assert solve_dual(reward, safety, [0.6, 0.3], 1.0).feasible
    sol = solve_dual(reward, safety, [0.6, 0.6], 1.0)  # each <= 1 reachable, but g1 + g2 = 1
    assert not sol.feasible and np.allclose(sol.reachable, [1.0, 1.0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reward=np.full((4, 3), np.nan)), "reward has 12 non-finite"),
        (dict(safety=np.r_[np.inf, np.zeros(11)].reshape(4, 3)), "safety has 1 non-finite"),
        (dict(safety=np.zeros((4, 2))), "safety must be"),
        (dict(reward=np.zeros((4, 1)), safety=np.zeros((4, 1))), "at least 2 responses"),
        (dict(reward=np.zeros(4)), r"reward must be \[N prompts, K responses\], got shape \(4,\)"),
        (dict(beta=-1.0), "beta must be a positive"),
        (dict(beta=0.0), "beta must be a positive number, got 0.0"),
        (dict(thresholds=[0.0, 1.0]), "1 constraints but thresholds"),
        (dict(thresholds=float("nan")), "thresholds has 1 non-finite"),
        (dict(form="other"), "form must be"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, match):
    args = dict(reward=np.zeros((4, 3)), safety=np.zeros((4, 3)), thresholds=0.0, beta=1.0)
    args.update(kwargs)
    form = args.pop("form", "model")
    with pytest.raises(ValueError, match=match):
        solve_dual(args["reward"], args["safety"], args["thresholds"], args["beta"], form=form)


def test_torch_tensors_give_the_same_answer():
    torch = pytest.importorskip("torch")
    reward, safety = instance(m=2)
    b = safety.mean(axis=(0, 1)) + 0.2
    a = solve_dual(reward, safety, b, 0.5)
    t = solve_dual(torch.tensor(reward), torch.tensor(safety), torch.tensor(b), 0.5)
    assert np.array_equal(a.lam, t.lam)
    # scores straight from a model's forward pass still carry autograd
    g = solve_dual(torch.tensor(reward, requires_grad=True), torch.tensor(safety), b, 0.5)
    assert np.array_equal(a.lam, g.lam)


@pytest.mark.parametrize("m", [1, 2])
def test_float32_and_int_scores_are_solved_in_float64(m):
    """Scores as a model or a grader hands them over: the answer is the float64 answer, bit for bit."""
    reward, safety = instance(n=100, k=8, m=m, seed=7)
    reward32, safety32 = reward.astype(np.float32), safety.astype(np.float32)
    b = (safety32.mean(axis=(0, 1)) + np.array([0.3, 0.2])[:m]).astype(np.float32)
    as32 = solve_dual(reward32, safety32, b, 0.5)
    as64 = solve_dual(reward32.astype(np.float64), safety32.astype(np.float64), b.astype(np.float64), 0.5)
    assert as32.lam.dtype == np.float64 and np.array_equal(as32.lam, as64.lam)
    assert np.array_equal(as32.reachable, as64.reachable) and np.array_equal(as32.stderr, as64.stderr)
    assert as32.predicted["reward"] == as64.predicted["reward"] and as32.predicted["kl"] == as64.predicted["kl"]
    ints = solve_dual(np.round(reward * 3).astype(int), np.round(safety * 3).astype(int), 3 * b.astype(np.float64), 0.5)
    ref = solve_dual(np.round(reward * 3), np.round(safety * 3), 3 * b.astype(np.float64), 0.5)
    assert np.array_equal(ints.lam, ref.lam) and np.array_equal(ints.reachable, ref.reachable)


def test_margin_form_solves_the_margin_constraint_by_its_definition():
    """PeCAN's dual from its definition, not from the code's transform: pi_lambda reweights each
    prompt's samples by softmax_k(s_r + lambda s_g) (pi_ref exp((r + lambda g) / beta), r = beta s_r,
    g = beta s_g), and lambda* is where the margin E_pi[g] - E_ref[g] (E_ref: the sample mean)
    equals b, found by bracketing. Predictions are checked on the same weights."""
    rng = np.random.default_rng(5)
    s_r = rng.normal(size=(100, 12))
    s_g = rng.normal(size=(100, 12)) - 0.3 * s_r  # safety at odds with helpfulness
    beta, b = 0.2, 0.05

    def weights(lam):
        z = s_r + lam * s_g
        w = np.exp(z - z.max(axis=1, keepdims=True))
        return w / w.sum(axis=1, keepdims=True)

    def margin(lam):
        return float(np.mean(np.sum(weights(lam) * beta * s_g, axis=1) - beta * s_g.mean(axis=1)))

    assert margin(0.0) < b  # active: lambda* > 0
    lam = brentq(lambda x: margin(x) - b, 0.0, 100.0, xtol=1e-14, rtol=1e-14)
    sol = solve_dual(s_r, s_g, b, beta, form="margin")
    assert sol.feasible and sol.form == "margin"
    assert sol.lam[0] == pytest.approx(lam, rel=1e-9)
    w = weights(lam)
    assert sol.predicted["safety"][0] == pytest.approx(b, abs=1e-10)
    kl = np.mean(np.sum(w * np.log(w * s_r.shape[1]), axis=1))  # KL(pi_lambda || pi_ref) on the samples, nats
    assert sol.predicted["kl"] == pytest.approx(kl, rel=1e-8)
    # reward in beta x log-ratio units, up to the prompt constant: E_pi[beta s_r] - E_ref[beta s_r]
    assert sol.predicted["reward"] - sol.reference["reward"] == pytest.approx(
        np.mean(np.sum(w * beta * s_r, axis=1)) - beta * s_r.mean(), rel=1e-8)
    assert sol.reference["safety"][0] == pytest.approx(0.0, abs=1e-12)  # the reference's margin
    reach = np.mean(beta * (s_g.max(axis=1) - s_g.mean(axis=1)))
    assert sol.reachable[0] == pytest.approx(reach, rel=1e-12)
    assert not solve_dual(s_r, s_g, reach + 1e-6, beta, form="margin").feasible
    shifted = solve_dual(s_r, s_g + rng.normal(size=(100, 1)) * 5, b, beta, form="margin")  # prompt constants
    assert np.allclose(sol.lam, shifted.lam, rtol=1e-10)
    # each prompt's own reference term is inside its gradient: prompt constants leave the error too
    assert np.allclose(sol.stderr, shifted.stderr, rtol=1e-8)


def test_predict_matches_solution_and_lambda_zero_is_the_reference():
    reward, safety = instance(m=1)
    sol = solve_dual(reward, safety, safety.mean() + 0.4, 0.5)
    p = predict(reward, safety[..., 0], sol.lam, 0.5)
    assert p["safety"][0] == pytest.approx(sol.predicted["safety"][0], abs=1e-12)
    p0 = predict(reward, safety, [0.0], 0.5)
    assert p0["safety"][0] != pytest.approx(safety.mean())  # pi_0 tilts towards reward already
    uniform = predict(np.zeros_like(reward), safety, [0.0], 0.5)
    assert uniform["safety"][0] == pytest.approx(safety.mean()) and uniform["kl"] == pytest.approx(0.0, abs=1e-12)


def test_frontier_is_monotone_and_each_point_is_a_solution(tmp_path):
    reward, safety = instance(m=1, seed=4)
    curve = frontier(reward, safety[..., 0], 0.5)
    assert np.all(np.diff(curve.safety) >= -1e-12) and np.all(np.diff(curve.reward) <= 1e-12)
    assert curve.lam[0] == 0.0 and curve.safety[-1] <= curve.reachable
    assert curve.reachable - curve.safety[-1] <= 1e-3 * (curve.reachable - curve.safety[0]) + 1e-12
    for i in (10, 30, 50):
        sol = solve_dual(reward, safety, curve.safety[i], 0.5)
        assert sol.lam[0] == pytest.approx(curve.lam[i], rel=1e-6)
        assert sol.predicted["kl"] == pytest.approx(curve.kl[i], rel=1e-6)
    path = tmp_path / "frontier.png"
    plot_frontier(curve, path, threshold=float(curve.safety[30]))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_standard_errors_are_calibrated():
    """Sandwich and bootstrap errors of lambda* match the spread of lambda* over independent
    samples, and 95% intervals cover the population lambda* (N -> infinity at the same K)."""
    b, beta, k = 0.1, 0.5, 16

    def draw(n, seed):
        rng = np.random.default_rng(seed)
        reward = rng.normal(0, 1, (n, k)) + rng.normal(0, 0.5, (n, 1))
        return reward, -0.6 * reward + rng.normal(0, 1, (n, k)) + rng.normal(0, 0.3, (n, 1))

    truth = solve_dual(*draw(200_000, 999), b, beta).lam[0]
    sols = [solve_dual(*draw(400, s), b, beta) for s in range(300)]
    lams = np.array([s.lam[0] for s in sols])
    ses = np.array([s.stderr[0] for s in sols])
    assert abs(ses.mean() / lams.std(ddof=1) - 1) < 0.15
    coverage = np.mean(np.abs(lams - truth) <= 1.96 * ses)
    assert 0.9 <= coverage <= 0.99, coverage
    boot = [solve_dual(*draw(400, s), b, beta, bootstrap=200, seed=s) for s in range(5)]
    ratio = np.mean([x.bootstrap_stderr[0] / x.stderr[0] for x in boot])
    assert abs(ratio - 1) < 0.2, ratio


def test_slack_constraint_has_zero_error():
    reward, safety = instance(m=2)
    sol = solve_dual(reward, safety, safety.mean(axis=(0, 1)) + np.array([0.4, -3.0]), 0.5)
    assert sol.lam[1] == 0.0 and sol.stderr[1] == 0.0 and sol.stderr[0] > 0


def test_min_effective_samples_flags_a_prompt_carried_by_one_sample():
    rng = np.random.default_rng(0)
    reward, safety = rng.normal(size=(20, 64)), rng.normal(size=(20, 64))
    calm = solve_dual(reward, safety, 0.8, beta=1.0)
    assert 3 < calm.min_effective_samples <= 64
    reward[3, 7] = 40.0  # one extrapolated score: that sample alone carries prompt 3
    spiked = solve_dual(reward, safety, 0.8, beta=1.0)
    assert spiked.min_effective_samples < 1.5
    assert np.isnan(solve_dual(reward, safety, 1e3, beta=1.0).min_effective_samples)


def test_bootstrap_error_is_inf_when_some_resample_cannot_reach_the_threshold():
    """Only prompt 0 has a safe sample: the threshold is reachable on the data, but not on a
    resample that leaves prompt 0 out (about 1 in 3); lambda* is then unstable, reported as inf.
    Without such resamples the error is the spread of the resamples' lambda*."""
    rng = np.random.default_rng(0)
    reward, safety = rng.normal(size=(10, 4)), np.zeros((10, 4))
    safety[0, 0] = 10.0  # reachable: 10 / 10 prompts = 1.0
    sol = solve_dual(reward, safety, 0.5, 1.0, bootstrap=50, seed=0)
    assert sol.feasible and np.isfinite(sol.lam).all()
    assert sol.bootstrap_stderr.tolist() == [np.inf]
    assert sol.to_dict()["bootstrap_stderr"] == [None]
    reward, safety = instance(n=200, m=2, seed=1)
    b = safety.mean(axis=(0, 1)) + np.array([0.3, -3.0])  # constraint 1 slack
    sol = solve_dual(reward, safety, b, 0.5, bootstrap=40, seed=2)
    draws = []
    for idx in np.random.default_rng(2).integers(0, 200, (40, 200)):
        draws.append(solve_dual(reward[idx], safety[idx], b, 0.5).lam)
    np.testing.assert_allclose(sol.bootstrap_stderr, np.std(draws, axis=0, ddof=1), rtol=1e-6, atol=1e-12)
    assert sol.bootstrap_stderr[0] > 0 and sol.bootstrap_stderr[1] == 0.0


@pytest.mark.parametrize("m, scale", [(1, 1.0), (1, 0.3), (2, 1.0), (2, 0.3)])
def test_iterations_count_the_steps_and_max_iter_caps_them(m, scale):
    """`iterations` is the first step count at which the scaled KKT residual meets tol: a cap one
    below it stops short (and says so in kkt_residual, max_j |min(lam_j, grad_j)| / max(1, max|g|)),
    a cap at it lands on the same lambda*."""
    reward, safety = instance(m=m, scale=scale)
    b = safety.mean(axis=(0, 1)) + scale * np.array([0.5, 0.3])[:m]
    sol = solve_dual(reward, safety, b, 0.5)
    n = sol.iterations
    assert 2 <= n <= 8 and sol.kkt_residual <= 1e-10
    scale_g = max(1.0, np.abs(safety).max())
    for cap in range(n):
        short = solve_dual(reward, safety, b, 0.5, max_iter=cap)
        assert short.iterations == cap
        kkt = np.max(np.abs(np.minimum(short.lam, short.predicted["safety"] - b))) / scale_g
        assert short.kkt_residual == pytest.approx(kkt, rel=1e-12) and short.kkt_residual > 1e-10
    again = solve_dual(reward, safety, b, 0.5, max_iter=n)
    assert again.iterations == n and np.array_equal(again.lam, sol.lam)


@pytest.mark.parametrize("m", [1, 2])
def test_a_warm_start_at_lambda_star_takes_no_step(m):
    """lam0 is where the solver starts: at lambda* itself (one constraint active below 1, one slack
    at 0; as an array, a list, a [1, m] row, a number), it stops at once; a negative lam0 is
    clipped to 0, the cold start."""
    reward, safety = instance(m=m, seed=1)
    b = safety.mean(axis=(0, 1)) + np.array([0.2, -2.0])[:m]
    cold = solve_dual(reward, safety, b, 0.5)
    assert 0 < cold.lam[0] < 1 and cold.iterations >= 2
    starts = [cold.lam, cold.lam.tolist(), cold.lam[None, :]] + ([float(cold.lam[0]), np.float64(cold.lam[0])] if m == 1 else [])
    for lam0 in starts:
        warm = solve_dual(reward, safety, b, 0.5, lam0=lam0)
        assert warm.iterations == 0 and np.array_equal(warm.lam, cold.lam) and warm.lam.dtype == np.float64
    clipped = solve_dual(reward, safety, b, 0.5, lam0=-np.ones(m))
    assert clipped.iterations == cold.iterations and np.array_equal(clipped.lam, cold.lam)
    slack = solve_dual(reward, safety, b - 5.0, 0.5, lam0=np.zeros(m, np.float32))  # a float32 start
    assert slack.iterations == 0 and slack.lam.tolist() == [0.0] * m and slack.lam.dtype == np.float64


@pytest.mark.parametrize("m, lam0", [(1, [0.3, 0.5]), (2, 0.3), (2, [0.1, 0.2, 0.3]), (1, float("nan")), (2, [0.1, np.inf])])
def test_a_warm_start_of_the_wrong_length_or_not_finite_is_refused(m, lam0):
    """Not silently truncated (its first value used), broadcast or run from NaN: a clear error."""
    reward, safety = instance(m=m, seed=1)
    with pytest.raises(ValueError, match=f"lam0 must be {m} finite value"):
        solve_dual(reward, safety, safety.mean(axis=(0, 1)), 0.5, lam0=lam0)


def test_slack_constraints_stop_at_zero_at_once():
    """A threshold pi_0 already meets: lambda* = 0 exactly after no step, for a gradient below 1
    too; with tol = 0 the same holds for a threshold pi_0 meets with equality."""
    reward, safety = instance(m=2, seed=2)
    at_zero = solve_dual(reward, safety[..., :1], -1e3, 0.5).predicted["safety"][0]  # pi_0's safety
    for b, tol in ((at_zero - 0.3, 1e-10), (at_zero, 0.0)):
        sol = solve_dual(reward, safety[..., :1], b, 0.5, tol=tol)
        assert sol.lam.tolist() == [0.0] and sol.iterations == 0 and sol.kkt_residual == 0.0
        assert sol.stderr.tolist() == [0.0]
    # two constraints, the second slack at lambda* by 0.3 (< 1): exactly 0, the first as if alone
    alone = solve_dual(reward, safety[..., :1], safety[..., 0].mean() + 0.5, 0.5)
    from openrlhf_dual.dual import predict as predict_at

    g2 = predict_at(reward, safety, [alone.lam[0], 0.0], 0.5)["safety"][1]
    b = np.array([safety[..., 0].mean() + 0.5, g2 - 0.3])
    both = solve_dual(reward, safety, b, 0.5)
    assert both.lam[1] == 0.0 and both.kkt_residual <= 1e-10
    assert both.lam[0] == pytest.approx(alone.lam[0], rel=1e-9)
    assert both.predicted["safety"][1] - b[1] == pytest.approx(0.3, rel=1e-6)


@pytest.mark.parametrize("m", [1, 2])
def test_tol_zero_runs_to_machine_precision(m):
    """tol = 0: the solver goes on until no representable progress is left (several constraints)
    or the cap (one: bisection between two neighbours), and the answer is the tol = 1e-10 one."""
    reward, safety = instance(m=m)
    b = safety.mean(axis=(0, 1)) + np.array([0.5, 0.3])[:m]
    sol = solve_dual(reward, safety, b, 0.5)
    exact = solve_dual(reward, safety, b, 0.5, tol=0.0)
    assert exact.kkt_residual <= 1e-15
    assert exact.iterations == 100 if m == 1 else sol.iterations < exact.iterations < 20
    assert np.allclose(exact.lam, sol.lam, rtol=1e-9)


def test_two_responses_per_prompt_are_enough():
    reward, safety = instance(n=400, k=2, m=1, seed=6)
    b = safety.mean() + 0.2
    sol = solve_dual(reward, safety, b, 0.5)
    assert sol.feasible and sol.n_samples == 2
    assert np.allclose(sol.lam, independent_lambda(reward, safety, np.array([b]), 0.5), rtol=1e-8)


def test_infeasible_record_is_complete():
    reward, safety = instance(m=2)
    sol = solve_dual(reward, safety, [10.0, 10.0], 0.5)
    assert sol.feasible is False and sol.iterations == 0 and np.isnan(sol.kkt_residual)
    assert set(sol.predicted) == {"reward", "safety", "kl"}
    assert np.isnan(sol.predicted["reward"]) and np.isnan(sol.predicted["kl"]) and np.isnan(sol.predicted["safety"]).all()
    assert sol.stderr.shape == (2,) and np.isnan(sol.stderr).all() and np.isnan(sol.min_effective_samples)
    assert sol.bootstrap_stderr is None and np.isinf(sol.lam).all()


@pytest.mark.parametrize("scale, delta, feasible", [(0.2, 1.5e-12, True), (1.0, 3e-12, False), (1.0, 1e-9, True)])
def test_feasibility_margin_is_1e_12_of_the_score_scale(scale, delta, feasible):
    """A threshold delta below the reachable maximum is feasible iff delta > 1e-12 * max(1, max|g|)
    (max|g| is 0.9 at scale 0.2, 4.5 at scale 1): within that, rounding decides, not the data."""
    reward, safety = instance(m=1, scale=scale)
    reach = safety[..., 0].max(axis=1).mean()
    sol = solve_dual(reward, safety, reach - delta, 0.5)
    assert sol.feasible is feasible
    if feasible:
        assert np.isfinite(sol.lam).all() and sol.kkt_residual <= 1e-10


def test_defaults_no_bootstrap_and_seed_zero():
    reward, safety = instance(n=60, m=1, seed=8)
    b = safety.mean() + 0.3
    assert solve_dual(reward, safety, b, 0.5).bootstrap_stderr is None
    a = solve_dual(reward, safety, b, 0.5, bootstrap=10)
    assert np.array_equal(a.bootstrap_stderr, solve_dual(reward, safety, b, 0.5, bootstrap=10, seed=0).bootstrap_stderr)
    assert not np.array_equal(a.bootstrap_stderr, solve_dual(reward, safety, b, 0.5, bootstrap=10, seed=1).bootstrap_stderr)


def test_min_effective_samples_is_the_smallest_inverse_sum_of_squared_weights():
    reward, safety = instance(n=50, k=16, m=1, seed=9)
    sol = solve_dual(reward, safety, safety.mean() + 0.6, 0.5)
    z = (reward + sol.lam[0] * safety[..., 0]) / 0.5
    w = np.exp(z - logsumexp(z, axis=1, keepdims=True))
    assert sol.min_effective_samples == pytest.approx((1.0 / (w**2).sum(axis=1)).min(), rel=1e-10)


def test_line_search_backtracks_to_lambda_star():
    """Thresholds near the reachable maximum: full Newton steps overshoot where the weights are
    nearly one-hot, and the Armijo line search must shorten them to land on lambda*."""
    reward, safety = instance(n=200, m=2, seed=1)
    base, reach = safety.mean(axis=(0, 1)), safety.max(axis=1).mean(axis=0)
    b = base + 0.95 * (reach - base) * np.array([1.0, 0.3])
    sol = solve_dual(reward, safety, b, 0.5)
    assert sol.kkt_residual <= 1e-10 and sol.iterations <= 12
    np.testing.assert_allclose(sol.lam, independent_lambda(reward, safety, b, 0.5), rtol=1e-8)


def one_constraint_derivatives(reward, g, b, beta, lam):
    """(dD/dlam, d2D/dlam2, d3D/dlam3) for one constraint, from the weights by their definition."""
    z = (reward + lam * g) / beta
    w = np.exp(z - logsumexp(z, axis=1, keepdims=True))
    centred = g - np.sum(w * g, axis=1, keepdims=True)
    return (np.mean(np.sum(w * g, axis=1)) - b, np.mean(np.sum(w * centred**2, axis=1)) / beta,
            np.mean(np.sum(w * centred**3, axis=1)) / beta**2)  # fmt: skip


def iterates(reward, g, b, beta, n, lam0=None):
    """lambda after 0, 1, ..., n steps (the solver stopped by max_iter)."""
    return [solve_dual(reward, g, b, beta, lam0=lam0, max_iter=j).lam[0] for j in range(n + 1)]


def halley(reward, g, b, beta, lam):
    d1, d2, d3 = one_constraint_derivatives(reward, g, b, beta, lam)
    return lam - 2 * d1 * d2 / (2 * d2 * d2 - d1 * d3)


def test_one_constraint_steps_are_halley_steps():
    """Smooth scores from lambda = 0: every step is Halley's (cubic convergence)."""
    reward, safety = instance(m=1)
    g, b = safety[..., 0], safety.mean() + 0.5
    n = solve_dual(reward, g, b, 0.5).iterations
    xs = iterates(reward, g, b, 0.5, n)
    for j in range(n):
        assert xs[j + 1] == pytest.approx(halley(reward, g, b, 0.5, xs[j]), rel=1e-9), j


def test_one_constraint_bisects_while_a_step_does_not_halve_the_gradient():
    """From far above lambda*: a Halley step back down, then bisection of [0, lam] while the
    gradient does not halve, then Halley steps inside the bracket."""
    reward, safety = instance(n=200, m=1, seed=3)
    g, b = safety[..., 0], safety.mean() + 0.4
    sol = solve_dual(reward, g, b, 0.5, lam0=60.0)
    xs = iterates(reward, g, b, 0.5, sol.iterations, lam0=60.0)
    assert xs[1] == pytest.approx(halley(reward, g, b, 0.5, 60.0), rel=1e-6)  # weights nearly one-hot
    assert xs[2:5] == [xs[1] / 2, xs[1] / 4, xs[1] / 8]
    assert xs[5] == pytest.approx(halley(reward, g, b, 0.5, xs[4]), rel=1e-9)
    assert sol.lam[0] == pytest.approx(solve_dual(reward, g, b, 0.5).lam[0], rel=1e-9)


def test_one_constraint_takes_a_newton_step_where_halley_has_no_positive_denominator():
    """Skewed (exponential) safety scores: at lambda = 0, 2 D''^2 - D' D''' < 0 and the step is
    Newton's, -D'/D''."""
    rng = np.random.default_rng(12)
    g = -rng.exponential(size=(100, 8))
    reward = rng.normal(size=(100, 8)) + g
    b = g.mean() + 0.95 * (g.max(axis=1).mean() - g.mean())
    d1, d2, d3 = one_constraint_derivatives(reward, g, b, 0.1, 0.0)
    assert 2 * d2 * d2 - d1 * d3 < 0 < d2
    sol = solve_dual(reward, g, b, 0.1)
    assert iterates(reward, g, b, 0.1, 1)[1] == pytest.approx(-d1 / d2, rel=1e-9)
    root = brentq(lambda x: one_constraint_derivatives(reward, g, b, 0.1, x)[0], 0, 100, xtol=1e-14)
    assert sol.lam[0] == pytest.approx(root, rel=1e-9) and sol.iterations <= 9


@pytest.mark.parametrize("scores, doublings", [("normal", 10), ("binary", 5)])
def test_one_hot_weights_double_from_beta_over_the_score_spread(scores, doublings):
    """A beta so small that pi_ref's weights are exactly one-hot (no Hessian, no Halley or Newton
    step; with 0/1 judge verdicts and a power-of-two beta, the second and third derivatives are
    exactly 0): the first step is beta / sd(g - mean_k g), then lambda doubles until the safety
    scores move the weights, and the solver still lands on lambda*."""
    rng = np.random.default_rng(12)
    k = 6 if scores == "normal" else 4  # 4: per-prompt means of 0/1 verdicts are dyadic, moments exact
    reward = np.argsort(rng.random((50, k)), axis=1).astype(float)  # distinct integers per prompt
    if scores == "normal":
        g, beta = 5e-4 * rng.normal(size=(50, k)), 1e-3
    else:
        g, beta = (rng.random((50, k)) < 0.5).astype(float), 2.0**-10
    b = g.mean() + 0.5 * (g.max(axis=1).mean() - g.mean())
    sol = solve_dual(reward, g, b, beta)
    xs = iterates(reward, g, b, beta, doublings + 1)
    assert xs[1] == pytest.approx(beta / np.std(g - g.mean(axis=1, keepdims=True)), rel=1e-12)
    assert xs[2:] == [xs[1] * 2.0**j for j in range(1, doublings + 1)]
    root = brentq(lambda x: one_constraint_derivatives(reward, g, b, beta, x)[0], 0, 1e5, xtol=1e-12)
    assert sol.lam[0] == pytest.approx(root, rel=1e-6) and sol.kkt_residual <= 1e-10 and sol.iterations <= 30
    assert abs(one_constraint_derivatives(reward, g, b, beta, sol.lam[0])[0]) <= 1e-10


def test_large_n_starts_from_the_strided_subset_solution():
    """N > 1024: the solver starts where the same solve on every (N // 512)-th prompt ends, with
    the same tol and max_iter; N = 1024 starts from 0."""
    reward, safety = instance(n=1025, k=6, m=1, seed=13)
    b = safety.mean() + 0.3
    for max_iter in (2, 100):
        sub = solve_dual(reward[::2], safety[::2], b, 0.5, max_iter=max_iter, tol=1e-6)
        full = solve_dual(reward, safety, b, 0.5, max_iter=max_iter, tol=1e-6)
        warm = solve_dual(reward, safety, b, 0.5, lam0=sub.lam, max_iter=max_iter, tol=1e-6)
        assert np.array_equal(full.lam, warm.lam) and full.iterations == warm.iterations
    cold = solve_dual(reward, safety, b, 0.5, lam0=0.0)
    assert full.iterations < cold.iterations
    at_1024 = solve_dual(reward[:1024], safety[:1024], b, 0.5)
    assert np.array_equal(at_1024.lam, solve_dual(reward[:1024], safety[:1024], b, 0.5, lam0=0.0).lam)


def test_joint_feasibility_undecided_within_its_cut_budget_is_refused():
    """With too few cutting planes to settle the sign (here 1 or 5), joint_slack returns the master
    LP's lower bound, <= 0: solve_dual then refuses the thresholds rather than guess; with its
    default budget the same reachable thresholds (LP margin +0.0058) are decided reachable."""
    from openrlhf_dual.dual.solver import joint_slack

    rng = np.random.default_rng(0)
    n, k, m = 100, 8, 20
    safety = rng.normal(size=(n, k, m))
    base, reach = safety.mean(axis=(0, 1)), safety.max(axis=1).mean(axis=0)
    b = base + 0.22 * (reach - base)
    assert joint_slack(safety, b, max_cuts=1) < joint_slack(safety, b, max_cuts=5) < 0 < joint_slack(safety, b) <= 0.0058


def test_many_constraints_verdict_matches_the_direct_linear_program():
    """20 constraints: the feasibility verdict agrees with the max-margin LP over per-prompt
    reweightings (max t s.t. mean_i sum_k w_ik g_ik >= b + t), also within 1e-3 of the boundary,
    where 200 cutting planes used to stop undecided and report an unreachable threshold (LP margin
    -0.0005 at 0.2245 of the way to the reachable maximum) as feasible, with lambda ~ 1e8."""
    from scipy.optimize import linprog

    rng = np.random.default_rng(0)
    n, k, m = 100, 8, 20
    safety = rng.normal(size=(n, k, m))
    reward = rng.normal(size=(n, k))
    base, reach = safety.mean(axis=(0, 1)), safety.max(axis=1).mean(axis=0)
    a_ub = np.c_[-safety.transpose(2, 0, 1).reshape(m, n * k) / n, np.ones(m)]
    a_eq = np.c_[np.kron(np.eye(n), np.ones(k)), np.zeros(n)]
    for frac, margin in ((0.22, 0.0058), (0.2245, -0.0005), (0.3, -0.107)):
        b = base + frac * (reach - base)
        lp = linprog(np.r_[np.zeros(n * k), -1.0], A_ub=a_ub, b_ub=-b, A_eq=a_eq, b_eq=np.ones(n),
                     bounds=[(0, None)] * (n * k) + [(None, None)], method="highs")  # fmt: skip
        assert lp.status == 0 and lp.x[-1] == pytest.approx(margin, abs=1e-4)
        sol = solve_dual(reward, safety, b, 0.5)
        assert sol.feasible is (margin > 0), (frac, sol.feasible, sol.lam)
        assert np.isinf(sol.lam).all() if margin < 0 else np.isfinite(sol.lam).all() and sol.kkt_residual < 1e-8
