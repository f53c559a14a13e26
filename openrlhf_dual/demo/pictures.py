"""The toy-world demo's pictures beyond prepare's frontier: the two-constraint plane and the
calibration rounds. Every number drawn is a whole-distribution value from demo.exact (an
interval [lo, hi], drawn as its midpoint with the interval as error bar)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from openrlhf_dual.artifacts import write_figure
from openrlhf_dual.demo import world as W


def _figure(width: float, height: float, panels: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, np.atleast_1d(fig.subplots(1, panels))


def _point(ax, x, y, **style) -> None:
    """An interval point: x, y are [lo, hi] (or a float for an exact y)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xm, ym = x.mean(), y.mean()
    ax.errorbar([xm], [ym], xerr=[[xm - x.min()], [x.max() - xm]] if x.ndim else None,
                yerr=[[ym - y.min()], [y.max() - ym]] if y.ndim else None, capsize=3, zorder=4, **style)  # fmt: skip


def _name(j: int) -> str:
    return W.CONSTRAINTS[j].__name__.removeprefix("toy_")


def plot_constraints(report: dict, path: str | Path) -> None:
    """PNG (7.5 x 5 in, 110 dpi) of a two-constraint demo report: E[g_1] against E[g_2] for the
    reference (crimson), the exact constrained optimum (forestgreen), the trained policy (C0) and
    the dual's prediction from prepare's samples (black x), with both thresholds (darkorange) and
    the feasible quadrant shaded; each point's legend entry gives its E[r]."""
    w, b = report["whole"], report["thresholds"]
    fig, (ax,) = _figure(7.5, 5)
    ax.axvline(b[0], color="darkorange", ls="--", label=f"{_name(0)} threshold b_1 = {b[0]:.3g}")
    ax.axhline(b[1], color="darkorange", ls="-.", label=f"{_name(1)} threshold b_2 = {b[1]:.3g}")
    for name, part, style in (("reference", w["reference"], dict(fmt="*", ms=14, color="crimson")),
                              ("optimum (exact)", w["optimum"], dict(fmt="P", ms=11, color="forestgreen")),
                              ("trained", w["achieved"], dict(fmt="o", ms=9, color="C0"))):  # fmt: skip
        _point(ax, part["safety"][0], part["safety"][1], label=f"{name}: E[r] = {np.mean(part['reward']):+.3f}", **style)
    pred = report["predicted"]
    ax.scatter([pred["safety"][0]], [pred["safety"][1]], marker="x", s=70, color="k", zorder=5,
               label=f"dual's prediction from samples: E[r] = {pred['reward']:+.3f}")  # fmt: skip
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    ax.fill_between([b[0], max(x1, b[0])], b[1], max(y1, b[1]), color="0.9", zorder=0, label="both constraints met")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    lam = ", ".join(f"{x:.3f}" for x in w["optimum"]["lambda"])
    ax.set_xlabel(f"{_name(0)} E[g_1]")
    ax.set_ylabel(f"{_name(1)} E[g_2]")
    ax.set_title(f"Two constraints, whole response distribution (exact lambda* = {lam})")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    write_figure(path, fig)


def plot_rounds(done: dict, path: str | Path) -> None:
    """PNG (6m + 1.5 x 5 in, 110 dpi; one panel per constraint) of calibration.json: achieved
    E[g_j] against round (C0, 0 = one shot), the threshold (darkorange) with the certificate's
    tolerance below it shaded and the exact optimum (forestgreen); the reference's value in the legend."""
    b, tol = done["thresholds"], done["tolerance"]
    fig, axes = _figure(6 * len(b) + 1.5, 5, len(b))
    rounds = done["rounds"]
    for j, ax in enumerate(axes):
        ax.axhspan(b[j] - tol[j], b[j], color="navajowhite", alpha=0.6, label=f"tolerance ({tol[j]:.3g})")
        ax.axhline(b[j], color="darkorange", ls="--", label=f"threshold b = {b[j]:.3g}")
        ax.axhline(np.mean(done["optimum"]["safety"][j]), color="forestgreen", ls=":", label="exact optimum")
        ax.plot([], [], " ", label=f"reference: {done['reference_safety'][j]:+.3f}")  # far below: the axis zooms on b
        mids = [np.mean(e["safety"][j]) for e in rounds]
        ax.plot([e["round"] for e in rounds], mids, color="C0", lw=1, zorder=3)
        for e in rounds:
            _point(ax, e["round"], e["safety"][j], fmt="os"[e["certified"]], ms=9, color="C0")
            ax.annotate(f"lambda {e['lambda'][j]:.3f}", (e["round"], np.mean(e["safety"][j])), textcoords="offset points",
                        xytext=(6, 6), fontsize=8)  # fmt: skip
        ax.scatter([], [], marker="o", color="C0", label="achieved (square: certified)")
        ax.set_xticks([e["round"] for e in rounds], ["one shot" if e["round"] == 0 else str(e["round"]) for e in rounds])
        ax.set_xlim(-0.5, len(rounds) - 0.5)
        ax.set_xlabel("calibration round")
        ax.set_ylabel(f"{_name(j)} E[g_{j + 1}], whole distribution")
        ax.set_title(f"{done['algo']} ({done['objective']}, {done['epochs']} epochs): achieved {_name(j)} by round")
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    write_figure(path, fig)
