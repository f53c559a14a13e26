"""Evaluation statistics against hand-computed values (MoCAN and PeCAN's margin form), the report
files, and `cli.evaluate` on a real PeCAN prep directory (in-process, local Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from openrlhf_dual.evaluation import Z95, markdown, mean_ci, plot_plane, policy_report, verdict, win_rate


def test_z95_is_the_normal_975_quantile():
    from scipy.stats import norm

    assert Z95 == pytest.approx(norm.ppf(0.975), abs=1e-12)


def test_mean_ci_is_clustered_by_prompt():
    # 3 prompts x 2 samples: prompt means 1, 3, 8 -> mean 4, sd 3.6056 (ddof 1), se sd / sqrt(3)
    x = np.array([[0.0, 2.0], [3.0, 3.0], [10.0, 6.0]])
    ci = mean_ci(x)
    se = np.sqrt(((1 - 4) ** 2 + (3 - 4) ** 2 + (8 - 4) ** 2) / 2) / np.sqrt(3)
    assert ci == pytest.approx({"mean": 4.0, "se": se, "lo": 4.0 - 1.959964 * se, "hi": 4.0 + 1.959964 * se}, rel=1e-6)
    # the same 6 numbers as 6 independent prompts give a different (unclustered) error
    assert mean_ci(x.reshape(6, 1))["se"] != pytest.approx(se)
    # float32 scores are averaged in float64: (2^24 + 1) / 2 is not 2^23 (what float32 would give)
    assert mean_ci(np.array([[2.0**24, 1.0]], dtype=np.float32))["mean"] == 8388608.5
    one = mean_ci(np.array([[1.0, 2.0]]))
    assert one["mean"] == 1.5 and np.isnan(one["se"]) and np.isnan(one["lo"]) and np.isnan(one["hi"])


@pytest.mark.parametrize(
    "lo, hi, b, want",
    [(1.0, 2.0, 1.0, "met"), (1.0, 2.0, 0.5, "met"), (0.0, 0.9, 1.0, "violated"), (0.0, 1.0, 1.0, "inconclusive"),
     (0.5, 1.5, 1.0, "inconclusive")],
)  # fmt: skip
def test_verdict(lo, hi, b, want):
    assert verdict({"lo": lo, "hi": hi}, b) == want


def test_win_rate_counts_ties_as_half_on_the_same_prompt_and_index():
    policy = np.array([[1.0, 2.0], [0.0, 5.0]])
    ref = np.array([[0.0, 2.0], [1.0, 0.0]])
    got = win_rate(policy, ref)  # wins [[1, 0.5], [0, 1]]: prompt means 0.75, 0.5
    assert got["mean"] == pytest.approx(0.625)
    assert got["se"] == pytest.approx(np.std([0.75, 0.5], ddof=1) / np.sqrt(2))


def scores(reward, safety0, safety1):
    return np.stack([reward, safety0, safety1], axis=-1)


N, K = 4, 5  # K != 1 + m, so a mixed-up axis shows
RNG = np.random.default_rng(0)
REF = scores(*RNG.normal(size=(3, N, K)))
POL = scores(*(RNG.normal(size=(3, N, K)) + np.array([1.0, 0.5, -0.2])[:, None, None]))


def test_policy_report_model_form():
    logratio = RNG.normal(size=(N, K))
    pred = {"lambda": [0.3, 0.1], "reward": 1.0, "safety": [0.2, 0.1], "kl": 0.4}
    rep = policy_report(POL, REF, np.array([0.0, 5.0]), margin=False, logratio=logratio, predicted=pred)
    assert rep["reward"] == mean_ci(POL[..., 0]) and rep["reward"]["mean"] == pytest.approx(POL[..., 0].mean())
    for j in range(2):
        assert rep["safety"][j] == mean_ci(POL[..., 1 + j])
        assert rep["constraints"][j]["value"] == rep["safety"][j]  # E[g_j] against b_j
        assert rep["win_rate"]["safety"][j] == win_rate(POL[..., 1 + j], REF[..., 1 + j])
    assert [c["threshold"] for c in rep["constraints"]] == [0.0, 5.0]
    assert [c["verdict"] for c in rep["constraints"]] == [verdict(rep["safety"][0], 0.0), "violated"]
    assert rep["win_rate"]["reward"] == win_rate(POL[..., 0], REF[..., 0])
    assert rep["kl"]["mean"] == pytest.approx(logratio.mean())
    assert rep["predicted"] is pred
    ref = policy_report(REF, REF, np.array([0.0, 5.0]), margin=False, logratio=None, predicted=None)
    assert "predicted" not in ref and ref["kl"]["mean"] == 0.0 and ref["win_rate"]["reward"]["mean"] == 0.5


def test_policy_report_margin_form_bounds_the_difference_to_the_reference():
    """PeCAN: the threshold bounds E_pi[g] - E_ref[g], a difference of per-prompt means of two
    independent sample sets; `safety` stays the policy's own E[g]."""
    b = np.array([0.4, -0.1])
    rep = policy_report(POL, REF, b, margin=True, logratio=np.zeros((N, K)), predicted=None)
    for j in range(2):
        diff = POL[..., 1 + j].mean(axis=1) - REF[..., 1 + j].mean(axis=1)  # [N]
        se = diff.std(ddof=1) / np.sqrt(N)
        value = rep["constraints"][j]["value"]
        assert value["mean"] == pytest.approx(POL[..., 1 + j].mean() - REF[..., 1 + j].mean())
        assert value["se"] == pytest.approx(se) and value["lo"] == pytest.approx(diff.mean() - Z95 * se)
        assert rep["constraints"][j]["verdict"] == verdict(value, b[j])
        assert rep["safety"][j]["mean"] == pytest.approx(POL[..., 1 + j].mean())
    # the reference against itself: a margin of exactly 0
    ref = policy_report(REF, REF, b, margin=True, logratio=None, predicted=None)
    assert [c["value"]["mean"] for c in ref["constraints"]] == [0.0, 0.0]
    assert [c["verdict"] for c in ref["constraints"]] == ["violated", "met"]


