"""lambda* = argmin_{lam >= 0} D(lam): input checks, feasibility, projected Newton."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from openrlhf_dual.dual.objective import DualEval, OneConstraint, dual_value, evaluate, log_weights
from openrlhf_dual.dual.uncertainty import bootstrap_stderr, sandwich_stderr

FORMS = ("model", "margin")


@dataclass(frozen=True)
class DualSolution:
    """lam [m] (np.inf where infeasible), feasible, predicted {reward, safety [m], kl} of
    pi_lambda* (NaN where infeasible), reference {reward, safety [m]} of pi_ref, reachable [m]
    (mean over prompts of the best sample: the most reweighting can reach), iterations,
    kkt_residual (max_j |min(lam_j, grad_j)| / safety scale), stderr [m] (sandwich over prompts;
    0 for slack constraints), bootstrap_stderr [m] or None, min_effective_samples (the smallest
    over prompts of 1 / sum_k w_ik^2 at lambda*: near 1, a single sample carries a prompt, and the
    estimate leans on it; NaN where infeasible). Units: those of the scores (margin
    form: beta times log-ratio)."""

    lam: np.ndarray
    feasible: bool
    predicted: dict
    reference: dict
    reachable: np.ndarray
    iterations: int
    kkt_residual: float
    min_effective_samples: float
    stderr: np.ndarray
    bootstrap_stderr: np.ndarray | None
    thresholds: np.ndarray
    beta: float
    form: str
    n_prompts: int
    n_samples: int

    def to_dict(self) -> dict:
        """JSON-ready: arrays as lists, inf/NaN as None."""

        def plain(x):
            if isinstance(x, dict):
                return {k: plain(v) for k, v in x.items()}
            if isinstance(x, np.ndarray):
                return [plain(v) for v in x.tolist()]
            if isinstance(x, (list, tuple)):
                return [plain(v) for v in x]
            if isinstance(x, (float, np.floating)):
                return float(x) if np.isfinite(x) else None
            return x

        return {k: plain(v) for k, v in self.__dict__.items()}


def as_array(x, name: str) -> np.ndarray:
    """float64 numpy copy of a numpy array, torch tensor or sequence; refuses non-finite values."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} non-finite values (NaN or inf); drop or fix those responses")
    return arr


