"""A policy judged on its whole response distribution, from an enumeration that leaves part of the
mass unseen, with rigorous bounds for that part. Pure numpy, float64, nats.

The reference and the optimum come from the reference's own enumeration (`optimum_distribution`,
once), the policy from one expanded where the policy has mass (`whole_distribution`).

For each prompt: the policy P, the reference R and the tilted optimum Q = R exp(u / beta) / Z with
u = r + lam . g and Z = E_R[exp(u / beta)], over ALL responses. An `Enumeration` lists complete
responses y with log P(y), log R(y), their scores (r, g) and whether y is in the response set, and
the unexpanded prefixes h with log P(h), log R(h) (the exact mass of everything below h), the
scores of h itself and the most tokens a response below h still adds. Scores are sums over
tokens, each token adding a row of `token_scores` (0 for a token that adds nothing), so any linear
score c . (r, g) of a response below h lies in c . s(h) + (tokens left) * [min(0, min_v c . t_v),
max(0, max_v c . t_v)]. Everything is then an identity over the enumerated part plus a bound over
the unseen part:

    E_P[f]       = sum_y P f + sum_h P(h) [f_lo(h), f_hi(h)]                  (f = r, g_j, u)
    Z            = sum_y R exp(u / beta) + sum_h R(h) [exp(u_lo(h) / beta), exp(u_hi(h) / beta)]
    KL(P || R)   = sum_y P log(P / R) + sum_h P(h) [log(P(h) / R(h)) + KL(P(.|h) || R(.|h))],
                   0 <= KL(P(.|h) || R(.|h)) <= (tokens left) * L
    KL(P || Q)   = KL(P || R) - E_P[u] / beta + log Z
    KL(R || Q)   = log Z - E_R[u] / beta,   KL(Q || R) = E_Q[u] / beta - log Z

L bounds log P(v | c) - log R(v | c) for every token and context (e.g. minus a floor on log R
from the reference's weights, demo.tree.log_prob_floor). Intervals are [lo, hi]; the lower KL
bound uses only log-sum inequalities and score bounds, the upper one also L. Averages are uniform
over prompts, as the dual's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Enumeration:
    """One prompt's enumerated responses and unseen rest under the policy P and the reference R.
    Scores are [.., 1 + m]: reward, then each safety."""

    logp: np.ndarray  # [n] log P(y)
    logp_ref: np.ndarray  # [n] log R(y)
    scores: np.ndarray  # [n, 1 + m]
    on_set: np.ndarray  # [n] bool
    cut_logp: np.ndarray  # [k] log P(h) of each unexpanded prefix
    cut_logp_ref: np.ndarray  # [k] log R(h)
    cut_scores: np.ndarray  # [k, 1 + m] scores of h itself
    cut_tokens: np.ndarray  # [k] most tokens a response below h still adds
    token_scores: np.ndarray  # [V, 1 + m] what one more token adds

    def cut_bounds(self, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """([k], [k]) bounds of c . scores over every response below each cut prefix."""
        step = self.token_scores @ c
        base = self.cut_scores @ c
        return base + self.cut_tokens * min(0.0, step.min()), base + self.cut_tokens * max(0.0, step.max())


def _lse(x: np.ndarray) -> float:
    if len(x) == 0:
        return -np.inf
    top = x.max()
    return float(top + np.log(np.exp(x - top).sum())) if np.isfinite(top) else float(top)


def _expect(p: np.ndarray, f: np.ndarray, cut_p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """[2] bounds of E[f]: enumerated part (p [n], f [n]) plus cut subtrees of mass cut_p [k]
    whose values lie in [lo, hi] ([k] each)."""
    known = p @ f
    return np.array([known + cut_p @ lo, known + cut_p @ hi])


def _tilted_mean(log_zs: float, mean_s: float, log_zres: tuple[float, float], lo: float, hi: float) -> np.ndarray:
    """[2] bounds of a Q-mean: the enumerated part's Q-mean `mean_s` (weight Z_S) mixed with an
    unseen part of weight Z_res in [exp(log_zres)] whose mean lies in [lo, hi]."""
    shares = [np.exp(z - np.logaddexp(log_zs, z)) if np.isfinite(z) else 0.0 for z in log_zres]
    return np.array([min((1 - s) * mean_s + s * lo for s in shares), max((1 - s) * mean_s + s * hi for s in shares)])


def reference_view(e: Enumeration, lam, beta: float) -> dict:
    """The reference R and the optimum Q on one prompt, from the reference's log-probs in `e`
    (an enumeration expanded where R has mass): bounds [lo, hi] ([m, 2] for safety) and log Z."""
    lam = np.asarray(lam, dtype=np.float64).reshape(-1)
    funcs, c_u = np.eye(1 + len(lam)), np.concatenate([[1.0], lam])
    r, cr = np.exp(e.logp_ref), np.exp(e.cut_logp_ref)
    u = e.scores @ c_u
    u_lo, u_hi = e.cut_bounds(c_u)
    x = e.logp_ref + u / beta  # log of R exp(u / beta)
    log_zs = _lse(x)
    log_zres = (_lse(e.cut_logp_ref + u_lo / beta), _lse(e.cut_logp_ref + u_hi / beta))
    log_z = np.array([np.logaddexp(log_zs, z) for z in log_zres])
    w = np.exp(x - log_zs)  # Q on the enumerated part, renormalised to it

    def tilted(c):
        lo, hi = e.cut_bounds(c)
        return _tilted_mean(log_zs, w @ (e.scores @ c), log_zres, lo.min() if len(lo) else 0.0, hi.max() if len(hi) else 0.0)

    ref = np.array([_expect(r, e.scores @ c, cr, *e.cut_bounds(c)) for c in funcs])
    opt = np.array([tilted(c) for c in funcs])
    e_ru, e_qu = _expect(r, u, cr, u_lo, u_hi), tilted(c_u)
    on_r = float(r[e.on_set].sum())
    on_q = float(np.exp(_lse(x[e.on_set]) - log_zs)) if e.on_set.any() else 0.0
    shares = np.exp(log_zs - log_z)  # enumerated share of Q: [at the smallest Z, at the largest]
    return {
        "reference": {"mass_on_set": np.array([on_r, min(on_r + cr.sum(), 1.0)]), "reward": ref[0], "safety": ref[1:]},
        "optimum": {
            "mass_on_set": np.array([on_q * shares[1], min(on_q * shares[0] + (1 - shares[1]), 1.0)]),
            "reward": opt[0], "safety": opt[1:],
            "kl": np.maximum(np.array([e_qu[0] / beta - log_z[1], e_qu[1] / beta - log_z[0]]), 0.0),
        },
        "kl_ref_to_optimum": np.maximum(np.array([log_z[0] - e_ru[1] / beta, log_z[1] - e_ru[0] / beta]), 0.0),
        "log_z": log_z,
        "unseen": float(cr.sum()),
    }  # fmt: skip


def policy_view(e: Enumeration, lam, beta: float, token_log_ratio: float, log_z: np.ndarray) -> dict:
    """The policy P on one prompt, from an enumeration expanded where P has mass (with R's
    log-probs on the same responses), against the optimum whose log Z bounds [2] are given."""
    lam = np.asarray(lam, dtype=np.float64).reshape(-1)
    funcs, c_u = np.eye(1 + len(lam)), np.concatenate([[1.0], lam])
    p, cp = np.exp(e.logp), np.exp(e.cut_logp)
    pos = p > 0
    kl_known = float(np.sum(p[pos] * (e.logp[pos] - e.logp_ref[pos])))
    kl_cut = float(np.sum(cp * (e.cut_logp - e.cut_logp_ref)))
    kl_pr = np.array([kl_known + kl_cut, kl_known + kl_cut + float(cp @ e.cut_tokens) * token_log_ratio])
    e_pu = _expect(p, e.scores @ c_u, cp, *e.cut_bounds(c_u))
    stats = np.array([_expect(p, e.scores @ c, cp, *e.cut_bounds(c)) for c in funcs])
    on_p = float(p[e.on_set].sum())
    return {
        "mass_on_set": np.array([on_p, min(on_p + cp.sum(), 1.0)]), "reward": stats[0], "safety": stats[1:],
        "kl": np.maximum(kl_pr, 0.0),
        "kl_to_optimum": np.maximum(np.array([kl_pr[0] - e_pu[1] / beta + log_z[0],
                                              kl_pr[1] - e_pu[0] / beta + log_z[1]]), 0.0),
        "unseen": float(cp.sum()),
    }  # fmt: skip


def _mean(views: list[dict], key: str) -> list:
    return np.mean([v[key] for v in views], axis=0).tolist()


def optimum_distribution(ref_enums: list[Enumeration], lam, beta: float) -> dict:
    """Means over prompts of `reference_view` (JSON-ready; `log_z` [P, 2] per prompt)."""
    views = [reference_view(e, lam, beta) for e in ref_enums]
    out = {part: {k: _mean([v[part] for v in views], k) for k in views[0][part]} for part in ("reference", "optimum")}
    out["kl_ref_to_optimum"] = _mean(views, "kl_ref_to_optimum")
    out["log_z"] = [v["log_z"].tolist() for v in views]
    out["unseen"] = max(v["unseen"] for v in views)
    return out


def whole_distribution(enums: list[Enumeration], optimum: dict, lam, beta: float, token_log_ratio: float) -> dict:
    """A policy over prompts (means of `policy_view`, JSON-ready; every quantity an interval
    [lo, hi]) against `optimum` (from `optimum_distribution` at the same lam and beta), with
    `mass_on_set_min_prompt` the smallest per-prompt lower bound and `unseen` the largest
    per-prompt unseen mass of each side."""
    views = [policy_view(e, lam, beta, token_log_ratio, np.asarray(z)) for e, z in zip(enums, optimum["log_z"])]
    policy = {k: _mean(views, k) for k in ("mass_on_set", "reward", "safety", "kl")}
    policy["mass_on_set_min_prompt"] = float(min(v["mass_on_set"][0] for v in views))
    return {
        "policy": policy, "reference": optimum["reference"], "optimum": optimum["optimum"],
        "kl_to_optimum": _mean(views, "kl_to_optimum"), "kl_ref_to_optimum": optimum["kl_ref_to_optimum"],
        "unseen": {"policy": max(v["unseen"] for v in views), "reference": optimum["unseen"]},
    }  # fmt: skip


def exact_multiplier(enums: list[Enumeration], thresholds, beta: float) -> np.ndarray:
    """lambda* of the whole-distribution problem max E_P[r] - beta KL(P || R) s.t. E_P[g] >= b,
    solved on the enumerated responses weighted by R (the unseen reference mass, reported by
    `whole_distribution`, is left out). Responses are padded to a common count with weight 0."""
    from openrlhf_dual.dual import solve_dual

    n = max(len(e.logp_ref) for e in enums)
    m = enums[0].scores.shape[1] - 1
    logits = np.full((len(enums), n), -1e300)
    safety = np.zeros((len(enums), n, m))
    for i, e in enumerate(enums):
        logits[i, : len(e.logp_ref)] = e.scores[:, 0] + beta * e.logp_ref
        safety[i, : len(e.logp_ref)] = e.scores[:, 1:]
        safety[i, len(e.logp_ref) :] = e.scores[:, 1:].min(axis=0)  # padding never raises what is reachable
    sol = solve_dual(logits, safety, np.asarray(thresholds, dtype=np.float64).reshape(-1), beta)
    if not sol.feasible:
        raise ValueError(f"thresholds {thresholds} are not reachable in this world (max {np.asarray(sol.reachable).tolist()})")
    return np.asarray(sol.lam, dtype=np.float64)
