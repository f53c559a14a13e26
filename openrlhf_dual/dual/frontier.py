"""The one-constraint trade-off curve, threshold -> lambda*, computed in one call, and its plot.

Predicted safety of pi_lambda is non-decreasing in lambda (its derivative is Var_w[g] / beta), so
walking a lambda grid from 0 traces every active threshold between the reference's safety (or
the unconstrained optimum's) and the reachable maximum, each with its exact lambda*.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openrlhf_dual.artifacts import write_figure
from openrlhf_dual.dual.objective import evaluate
from openrlhf_dual.dual.solver import check_inputs


@dataclass(frozen=True)
class Frontier:
    """Arrays over the lambda grid [P]: lam, safety (= the threshold this lam is optimal for),
    reward and kl (nats) of pi_lambda; reference {reward, safety} of pi_ref; reachable safety."""

    lam: np.ndarray
    safety: np.ndarray
    reward: np.ndarray
    kl: np.ndarray
    reference: dict
    reachable: float

    def lam_for(self, threshold: float) -> float:
        """lambda* for a threshold inside the curve, by interpolation (solve_dual is exact)."""
        if not self.safety[0] <= threshold <= self.safety[-1]:
            raise ValueError(f"threshold {threshold} outside the frontier [{self.safety[0]}, {self.safety[-1]}]")
        return float(np.interp(threshold, self.safety, self.lam))

    def to_dict(self) -> dict:
        return {
            "lam": self.lam.tolist(), "threshold": self.safety.tolist(), "reward": self.reward.tolist(),
            "kl": self.kl.tolist(), "reference": self.reference, "reachable": self.reachable,
        }  # fmt: skip


def frontier(reward, safety, beta: float, *, num: int = 60, form: str = "model", gap: float = 1e-3) -> Frontier:
    """The curve for one constraint on lambda in {0} and a log grid up to where the predicted
    safety is within `gap` (relative) of the reachable maximum. reward, safety: [N, K]."""
    if np.ndim(safety) == 3 and np.shape(safety)[2] != 1:  # before check_inputs, whose message is about thresholds
        raise ValueError(f"the frontier is for one constraint, got {np.shape(safety)[2]}")
    reward, safety, _ = check_inputs(reward, safety, 0.0, beta, form)
    reachable = float(safety[..., 0].max(axis=1).mean())
    at = lambda lam: evaluate(reward, safety, np.array([lam]), beta, np.zeros(1))  # noqa: E731
    base = at(0.0)
    target = reachable - gap * max(reachable - base.safety[0], 1e-12)
    top = beta / max(float(safety.std()), 1e-12)
    while at(top).safety[0] < target and top < 1e12:
        top *= 2.0
    lams = np.r_[0.0, np.geomspace(top * 1e-4, top, num - 1)]
    evs = [base] + [at(lam) for lam in lams[1:]]
    return Frontier(
        lam=lams, safety=np.array([e.safety[0] for e in evs]), reward=np.array([e.reward for e in evs]),
        kl=np.array([e.kl for e in evs]),
        reference={"reward": float(reward.mean()), "safety": float(safety.mean())}, reachable=reachable,
    )  # fmt: skip


def plot_frontier(curve: Frontier, path: str | Path, *, threshold: float | None = None, title: str | None = None) -> None:
    """PNG: predicted helpfulness against safety along the curve (coloured by KL), the reference
    policy, the reachable maximum and the chosen threshold; lambda* against threshold beside it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(1, 2)
    pts = ax.scatter(curve.safety, curve.reward, c=curve.kl, cmap="viridis", s=18, zorder=3)
    ax.plot(curve.safety, curve.reward, color="0.6", lw=1, zorder=2)
    fig.colorbar(pts, ax=ax, label="KL(pi_lambda || pi_ref) [nats]")
    ax.scatter([curve.reference["safety"]], [curve.reference["reward"]], marker="*", s=220, color="crimson",
               zorder=4, label="reference policy")  # fmt: skip
    ax.axvline(curve.reachable, color="0.3", ls=":", label=f"reachable max {curve.reachable:.3g}")
    for a in (ax, ax2):
        if threshold is not None:
            a.axvline(threshold, color="darkorange", ls="--", label=f"threshold b = {threshold:.3g}")
    ax.set_xlabel("predicted safety E[g] under pi_lambda")
    ax.set_ylabel("predicted helpfulness E[r] under pi_lambda")
    ax.set_title(title or "CAN frontier: each point is the optimum for its threshold")
    ax.legend(loc="best", fontsize=8)
    ax2.plot(curve.safety, curve.lam, color="navy", marker=".", label="lambda*")
    ax2.set_xlabel("safety threshold b")
    ax2.set_ylabel("lambda*(b)")
    ax2.set_title("multiplier for each threshold")
    ax2.legend(loc="best", fontsize=8)
    fig.tight_layout()
    write_figure(path, fig)