def check_inputs(reward, safety, thresholds, beta: float, form: str):
    """Validated (reward [N, K], safety [N, K, m], thresholds [m]) in float64 model form."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if not np.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a positive number, got {beta}")
    reward, safety = as_array(reward, "reward"), as_array(safety, "safety")
    if reward.ndim != 2:
        raise ValueError(f"reward must be [N prompts, K responses], got shape {reward.shape}")
    if safety.ndim == 2:
        safety = safety[..., None]
    if safety.ndim != 3 or safety.shape[:2] != reward.shape:
        raise ValueError(f"safety must be [N, K] or [N, K, m] matching reward {reward.shape}, got {safety.shape}")
    if reward.shape[1] < 2:
        raise ValueError(f"need at least 2 responses per prompt to reweight, got K = {reward.shape[1]}")
    thresholds = np.atleast_1d(as_array(thresholds, "thresholds"))
    if thresholds.shape != (safety.shape[2],):
        raise ValueError(f"{safety.shape[2]} constraints but thresholds has shape {thresholds.shape}")
    if form == "margin":  # log-ratios -> beta * (units), reference term folded in per prompt
        reward = beta * reward
        safety = beta * (safety - safety.mean(axis=1, keepdims=True))
    return reward, safety, thresholds


def check_start(lam0, m: int) -> np.ndarray | None:
    """A warm start as float64 [m], or None: one finite value per constraint (a number for one)."""
    if lam0 is None:
        return None
    start = np.asarray(lam0, dtype=np.float64).reshape(-1)
    if start.size != m or not np.isfinite(start).all():
        raise ValueError(f"lam0 must be {m} finite value(s), one per constraint; got {start.tolist()}")
    return start


def joint_slack(safety: np.ndarray, thresholds: np.ndarray, tol: float = 1e-12, max_cuts: int = 1000) -> float:
    """A number with the sign of min over u in the simplex of h(u) = mean_i max_k u . g_ik - u . b
    (> 0 iff the thresholds are strictly reachable by reweighting the samples), by Kelley's cutting
    planes: h is the max of linear functions, one per choice of a sample per prompt, so each cut is
    exact; the master LP's value bounds min h from below and h at its solution from above. Returns
    the bound that settles the sign as soon as one does (or h where they meet); if the cuts run out
    first, the lower bound (<= 0): a threshold that close to the boundary is refused."""
    from scipy.optimize import linprog

    m = safety.shape[2]
    if m == 1:
        return float(safety[..., 0].max(axis=1).mean() - thresholds[0])  # the reachable maximum
    def cut(u):
        best = np.argmax(safety @ u, axis=1)
        slope = safety[np.arange(len(best)), best].mean(axis=0) - thresholds
        return slope @ u, slope

    u = np.full(m, 1.0 / m)
    cuts = []
    for _ in range(max_cuts):
        cuts.append(cut(u)[1])
        # min t s.t. t >= slope_q . u for every cut, u in the simplex; variables (u, t)
        res = linprog(
            np.r_[np.zeros(m), 1.0],
            A_ub=np.c_[np.array(cuts), -np.ones(len(cuts))], b_ub=np.zeros(len(cuts)),
            A_eq=np.r_[np.ones(m), 0.0][None], b_eq=[1.0],
            bounds=[(0, None)] * m + [(None, None)], method="highs",
        )  # fmt: skip
        u, lower = res.x[:m], res.x[m]
        upper = cut(u)[0]
        if lower > 0:
            return float(lower)  # every u has h(u) >= lower > 0: reachable
        if upper <= 0 or upper - lower <= tol * max(1.0, abs(lower)):
            return float(upper)  # a u with h(u) <= 0: unreachable; or the bounds met
    return float(lower)


def _kkt(lam: np.ndarray, grad: np.ndarray) -> float:
    return float(np.max(np.abs(np.minimum(lam, grad))))


def newton(reward, safety, thresholds, beta, lam0=None, tol=1e-10, max_iter=100) -> tuple[np.ndarray, DualEval, int, float]:
    """Minimise D over lam >= 0 (inputs must be feasible: D bounded below). Returns (lam, eval at
    lam, iterations, KKT residual scaled by the largest |g|). lam0: float64 [m] or None (0), as
    `check_start` gives it. One constraint: `solve_one`. Several: projected Newton with an active
    set and Armijo backtracking on D."""
    scale = max(1.0, float(np.abs(safety).max()))
    if safety.shape[2] == 1:
        lam, ev, it = solve_one(reward, safety, float(thresholds[0]), beta, lam0, tol * scale, max_iter)
        return lam, ev, it, _kkt(lam, ev.safety - thresholds) / scale
    lam = np.zeros(safety.shape[2]) if lam0 is None else np.maximum(lam0, 0.0)
    ev = evaluate(reward, safety, lam, beta, thresholds)
    for it in range(max_iter + 1):
        grad = ev.safety - thresholds
        kkt = _kkt(lam, grad) / scale
        if kkt <= tol or it == max_iter:
            break
        new = _projected_newton_step(reward, safety, thresholds, beta, lam, ev, grad)
        if new is None or np.array_equal(new, lam):  # no representable progress left
            break
        lam, ev = new, evaluate(reward, safety, new, beta, thresholds)
    return lam, ev, it, kkt


def solve_one(reward, safety, b: float, beta: float, lam0=None, tol=1e-10, max_iter=100) -> tuple[np.ndarray, DualEval, int]:
    """One constraint: the gradient E_pi_lam[g] - b is non-decreasing in lam, so its root is
    kept in a bracket [lo, hi]; Halley steps (closed-form second and third derivatives of D)
    inside it, bisection when a step leaves it, doubling until hi is found. Robust where the
    weights are nearly one-hot and the Hessian vanishes. Starts at lam0 ([1], clipped at 0) when
    given; else, for large N, from the solution on a strided subset of prompts (cheap, and close:
    the estimate's error is statistical)."""
    n = reward.shape[0]
    if lam0 is None and n > 1024:
        sub = slice(None, None, n // 512)
        lam0 = solve_one(reward[sub], safety[sub], b, beta, None, tol, max_iter)[0]
    f = OneConstraint(reward, safety, beta)
    x = 0.0 if lam0 is None else max(float(lam0[0]), 0.0)
    lo, hi, prev = 0.0, np.inf, np.inf
    for it in range(max_iter):
        g, h, t, ev = f.derivatives(x, b)
        if abs(g) <= tol or (x == 0.0 and g > 0):  # converged, or slack: lam* = 0 exactly
            return np.array([x]), ev, it
        lo, hi = (x, hi) if g < 0 else (lo, x)
        denom = 2 * h * h - g * t
        guess = x - 2 * g * h / denom if denom > 0 else (x - g / h if h > 0 else np.inf)
        slow = abs(g) > 0.5 * prev  # the last step did not halve the gradient: safeguard
        prev = abs(g)
        if not np.isfinite(hi):  # no upper bracket yet: the step if it goes up fast enough, else double
            fast = np.isfinite(guess) and guess > x and not slow
            nxt = guess if fast else max(2.0 * x, 1.0 / max(float(f.c.std()), 1e-300))
        else:
            nxt = guess if lo < guess < hi and not slow else 0.5 * (lo + hi)
        if nxt == x:
            break
        x = nxt
    return np.array([x]), f.derivatives(x, b)[3], max_iter


def _projected_newton_step(reward, safety, thresholds, beta, lam, ev, grad):
    """Several constraints: Newton on the free set (lam_j > 0 or grad_j < 0), projected onto
    lam >= 0, with Armijo backtracking on D."""
    free = ~((lam <= 0) & (grad > 0))
    h = ev.hess[np.ix_(free, free)]
    direction = np.zeros(len(lam))
    direction[free] = -np.linalg.solve(h + np.eye(len(h)) * 1e-12 * max(1.0, np.trace(h)), grad[free])
    t = 1.0
    for _ in range(60):
        trial = np.maximum(lam + t * direction, 0.0)
        if dual_value(reward, safety, trial, beta, thresholds) <= ev.value + 1e-4 * grad @ (trial - lam):
            return trial
        t *= 0.5
    return None


def solve_dual(
    reward,
    safety,
    thresholds,
    beta: float,
    *,
    form: str = "model",
    lam0=None,
    tol: float = 1e-10,
    max_iter: int = 100,
    bootstrap: int = 0,
    seed: int = 0,
) -> DualSolution:
    """lambda* of CAN's sample dual. reward [N, K]; safety [N, K] or [N, K, m]; thresholds a
    float or [m]; numpy arrays or torch tensors. form="model": E_pi[g_j] >= b_j. form="margin"
    (PeCAN): inputs are log-ratio scores s_r, s_g; the constraint is E_pi[g] - E_ref[g] >= b with
    g = beta * s_g, handled as the model form on r = beta * s_r, g = beta * (s_g - mean_k s_g):
    centring per prompt leaves each prompt's softmax unchanged and puts the reference term (its
    sample estimate) inside the per-prompt gradient, so standard errors account for it. lam0: where
    the solver starts, one value per constraint (default 0)."""
    reward, safety, thresholds = check_inputs(reward, safety, thresholds, beta, form)
    n, k, m = safety.shape
    lam0 = check_start(lam0, m)
    reference = {"reward": float(reward.mean()), "safety": safety.mean(axis=(0, 1))}
    reachable = safety.max(axis=1).mean(axis=0)
    common = dict(reference=reference, reachable=reachable, thresholds=thresholds, beta=float(beta), form=form,
                  n_prompts=n, n_samples=k)  # fmt: skip
    slack = joint_slack(safety, thresholds)
    if slack <= 1e-12 * max(1.0, float(np.abs(safety).max())):
        nan = {"reward": float("nan"), "safety": np.full(m, np.nan), "kl": float("nan")}
        return DualSolution(np.full(m, np.inf), False, nan, iterations=0, kkt_residual=float("nan"),
                            min_effective_samples=float("nan"), stderr=np.full(m, np.nan), bootstrap_stderr=None, **common)  # fmt: skip
    lam, ev, iterations, kkt = newton(reward, safety, thresholds, beta, lam0, tol, max_iter)

    def refit(idx: np.ndarray) -> np.ndarray:  # warm-started at lambda*
        if joint_slack(safety[idx], thresholds) <= 0:
            return np.full(m, np.inf)
        return newton(reward[idx], safety[idx], thresholds, beta, lam0=lam)[0]

    boot = bootstrap_stderr(n, refit, bootstrap, seed) if bootstrap else None
    return DualSolution(
        lam=lam, feasible=True, predicted={"reward": ev.reward, "safety": ev.safety, "kl": ev.kl},
        iterations=iterations, kkt_residual=kkt, stderr=sandwich_stderr(ev, lam, thresholds),
        min_effective_samples=float((1.0 / np.exp(2 * log_weights(reward, safety, lam, beta)[0]).sum(axis=1)).min()),
        bootstrap_stderr=boot, **common,
    )  # fmt: skip
