"""lambda* three ways, side by side in one run, on synthetic scores shaped like the paper's
(beaver reward around -11.7, safety = -cost around -1.6, beta 0.1; N prompts x K = 128):

- ours: `solve_dual` (bracketed Newton on the closed-form gradient and Hessian);
- PGD: projected gradient descent from lambda = 1 with step halving and restart whenever the
  dual goes up or turns NaN (the procedure of the authors' dual notebook, re-implemented here);
- L-BFGS-B: scipy with the analytic gradient, bound lambda >= 0, from lambda = 1.

Every method gets the same objective; accuracy is |lambda - lambda_ref| against a bisection to
machine precision on the monotone gradient. Times are the best of --repeats runs.

    python benchmarks/dual_solver.py [--sizes 1000 30000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.optimize import minimize

from openrlhf_dual.dual import solve_dual
from openrlhf_dual.dual.objective import dual_value, evaluate

BETA, K = 0.1, 128


def scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    prompt = rng.normal(0, 2.0, (n, 1))
    reward = -11.7 + prompt + rng.normal(0, 1.0, (n, K))
    safety = -1.6 - 0.3 * (reward + 11.7) + rng.normal(0, 0.8, (n, K)) + 0.5 * rng.normal(0, 1.0, (n, 1))
    return reward, safety[..., None]


def grad(reward, safety, lam, b):
    return evaluate(reward, safety, np.array([lam]), BETA, np.array([b])).safety[0] - b


def reference_lambda(reward, safety, b) -> float:
    lo, hi = 0.0, 1.0
    while grad(reward, safety, hi, b) < 0:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if grad(reward, safety, mid, b) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def pgd(reward, safety, b, lr=0.1, tol=1e-8, max_iter=10_000) -> tuple[float, int]:
    """Projected gradient descent with step-halving restarts; returns (lambda, evaluations)."""
    evals = 0
    while True:
        lam, prev = 1.0, dual_value(reward, safety, np.array([1.0]), BETA, np.array([b]))
        evals += 1
        for _ in range(max_iter):
            new = max(0.0, lam - lr * grad(reward, safety, lam, b))
            value = dual_value(reward, safety, np.array([new]), BETA, np.array([b]))
            evals += 2
            if not np.isfinite(value) or value > prev + 1e-15 * abs(prev):
                break  # restart with half the step
            if abs(new - lam) < tol:
                return new, evals
            lam, prev = new, value
        else:
            return lam, evals
        lr *= 0.5


def lbfgsb(reward, safety, b, gtol) -> tuple[float, int]:
    def f(x):
        ev = evaluate(reward, safety, x, BETA, np.array([b]))
        return ev.value, ev.safety - b

    res = minimize(f, np.ones(1), jac=True, bounds=[(0, None)], method="L-BFGS-B",
                   options={"gtol": gtol, "ftol": 1e-16, "maxiter": 1000})  # fmt: skip
    return float(res.x[0]), int(res.nfev)


def best_time(fn, repeats):
    best, out = np.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 30000])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    print(f"{'N x K':>12} {'method':>9} {'time s':>9} {'evals':>6} {'lambda':>14} {'|err|':>9} {'time / ours':>12}")
    for n in a.sizes:
        reward, safety = scores(n)
        b = float(safety.mean() + 0.5)  # safety margin of +0.5 over the reference, as in the paper's sweep
        lam_ref = reference_lambda(reward, safety, b)
        t_ours, sol = best_time(lambda: solve_dual(reward, safety, b, BETA), a.repeats)
        # L-BFGS-B gets our achieved gradient accuracy as its tolerance
        t_lb, (lam_lb, ev_lb) = best_time(lambda: lbfgsb(reward, safety, b, max(abs(grad(reward, safety, sol.lam[0], b)), 1e-12)), a.repeats)
        t_pgd, (lam_pgd, ev_pgd) = best_time(lambda: pgd(reward, safety, b), 1)
        rows = [("ours", t_ours, sol.iterations + 1, sol.lam[0]), ("L-BFGS-B", t_lb, ev_lb, lam_lb), ("PGD", t_pgd, ev_pgd, lam_pgd)]
        for name, t, ev, lam in rows:
            print(f"{n:>7} x {K:<3} {name:>9} {t:>9.4f} {ev:>6} {lam:>14.10f} {abs(lam - lam_ref):>9.1e} {t / t_ours:>11.1f}x")


if __name__ == "__main__":
    main()
