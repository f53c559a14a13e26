"""Pseudo-preference labels for a pair of responses from their raw scores and a multiplier.

Bradley-Terry labels P(chosen > rejected) = sigmoid(beta_policy / beta_dual * (r_lam(chosen) -
r_lam(rejected))), with r_lam = r + lam . g in reward units. DPO with coefficient beta_policy on
such labels has the population optimum pi_ref * exp(r_lam / beta_dual) / Z = pi_lambda, the
Lagrangian maximiser the dual was solved for: at the optimum sigmoid(beta_policy * z) = P, where z
is the difference of log(pi / pi_ref) between the two responses, so z = (r_lam(c) - r_lam(r)) /
beta_dual. With beta_policy == beta_dual (the usual case) the label temperature is 1.

PeCAN. The scores are implicit rewards s_r = log pi_r/pi_ref and s_g = log pi_g/pi_ref (nats) of
policies DPO-aligned with coefficient beta, and the dual (margin form) is solved with r = beta s_r,
g = beta s_g (prompt-only constants dropped: they cancel in pi_lambda and in every pair), so

    pi_lambda* = pi_ref exp((r + lambda* g) / beta) / Z = pi_ref exp(s_r + lambda* s_g) / Z.

Pairs carry r = beta s_r and g = beta s_g, and the labels above become sigmoid(beta_policy *
(d s_r + lambda* d s_g)), d = chosen minus rejected. DPO's population optimum with labels
sigmoid(t * d h) satisfies beta_policy * d log(pi/pi_ref) = t * d h for every pair, i.e.
pi = pi_ref exp(t h / beta_policy) / Z; with h = s_r + lambda* s_g the scale t = beta_policy makes
it exactly pi_lambda*, for any beta_policy. (Scaling by beta_dual instead, as one would for
rewards in reward units, is right only when beta_policy == beta_dual.)
"""

from __future__ import annotations

import numpy as np


def combined_reward(reward: np.ndarray, safety: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """r + lam . g. reward [n]; safety [n, m]; lam [m] -> [n] (float64)."""
    reward = np.asarray(reward, dtype=np.float64)
    safety = np.asarray(safety, dtype=np.float64).reshape(len(reward), -1)
    lam = np.asarray(lam, dtype=np.float64).reshape(-1)
    if safety.shape[1] != lam.shape[0]:
        raise ValueError(f"safety has {safety.shape[1]} constraints per response but lambda has {lam.shape[0]}")
    return reward + safety @ lam


def pair_labels(
    chosen_reward: np.ndarray,
    chosen_safety: np.ndarray,
    rejected_reward: np.ndarray,
    rejected_safety: np.ndarray,
    lam: np.ndarray,
    beta_dual: float,
    beta_policy: float,
    *,
    hard: bool = False,
    seed: int = 0,
) -> np.ndarray:
    """P(chosen preferred) per pair, [n] float64 in [0, 1]. Rewards [n], safeties [n, m], lam [m].
    hard=True draws one Bernoulli label per pair (seeded), as in the authors' code."""
    if beta_dual <= 0 or beta_policy <= 0:
        raise ValueError(f"betas must be positive, got beta_dual={beta_dual}, beta_policy={beta_policy}")
    margin = combined_reward(chosen_reward, chosen_safety, lam) - combined_reward(rejected_reward, rejected_safety, lam)
    if not np.all(np.isfinite(margin)):
        raise ValueError(f"{int(np.sum(~np.isfinite(margin)))} pairs have non-finite scores")
    logits = (beta_policy / beta_dual) * margin
    probs = np.exp(-np.logaddexp(0.0, -logits))  # stable sigmoid
    if hard:
        probs = (np.random.default_rng(seed).random(len(probs)) < probs).astype(np.float64)
    return probs


def sample_weights(reward: np.ndarray, safety: np.ndarray, lam: np.ndarray, beta: float) -> np.ndarray:
    """Self-normalised dual weights of each prompt's K samples of pi_ref, scaled to mean 1 per
    prompt: K softmax_k((r + lam . g) / beta). reward [N, K], safety [N, K, m] in reward units
    (PeCAN: beta s_r, beta s_g), lam [m] -> [N, K] float64. Maximising sum_k w_k log pi(y_k) over
    pi has pi_lambda = pi_ref exp((r + lam . g) / beta) / Z as its population optimum (K -> inf:
    the expected weight of y is pi_lambda(y) / pi_ref(y)); at finite K the self-normalised
    weights carry the O(1/K) bias of the dual's own predictions."""
    from openrlhf_dual.dual.objective import log_weights

    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    reward = np.asarray(reward, dtype=np.float64)
    safety = np.asarray(safety, dtype=np.float64).reshape(*reward.shape, -1)
    lam = np.asarray(lam, dtype=np.float64).reshape(-1)
    if safety.shape[2] != lam.shape[0]:
        raise ValueError(f"safety has {safety.shape[2]} constraints per response but lambda has {lam.shape[0]}")
    if not (np.all(np.isfinite(reward)) and np.all(np.isfinite(safety))):
        raise ValueError("non-finite scores: weights need every sample's reward and safety")
    return reward.shape[1] * np.exp(log_weights(reward, safety, lam, beta)[0])
