"""Statistical error of lambda*, an M-estimate over prompts."""

from __future__ import annotations

from typing import Callable

import numpy as np

from openrlhf_dual.dual.objective import DualEval


def sandwich_stderr(ev: DualEval, lam: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """sqrt(diag(H^-1 Cov(psi_i) H^-1 / N)) on the active constraints (lam_j > 0), where psi_i =
    E_{w_i}[g] - b is prompt i's gradient and H the Hessian of D; slack constraints (lam_j = 0)
    get 0. [m]."""
    free = lam > 0
    out = np.zeros(len(lam))
    if not free.any():
        return out
    psi = ev.per_prompt_safety[:, free] - thresholds[free]
    n = len(psi)
    cov = np.atleast_2d(np.cov(psi, rowvar=False))
    h_inv = np.linalg.pinv(ev.hess[np.ix_(free, free)])
    out[free] = np.sqrt(np.maximum(np.diag(h_inv @ cov @ h_inv) / n, 0.0))
    return out


def bootstrap_stderr(n: int, refit: Callable[[np.ndarray], np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """Std of lambda* over n_boot resamples of the n prompts (with replacement): `refit(idx)` ->
    lambda* [m] on prompts idx (inf when that resample cannot reach the thresholds, which makes
    the result inf: lambda* is then unstable). [m]."""
    rng = np.random.default_rng(seed)
    draws = np.array([refit(rng.integers(0, n, n)) for _ in range(n_boot)])
    out = np.std(np.where(np.isinf(draws), 0.0, draws), axis=0, ddof=1)
    return np.where(np.isinf(draws).any(axis=0), np.inf, out)  # (the std of values with an inf is NaN)
