"""The closed loop for when one shot misses: the next multiplier from measured safety, and the
certificate that says when to stop. Pure numpy.

One-shot CAN trains at lambda* and lands on pi_lambda* only if training reaches its population
optimum. A real run misses by some amount; evaluate measures it. Model of a trained policy's
achieved safety as a function of the multiplier it was trained at:

    a(lam) = p(pi_ref samples; lam) + delta(lam)        [m], in the units of the thresholds

with p the dual's prediction (openrlhf_dual.dual.predict on the prep directory's scores) and
delta the error of the training run (and of the move from prep prompts to held-out prompts).
Measured at lam_t with a_t +- se_t, the offset delta_t = a_t - p(lam_t) is known; assuming it
stays put near lam_t, the next multiplier solves the dual with the corrected thresholds

    b' = p(lam_t) + (b - a_t) / rho

(rho = 1: a pure offset, b' = b - delta_t). With two measurements at different lambdas, rho_j
of constraint j is its measured change over its predicted change between them, where the
measured change exceeds twice its standard error and has the predicted sign (a trainer that
realises only part of the tilt has rho < 1, one that overshoots rho > 1); rho_j = 1 otherwise.
Re-solving the dual, rather than stepping lambda, keeps
several constraints coupled and slack ones at lambda_j = 0. No new samples of pi_ref are needed:
retraining at the new lambda changes only the labels or weights.

Uncertainty of the new lambda (delta method): d lambda / d b' = H^-1 on the active constraints
(H the dual's Hessian there), b' carries the measurement's se_t / rho, and the dual's own
sampling error (sandwich) adds in quadrature.

Certificate: every constraint's one-sided 95% lower bound a_j - 1.645 se_j is at least
b_j - tolerance_j.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from openrlhf_dual.dual import predict, solve_dual
from openrlhf_dual.dual.objective import evaluate
from openrlhf_dual.dual.solver import check_inputs

Z95_ONE_SIDED = 1.6448536269514722
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Measurement:
    """A policy trained at lam [m], its achieved safety [m] and their standard errors [m] (in the
    thresholds' units: E[g_j], or the margin over the reference for PeCAN)."""

    lam: np.ndarray
    achieved: np.ndarray
    stderr: np.ndarray


@dataclass(frozen=True)
class Certificate:
    """certified: every lower_bound_j >= threshold_j - tolerance_j; lower_bound [m] one-sided 95%."""

    certified: bool
    lower_bound: np.ndarray
    thresholds: np.ndarray
    tolerance: np.ndarray


@dataclass(frozen=True)
class Step:
    """The next multiplier lam [m] with its 95% interval [m, 2], the corrected thresholds [m] it was
    solved for, the measured offset [m] and gain rho [m] (1 where not measured), and the dual's
    uncorrected prediction p(lam) [m] at the new lam."""

    lam: np.ndarray
    interval: np.ndarray
    corrected_thresholds: np.ndarray
    offset: np.ndarray
    gain: np.ndarray
    predicted: np.ndarray


def certify(measurement: Measurement, thresholds, tolerance=0.0) -> Certificate:
    """Whether a measured policy meets every constraint with 95% one-sided confidence, up to
    `tolerance` (a float or [m], in the thresholds' units)."""
    b = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    tol = np.broadcast_to(np.asarray(tolerance, dtype=np.float64), b.shape).copy()
    if np.any(tol < 0):
        raise ValueError(f"tolerance must be >= 0, got {tol.tolist()}")
    lower = np.asarray(measurement.achieved, dtype=np.float64) - Z95_ONE_SIDED * np.asarray(measurement.stderr)
    return Certificate(bool(np.all(lower >= b - tol)), lower, b, tol)


def _gain(previous: Measurement, latest: Measurement, p_prev: np.ndarray, p_latest: np.ndarray) -> np.ndarray:
    """rho [m] from two measurements: measured over predicted change per constraint (1 where the
    measured change is not significant or has the wrong sign)."""
    da = latest.achieved - previous.achieved
    dp = p_latest - p_prev
    se = np.sqrt(latest.stderr**2 + previous.stderr**2)
    significant = (np.abs(da) > 2 * se) & (da * dp > 0)
    return np.where(significant, da / np.where(dp == 0, 1.0, dp), 1.0)


def next_lambda(reward, safety, thresholds, beta: float, measurements: list[Measurement], *,
                form: str = "model") -> Step:  # fmt: skip
    """The next multiplier after `measurements` (oldest first; the latest is corrected from).
    reward [N, K], safety [N, K] or [N, K, m]: the prep directory's scores of pi_ref's samples;
    thresholds [m]; form as in solve_dual. Raises ValueError when the corrected thresholds cannot
    be reached by reweighting pi_ref's samples."""
    if not measurements:
        raise ValueError("calibration needs at least one evaluated policy")
    r, g, b = check_inputs(reward, safety, thresholds, beta, form)  # model form from here on
    m = g.shape[2]
    for x in measurements:
        if not (len(x.lam) == len(x.achieved) == len(x.stderr) == m):
            raise ValueError(f"a measurement has lambda {list(x.lam)} and safety {list(x.achieved)}: need {m} of each")
        if not (np.all(np.isfinite(x.achieved)) and np.all(np.isfinite(x.stderr)) and np.all(np.asarray(x.lam) >= 0)):
            raise ValueError(f"a measurement has non-finite values or a negative lambda: {x}")
    latest = measurements[-1]
    p_latest = predict(r, g, latest.lam, beta)["safety"]
    gain = np.ones(m)
    if len(measurements) > 1:
        previous = measurements[-2]
        gain = _gain(previous, latest, predict(r, g, previous.lam, beta)["safety"], p_latest)
    corrected = p_latest + (b - latest.achieved) / gain
    sol = solve_dual(r, g, corrected, beta)  # already in model form
    if not sol.feasible:
        raise ValueError(
            f"the corrected thresholds {corrected.tolist()} (measured {latest.achieved.tolist()} at lambda "
            f"{list(latest.lam)}) exceed what reweighting pi_ref's samples reaches ({sol.reachable.tolist()}): "
            "the training run falls short by more than the dual can make up; train longer or sample more"
        )
    lam = sol.lam
    free = lam > 0
    se = np.zeros(m)
    if free.any():
        h_inv = np.linalg.pinv(evaluate(r, g, lam, beta, corrected).hess[np.ix_(free, free)])
        var_b = np.diag((latest.stderr / gain)[free] ** 2)
        se[free] = np.sqrt(np.maximum(np.diag(h_inv @ var_b @ h_inv), 0.0) + sol.stderr[free] ** 2)
    interval = np.stack([np.maximum(lam - Z95 * se, 0.0), lam + Z95 * se], axis=1)
    return Step(lam, interval, corrected, latest.achieved - p_latest, gain, predict(r, g, lam, beta)["safety"])
