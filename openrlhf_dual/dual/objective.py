"""The sample dual of CAN and everything it predicts, for one multiplier. Pure numpy, float64.

reward [N, K], safety [N, K, m] (K responses of pi_ref for each of N prompts), lam [m], beta > 0:

    D(lam)  = beta * mean_i logmeanexp_k((r_ik + lam . g_ik) / beta) - lam . b
    grad    = mean_i E_{w_i}[g] - b                       [m]
    hess    = mean_i Cov_{w_i}[g] / beta                  [m, m]

with w_i = softmax_k((r_ik + lam . g_ik) / beta), the reweighting of pi_ref's samples that
pi_lambda applies. Stabilised by subtracting each prompt's max logit before exponentiating.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DualEval:
    """One evaluation at lam. value (scale of r), per_prompt_safety [N, m] = E_{w_i}[g],
    safety [m], hess [m, m]; reward and kl (nats) under pi_lambda, estimated on the samples."""

    value: float
    per_prompt_safety: np.ndarray
    safety: np.ndarray
    hess: np.ndarray
    reward: float
    kl: float


def log_weights(reward: np.ndarray, safety: np.ndarray, lam: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """(log w [N, K], log mean_k exp(logit) [N]) for logits (r + lam . g) / beta."""
    logits = (reward + safety @ lam) / beta
    top = logits.max(axis=1, keepdims=True)
    shifted = logits - top
    log_norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_w = shifted - log_norm
    return log_w, (top + log_norm)[:, 0] - np.log(reward.shape[1])


def evaluate(reward: np.ndarray, safety: np.ndarray, lam: np.ndarray, beta: float, thresholds: np.ndarray) -> DualEval:
    """D, its derivatives and pi_lambda's predictions at lam, in one pass over the samples."""
    log_w, log_mean = log_weights(reward, safety, lam, beta)
    w = np.exp(log_w)
    per_prompt = np.einsum("nk,nkm->nm", w, safety)
    second = np.einsum("nk,nkj,nkl->jl", w, safety, safety) / len(w)
    hess = (second - per_prompt.T @ per_prompt / len(w)) / beta
    return DualEval(
        value=float(beta * log_mean.mean() - lam @ thresholds),
        per_prompt_safety=per_prompt,
        safety=per_prompt.mean(axis=0),
        hess=hess,
        reward=float(np.einsum("nk,nk->", w, reward) / len(w)),
        kl=float(np.einsum("nk,nk->", w, log_w) / len(w) + np.log(reward.shape[1])),
    )


def dual_value(reward: np.ndarray, safety: np.ndarray, lam: np.ndarray, beta: float, thresholds: np.ndarray) -> float:
    """D(lam) alone (for line searches)."""
    return float(beta * log_weights(reward, safety, lam, beta)[1].mean() - lam @ thresholds)


def predict(reward, safety, lam, beta: float) -> dict:
    """Expected reward, safety [m] and KL(pi_lambda || pi_ref) (nats) of pi_lambda, estimated on
    the samples, for a user-given lam. Shapes as in the module docstring ([N, K] safety allowed)."""
    reward = np.asarray(reward, dtype=np.float64)
    safety = np.asarray(safety, dtype=np.float64)
    safety = safety[..., None] if safety.ndim == 2 else safety
    lam = np.atleast_1d(np.asarray(lam, dtype=np.float64))
    ev = evaluate(reward, safety, lam, beta, np.zeros_like(lam))
    return {"reward": ev.reward, "safety": ev.safety, "kl": ev.kl}


class OneConstraint:
    """Fast passes for m = 1, the common case: a = r / beta and the per-prompt-centred
    c = (g - mean_k g) / beta are precomputed once (centring changes no weight and keeps the
    moments well conditioned); each pass returns the derivatives of D up to the third."""

    def __init__(self, reward: np.ndarray, safety: np.ndarray, beta: float):
        g = safety[..., 0]
        self.g_mean = g.mean(axis=1)
        self.a = reward / beta
        self.c = (g - self.g_mean[:, None]) / beta
        self.beta = beta
        self.ones = np.ones(reward.shape[1])

    def derivatives(self, lam: float, b: float) -> tuple[float, float, float, DualEval]:
        """(dD/dlam, d2D/dlam2, d3D/dlam3) at lam: E[g] - b, Var[g] / beta, E[(g - E g)^3] / beta^2,
        and the DualEval at lam (value not computed: NaN), all from one pass over the samples."""
        z = self.c * lam
        z += self.a
        top = z.max(axis=1, keepdims=True)
        z -= top
        np.exp(z, out=z)
        s = z @ self.ones
        e_a = np.einsum("nk,nk->n", z, self.a) / s
        z *= self.c
        m1 = (z @ self.ones) / s
        z *= self.c
        m2 = (z @ self.ones) / s
        z *= self.c
        m3 = (z @ self.ones) / s
        var = m2 - m1 * m1
        beta = self.beta
        per_prompt = beta * m1 + self.g_mean
        # KL = E_w[log w] + log K with log w = logit - top - log s and E_w[logit] = e_a + lam * m1
        kl = (e_a + lam * m1 - top[:, 0] - np.log(s)).mean() + np.log(self.ones.shape[0])
        ev = DualEval(
            value=float("nan"), per_prompt_safety=per_prompt[:, None], safety=np.array([per_prompt.mean()]),
            hess=np.array([[beta * var.mean()]]), reward=float(beta * e_a.mean()), kl=float(kl),
        )  # fmt: skip
        third = float(beta * (m3 - 3 * m1 * m2 + 2 * m1**3).mean())
        return float(ev.safety[0] - b), float(ev.hess[0, 0]), third, ev