def report_of(margin: bool) -> dict:
    b = np.array([0.4, -0.1])
    pred = {"lambda": [0.3, 0.0], "reward": 1.25, "safety": [0.5, 0.25], "kl": 0.125}
    return {
        "prep_dir": "prep/", "thresholds": b.tolist(), "beta": 0.1, "margin": margin, "n_prompts": N, "n_samples": K,
        "policies": {
            "reference": policy_report(REF, REF, b, margin=margin, logratio=None, predicted=None),
            "mocan": policy_report(POL, REF, b, margin=margin, logratio=np.full((N, K), 0.5), predicted=pred),
        },
    }  # fmt: skip


def test_markdown_has_a_row_per_policy_with_values_and_units():
    md = markdown(report_of(margin=True))
    lines = md.splitlines()
    assert lines[:4] == [
        f"# Evaluation: {N} held-out prompts x {K} samples", "",
        "Prep directory `prep/`; thresholds [0.4, -0.1] (margins over the reference), in beta x log-ratio (PeCAN "
        "implicit rewards). Intervals: 95%, over prompts.", "",
    ]  # fmt: skip
    header = next(i for i, line in enumerate(lines) if line.startswith("| policy |"))
    assert lines[header] == ("| policy | reward | safety 0 | safety 1 | verdict | win rate (reward) | KL to ref [nats] "
                             "| predicted reward / safety / KL |")  # fmt: skip
    assert lines[header + 1] == "|---" * 8 + "|"
    mocan = next(line for line in lines if line.startswith("| mocan |")).split(" | ")
    rep = report_of(True)["policies"]["mocan"]
    r = rep["reward"]
    assert mocan[1] == f"{r['mean']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]"
    for j in range(2):
        sj = rep["safety"][j]
        assert mocan[2 + j] == f"{sj['mean']:+.3f} [{sj['lo']:+.3f}, {sj['hi']:+.3f}]"
    w = rep["win_rate"]["reward"]
    assert mocan[5] == f"{w['mean']:+.3f} [{w['lo']:+.3f}, {w['hi']:+.3f}]"
    assert mocan[4] == ", ".join(c["verdict"] for c in rep["constraints"])
    assert mocan[6] == "+0.500 [+0.500, +0.500]"  # KL
    assert mocan[7] == "+1.250 / +0.500, +0.250 / 0.125 |"
    assert next(line for line in lines if line.startswith("| reference |")).endswith("| - |")
    plain = markdown(report_of(margin=False)).splitlines()
    assert plain[2] == ("Prep directory `prep/`; thresholds [0.4, -0.1] (E[g_j] >= b_j), in score units. "
                        "Intervals: 95%, over prompts.")  # fmt: skip
    assert len(md.splitlines()) == 4 + 2 + 2 and md.endswith("|\n")


def test_markdown_shows_the_prep_directory_relative_to_root_when_inside_it(tmp_path):
    inside, outside = tmp_path / "repo" / "runs" / "prep", tmp_path / "elsewhere" / "prep"
    for d in (inside, outside):
        d.mkdir(parents=True)

    def prep_line(prep_dir, root):
        return markdown({**report_of(margin=False), "prep_dir": str(prep_dir)}, root=root).splitlines()[2]

    assert prep_line(inside, tmp_path / "repo").startswith("Prep directory `runs/prep`; thresholds")
    assert prep_line(inside, str(tmp_path / "repo" / "runs" / ".." / "runs")).startswith("Prep directory `prep`;")
    assert prep_line(outside, tmp_path / "repo").startswith(f"Prep directory `{outside}`;")
    assert prep_line(inside, None).startswith(f"Prep directory `{inside}`;")


def png_pixels(path):
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(str(path))


def test_plane_picture_has_every_policy_and_the_threshold(tmp_path):
    """A 7.5 x 5 inch figure at 110 dpi whose pixels show the orange threshold line and one marker
    colour per policy (matplotlib's cycle C0, C1)."""
    from matplotlib.colors import to_rgb

    frontier = {"threshold": [-1.0, 0.0, 1.0], "reward": [2.0, 1.0, 0.0]}
    plot_plane(report_of(margin=True), tmp_path / "plane.png", frontier)
    px = png_pixels(tmp_path / "plane.png")[..., :3]
    assert px.shape == (550, 825, 3)

    def present(colour, tol=0.02):
        return int(np.sum(np.all(np.abs(px - np.array(to_rgb(colour))) < tol, axis=-1)))

    assert present("darkorange") > 300  # the threshold line, full height
    assert present("C0") > 20 and present("C1") > 20  # reference and mocan markers
    plot_plane(report_of(margin=False), tmp_path / "plain.png")
    assert png_pixels(tmp_path / "plain.png").shape[:2] == (550, 825)
