"""Statistics of evaluated policies: per-policy means with confidence intervals, constraint verdicts,
win rates and KL, from scores of K samples per held-out prompt; the markdown report and the
helpfulness/safety plane. Pure numpy (matplotlib for the picture).

Intervals are over prompts: each prompt's K samples are averaged first, then mean +- z * sd / sqrt(N)
(z = 1.96, 95%), so responses to one prompt are not counted as independent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from openrlhf_dual.artifacts import write_figure

Z95 = 1.959963984540054


def mean_ci(per_sample: np.ndarray) -> dict:
    """{"mean", "lo", "hi", "se"} of a [N, K] array, clustered by prompt (95%)."""
    per_prompt = np.asarray(per_sample, dtype=np.float64).reshape(len(per_sample), -1).mean(axis=1)
    mean = float(per_prompt.mean())
    se = float(per_prompt.std(ddof=1) / np.sqrt(len(per_prompt))) if len(per_prompt) > 1 else float("nan")
    return {"mean": mean, "lo": mean - Z95 * se, "hi": mean + Z95 * se, "se": se}


def verdict(ci: dict, threshold: float) -> str:
    """met (the whole interval clears b), violated (the whole interval misses), else inconclusive."""
    if ci["lo"] >= threshold:
        return "met"
    if ci["hi"] < threshold:
        return "violated"
    return "inconclusive"


def win_rate(policy: np.ndarray, reference: np.ndarray) -> dict:
    """P(policy's k-th sample scores above the reference's k-th on the same prompt), ties 1/2; [N, K] each."""
    wins = (policy > reference) + 0.5 * (policy == reference)
    return mean_ci(wins)


def policy_report(scores: np.ndarray, ref_scores: np.ndarray, thresholds: np.ndarray, *, margin: bool,
                  logratio: np.ndarray | None, predicted: dict | None) -> dict:  # fmt: skip
    """One policy's entry. scores, ref_scores [N, K, 1 + m] (reward, then safeties); logratio
    [N, K] = log pi(y) - log pi_ref(y) on the policy's own samples (None for the reference);
    margin: thresholds bound E_pi[g] - E_ref[g] (PeCAN) instead of E_pi[g]."""
    m = scores.shape[-1] - 1
    safety = [mean_ci(scores[..., 1 + j]) for j in range(m)]
    checked = []
    for j in range(m):
        ci = safety[j]
        if margin:  # both policies' samples are random: difference of per-prompt means
            ci = mean_ci(scores[..., 1 + j].mean(axis=1) - ref_scores[..., 1 + j].mean(axis=1))
        checked.append({"threshold": float(thresholds[j]), "value": ci, "verdict": verdict(ci, thresholds[j])})
    out = {
        "reward": mean_ci(scores[..., 0]),
        "safety": safety,
        "constraints": checked,
        "win_rate": {"reward": win_rate(scores[..., 0], ref_scores[..., 0]),
                     "safety": [win_rate(scores[..., 1 + j], ref_scores[..., 1 + j]) for j in range(m)]},  # fmt: skip
        "kl": mean_ci(logratio if logratio is not None else np.zeros(scores.shape[:2])),
    }
    if predicted is not None:
        out["predicted"] = predicted
    return out


def markdown(report: dict, root: str | Path | None = None) -> str:
    """A table per policy: achieved with 95% intervals beside the dual's prediction, verdicts, win
    rates, KL. The prep directory is shown relative to `root` when it lies inside it."""
    prep_dir = report["prep_dir"]
    if root is not None and Path(prep_dir).resolve().is_relative_to(Path(root).resolve()):
        prep_dir = Path(prep_dir).resolve().relative_to(Path(root).resolve())
    units = "beta x log-ratio (PeCAN implicit rewards)" if report["margin"] else "score units"
    lines = [
        f"# Evaluation: {report['n_prompts']} held-out prompts x {report['n_samples']} samples",
        "",
        f"Prep directory `{prep_dir}`; thresholds {report['thresholds']} "
        f"({'margins over the reference' if report['margin'] else 'E[g_j] >= b_j'}), in {units}. "
        "Intervals: 95%, over prompts.",
        "",
        "| policy | reward | " + " | ".join(f"safety {j}" for j in range(len(report["thresholds"])))
        + " | verdict | win rate (reward) | KL to ref [nats] | predicted reward / safety / KL |",
        "|---" * (6 + len(report["thresholds"])) + "|",
    ]
    fmt = lambda c: f"{c['mean']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]"  # noqa: E731
    for name, p in report["policies"].items():
        pred = p.get("predicted")
        pred_s = (f"{pred['reward']:+.3f} / {', '.join(f'{v:+.3f}' for v in pred['safety'])} / {pred['kl']:.3f}"
                  if pred else "-")  # fmt: skip
        lines.append(
            f"| {name} | {fmt(p['reward'])} | " + " | ".join(fmt(s) for s in p["safety"])
            + f" | {', '.join(c['verdict'] for c in p['constraints'])} | {fmt(p['win_rate']['reward'])} | "
            f"{fmt(p['kl'])} | {pred_s} |"
        )
    return "\n".join(lines) + "\n"


def plot_plane(report: dict, path: str | Path, frontier: dict | None = None) -> None:
    """PNG: every policy's (constraint 0 value, reward) with 95% intervals, the dual's prediction for
    it, the predicted frontier curve from the prep directory and the threshold line. The x axis is
    E[g] (MoCAN) or the margin E[g] - E_ref[g] (PeCAN), the units the threshold is in."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if frontier is not None:
        ax.plot(frontier["threshold"], frontier["reward"], color="0.5", lw=1.5, label="predicted frontier (dual on prep samples)")
    for i, (name, p) in enumerate(report["policies"].items()):
        r, s = p["reward"], p["constraints"][0]["value"]
        ax.errorbar([s["mean"]], [r["mean"]], xerr=[[s["mean"] - s["lo"]], [s["hi"] - s["mean"]]],
                    yerr=[[r["mean"] - r["lo"]], [r["hi"] - r["mean"]]], fmt="o*sD^v"[i % 6], ms=8, capsize=3,
                    label=name, zorder=4)  # fmt: skip
        if "predicted" in p:
            ax.scatter([p["predicted"]["safety"][0]], [p["predicted"]["reward"]], marker="x", s=60, color="k", zorder=5)
    if any("predicted" in p for p in report["policies"].values()):
        ax.scatter([], [], marker="x", color="k", label="dual's prediction for that policy")
    b = report["thresholds"][0]
    ax.axvline(b, color="darkorange", ls="--", label=f"threshold b = {b:.3g}")
    ax.set_xlabel("safety margin E[g] - E_ref[g] (beta x log-ratio)" if report["margin"] else "safety E[g]")
    ax.set_ylabel("helpfulness E[r]" + (" (beta x log-ratio)" if report["margin"] else ""))
    ax.set_title(f"Evaluated policies, {report['n_prompts']} held-out prompts (95% intervals)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    write_figure(path, fig)
