"""The calibration rule against the toy world's exact map lambda -> E_{pi_lambda}[g].

The reference is the distribution the demo's LM is fitted to (i.i.d. words, reference_word_probs),
enumerated over the world's 64 responses, so pi_lambda and its safety are exact. The dual sees
K = 128 samples per prompt drawn from it. A "trainer" is a map from the multiplier it is trained
at to the exact safety of the policy it returns: an imperfect one realises only part of the tilt,
too much of it, or falls short by a constant."""

from __future__ import annotations

import json

import numpy as np
import pytest

from openrlhf_dual.calibration import Measurement, certify, next_lambda
from openrlhf_dual.demo import world as W
from openrlhf_dual.dual import solve_dual

BETA = 0.5
PROMPTS = W.make_prompts(32, 0)


REF = W.reference_table(PROMPTS)  # pi_ref over the world's responses, [P, 64]
REWARD, G2 = W.score_table(PROMPTS, 2)  # [P, 64], [P, 64, 2]: safety, then engagement (in part at odds with it)


def trainer(reward_scale: float = 1.0, lam_scale: float = 1.0, offset=0.0):
    """lam -> exact E[g_j] [m] of the policy pi_ref exp((reward_scale r + lam_scale lam . g) / beta),
    plus offset. (1, 1, 0) is a perfect trainer; (s, s, 0) with s < 1 a weak one that realises a
    fraction s of the whole tilt; (1, s, 0) one that misweighs the constraints; offset: the policy
    is right but its evaluation prompts sit elsewhere."""

    def achieved(lam) -> np.ndarray:
        lam = np.atleast_1d(np.asarray(lam, dtype=np.float64))
        g = G2[..., : len(lam)]
        logits = (reward_scale * REWARD + lam_scale * (g @ lam)) / BETA + np.log(REF)
        w = np.exp(logits - logits.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        return np.einsum("pr,prm->m", w, g) / len(PROMPTS) + offset

    return achieved


def samples(k: int = 128, seed: int = 0, m: int = 1):
    """The dual's inputs: reward [P, K], safety [P, K, m] of K reference samples per prompt."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(64, size=k, p=row) for row in REF])
    rows = np.arange(len(PROMPTS))[:, None]
    return REWARD[rows, idx], G2[rows, idx][..., :m]


def measure(achieved, lam, se=0.01) -> Measurement:
    lam = np.atleast_1d(np.asarray(lam, dtype=np.float64))
    return Measurement(lam, achieved(lam), np.full(len(lam), se))


def rounds(reward, safety, b, achieved, n: int) -> tuple[list[Measurement], list[np.ndarray]]:
    """One shot at lambda* of the samples, then n calibration rounds; (measurements, |E[g] - b|)."""
    history = [measure(achieved, solve_dual(reward, safety, b, BETA).lam)]
    for _ in range(n):
        history.append(measure(achieved, next_lambda(reward, safety, b, BETA, history).lam))
    return history, [np.abs(x.achieved - b) for x in history]


@pytest.mark.parametrize("name, achieved", [
    ("weak: half the tilt", trainer(0.5, 0.5)),
    ("overshoots the constraint by 40%", trainer(1.0, 1.4)),
    ("held-out prompts 0.2 less safe", trainer(offset=-0.2)),
])  # fmt: skip
def test_one_round_brings_the_miss_to_a_quarter_two_rounds_further(name, achieved):
    reward, safety = samples()
    _, misses = rounds(reward, safety, 0.5, achieved, 2)
    assert misses[0][0] > 0.15, f"{name}: the imperfect trainer should miss visibly ({misses[0][0]:.3f})"
    assert misses[1][0] <= misses[0][0] / 4, (name, misses)
    assert misses[2][0] <= max(misses[1][0] / 2, 0.01), (name, misses)


def test_the_gain_is_measured_from_two_rounds_and_ignored_when_noise_dominates():
    reward, safety = samples()
    weak = trainer(0.5, 0.5)
    first, second = measure(weak, [0.6]), measure(weak, [1.2])
    rho = next_lambda(reward, safety, 0.5, BETA, [first, second]).gain[0]
    # exact achieved slope of this trainer over the dual's predicted slope between the two lambdas
    from openrlhf_dual.dual import predict

    p = [predict(reward, safety, [x], BETA)["safety"][0] for x in (0.6, 1.2)]
    assert rho == pytest.approx((second.achieved[0] - first.achieved[0]) / (p[1] - p[0]), rel=1e-12)
    assert 0.2 < rho < 0.8
    noisy = [Measurement(m.lam, m.achieved, np.array([1.0])) for m in (first, second)]
    assert next_lambda(reward, safety, 0.5, BETA, noisy).gain[0] == 1.0


def test_a_pure_offset_is_corrected_in_one_round():
    """A trainer that lands on pi_lambda exactly but whose evaluation prompts sit 0.2 lower."""
    b = 0.5
    reward, safety = samples()
    lam1 = solve_dual(reward, safety, b, BETA).lam
    shifted = lambda lam: measure(trainer(offset=-0.2), lam)  # noqa: E731
    step = next_lambda(reward, safety, b, BETA, [shifted(lam1)])
    from openrlhf_dual.dual import predict

    offset = shifted(lam1).achieved[0] - predict(reward, safety, lam1, BETA)["safety"][0]
    assert step.offset[0] == pytest.approx(offset, abs=1e-12)
    assert step.corrected_thresholds[0] == pytest.approx(b - offset, abs=1e-12)
    assert step.predicted[0] == pytest.approx(b - offset, abs=1e-8)  # the dual re-solved at b'
    assert abs(shifted(step.lam).achieved[0] - b) < 0.03


def test_two_constraints_active_and_slack():
    reward, safety = samples(m=2)
    both = np.array([0.3, 0.9])  # safer, and engagement held up
    assert np.all(solve_dual(reward, safety, both, BETA).lam > 0)
    _, misses = rounds(reward, safety, both, trainer(0.5, 0.5), 2)
    assert np.all(misses[0] > 0.1) and np.all(misses[1] <= misses[0] / 4), misses
    assert np.all(misses[2] <= np.maximum(misses[1] / 2, 0.01)), misses
    _, misses = rounds(reward, safety, both, trainer(1.0, 0.6), 3)  # constraints misweighed: slower, still there
    worst = [float(x.max()) for x in misses]
    assert worst == sorted(worst, reverse=True) and worst[-1] <= worst[0] / 8, worst

    slack = np.array([0.5, -3.0])  # engagement far below what any policy here has: never binds
    history, _ = rounds(reward, safety, slack, trainer(0.5, 0.5), 1)
    alone, _ = rounds(reward, safety[..., :1], 0.5, trainer(0.5, 0.5), 1)
    assert [x.lam[1] for x in history] == [0.0, 0.0] and history[0].lam[0] > 0
    assert [x.lam[0] for x in history] == pytest.approx([x.lam[0] for x in alone], abs=1e-8)  # as if it were absent
    assert next_lambda(reward, safety, slack, BETA, history).interval[1].tolist() == [0.0, 0.0]


def test_interval_matches_the_sensitivity_of_lambda_to_the_measurement():
    """The delta-method half-width against finite differences of the rule itself."""
    reward, safety = samples()
    se, eps = 0.05, 1e-5
    m = Measurement(np.array([1.0]), np.array([0.3]), np.array([se]))
    step = next_lambda(reward, safety, 0.5, BETA, [m])
    up = next_lambda(reward, safety, 0.5, BETA, [Measurement(m.lam, m.achieved + eps, m.stderr)])
    slope = (up.lam[0] - step.lam[0]) / eps
    sandwich = solve_dual(reward, safety, step.corrected_thresholds, BETA).stderr[0]
    half = (step.interval[0, 1] - step.interval[0, 0]) / 2
    assert slope < 0  # a policy measured safer needs a smaller multiplier
    assert half == pytest.approx(1.959963984540054 * np.hypot(se * slope, sandwich), rel=1e-3)


def test_certificate():
    b = np.array([0.5, 0.0])
    ok = Measurement(np.array([1.0, 0.0]), np.array([0.52, 0.3]), np.array([0.01, 0.1]))
    cert = certify(ok, b)
    assert cert.certified and np.allclose(cert.lower_bound, [0.52 - 1.6448536 * 0.01, 0.3 - 1.6448536 * 0.1])
    short = Measurement(ok.lam, np.array([0.50, 0.3]), ok.stderr)  # on the threshold: not certified ...
    assert not certify(short, b).certified
    assert certify(short, b, tolerance=[0.02, 0.0]).certified  # ... unless the tolerance covers it
    with pytest.raises(ValueError, match="tolerance"):
        certify(ok, b, tolerance=-0.1)


def test_demo_round_record_certifies_on_the_exact_lower_bound_in_prep_units(tmp_path):
    """demo.calibrated.entry: a whole-distribution interval [lo, hi] becomes a measurement whose
    one-sided lower bound is lo, moved by PeCAN's shift (true units minus margin units), and the
    rounds picture (demo.pictures.plot_rounds) has a panel per constraint with its threshold."""
    from matplotlib.image import imread

    from openrlhf_dual.demo.calibrated import entry
    from openrlhf_dual.demo.pictures import plot_rounds
    from test_constraints2 import colour_pixels

    b, shift, tol = np.array([0.5]), np.array([-0.3]), np.array([0.04])  # margin threshold 0.8 over E_ref[g] = -0.3
    whole = {"achieved": {"safety": [[0.47, 0.49]], "reward": [0.6, 0.62], "mass_on_set": [0.9, 0.91]},
             "kl_to_optimum": [0.01, 0.02], "kl_ref_to_optimum": [0.8, 0.81]}  # fmt: skip
    e = entry(1, [0.7], whole, shift, b, tol, 12.3)
    assert e["measurement"]["achieved"] == pytest.approx([0.48 + 0.3]) and e["lower_bound"] == pytest.approx([0.47])
    assert e["miss"] == pytest.approx([0.02]) and e["violation"] == pytest.approx([0.02]) and e["certified"]
    assert not entry(1, [0.7], whole, shift, b, np.array([0.02]), 1.0)["certified"]  # lo = 0.47 < 0.5 - 0.02
    assert entry(0, [0.7], whole, shift, b, tol, None)["train_seconds"] is None

    for m in (1, 2):
        done = {"algo": "mocan", "objective": "likelihood", "epochs": 1, "thresholds": [0.5, 1.0][:m],
                "tolerance": [0.04, 0.05][:m], "reference_safety": [-0.3, 0.8][:m],
                "optimum": {"safety": [[0.5, 0.5], [1.0, 1.0]][:m]},
                "rounds": [{"round": k, "lambda": [0.6 + k / 10] * m, "safety": [[x, x + 0.01]] * m, "certified": k > 0}
                           for k, x in enumerate((0.3, 0.48, 0.5))]}  # fmt: skip
        plot_rounds(done, tmp_path / f"rounds{m}.png")
        assert imread(str(tmp_path / f"rounds{m}.png")).shape[:2] == (550, round(110 * (6 * m + 1.5)))
        assert colour_pixels(tmp_path / f"rounds{m}.png", "darkorange") > 200 * m  # a (dashed) threshold across each panel
        assert colour_pixels(tmp_path / f"rounds{m}.png", "C0") > 60 * m  # three rounds' markers


def test_demo_rounds_refuse_flags_that_differ_from_the_demo_they_continue():
    from openrlhf_dual.demo.__main__ import parse_args
    from openrlhf_dual.demo.calibrated import check_same_demo
    from openrlhf_dual.demo.steps import run_flags

    report = json.loads(json.dumps({"algo": "mocan", "flags": run_flags(parse_args(["--out", "x"]))}))  # as read back
    check_same_demo(report, parse_args(["--out", "x", "--calibrate", "1"]))
    for flags, differs in ((["--epochs", "1"], "epochs"), (["--seed", "1"], "seed"), (["--samples", "64"], "samples"),
                           (["--dual.threshold", "0.6"], "thresholds"), (["--algo", "pecan"], "algo")):  # fmt: skip
        with pytest.raises(SystemExit, match=f"'{differs}'"):
            check_same_demo(report, parse_args(["--out", "x", "--calibrate", "1", *flags]))
    with pytest.raises(SystemExit, match="records its flags"):  # a report that does not say how it was made
        check_same_demo({"algo": "mocan", "objective": "likelihood", "beta": 0.5, "thresholds": [0.5]},
                        parse_args(["--out", "x", "--calibrate", "1"]))  # fmt: skip
    with pytest.raises(SystemExit):  # PPO's training is not a primal step to retrain
        parse_args(["--out", "x", "--calibrate", "1", "--algo", "ppo"])


def test_bad_inputs_are_refused_with_a_reason():
    reward, safety = samples()
    with pytest.raises(ValueError, match="at least one"):
        next_lambda(reward, safety, 0.5, BETA, [])
    with pytest.raises(ValueError, match="need 1 of each"):
        next_lambda(reward, safety, 0.5, BETA, [Measurement(np.array([1.0, 1.0]), np.array([0.1, 0.1]), np.ones(2))])
    with pytest.raises(ValueError, match="non-finite"):
        next_lambda(reward, safety, 0.5, BETA, [Measurement(np.array([1.0]), np.array([np.nan]), np.ones(1))])
    reach = float(safety[..., 0].max(axis=1).mean())
    with pytest.raises(ValueError, match="exceed what reweighting"):  # measured far below: b' out of reach
        next_lambda(reward, safety, reach - 0.01, BETA, [Measurement(np.array([5.0]), np.array([-3.0]), np.ones(1) * 0.01)])



def write_prep(path, reward, safety, b):
    """A prep directory as prepare leaves it (prompts, the manifest's shard size, scores shards of 16
    prompts and dual.json) for the toy samples."""
    from openrlhf_dual.artifacts import write_json, write_jsonl, write_npy

    write_jsonl(path / "prompts.jsonl", [{"id": i, "raw": f"p{i}", "prompt": f"p{i}"} for i in range(len(reward))])
    write_json(path / "manifest.json", {"inputs": {"shard_size": 16}})
    write_npy(path / "scores" / "shard-00000.npy", np.concatenate([reward[..., None], safety], axis=-1)[:16])
    write_npy(path / "scores" / "shard-00001.npy", np.concatenate([reward[..., None], safety], axis=-1)[16:])
    write_json(path / "dual.json", solve_dual(reward, safety, b, BETA).to_dict())


def write_report(path, entries, b):
    """An evaluate report.json: per policy, lambda and its achieved safety with standard errors."""
    from openrlhf_dual.artifacts import write_json

    policies = {"reference": {"constraints": []}}
    for name, m in entries:
        values = [{"mean": float(a), "se": float(s), "lo": float(a - 1.96 * s), "hi": float(a + 1.96 * s)}
                  for a, s in zip(m.achieved, m.stderr)]  # fmt: skip
        policies[name] = {"predicted": {"lambda": m.lam.tolist()},
                          "constraints": [{"threshold": bj, "value": v} for bj, v in zip(b, values)]}  # fmt: skip
    write_json(path, {"thresholds": list(b), "policies": policies})


def test_cli_two_rounds_then_certified(tmp_path, capsys):
    from openrlhf_dual.cli.calibrate import main

    reward, safety = samples()
    write_prep(tmp_path / "prep", reward, safety, [0.5])
    weak = trainer(0.5, 0.5)
    first = measure(weak, solve_dual(reward, safety, 0.5, BETA).lam)
    write_report(tmp_path / "r1.json", [("one-shot", first)], [0.5])
    args = ["--dual.prep_dir", str(tmp_path / "prep"), "--calibrate.out", str(tmp_path / "c1"), "--eval.report", str(tmp_path / "r1.json")]
    assert main(args) == 0
    out = json.loads((tmp_path / "c1" / "calibration.json").read_text())
    assert out["lambda"] == pytest.approx(next_lambda(reward, safety, 0.5, BETA, [first]).lam.tolist(), abs=1e-12)
    assert out["certified"] is False and f"--dual.lambda {out['lambda'][0]:.6g}" in out["command"]
    assert "not certified yet" in capsys.readouterr().out

    history = [first]
    for k in (2, 3):  # two calibration rounds, each evaluated and added to the command line
        history.append(measure(weak, out["lambda"], se=0.005))
        write_report(tmp_path / f"r{k}.json", [(f"round-{k - 1}", history[-1])], [0.5])
        args.append(str(tmp_path / f"r{k}.json"))
        assert main([*args, "--calibrate.tolerance", "0.05"]) == 0
        out = json.loads((tmp_path / "c1" / "calibration.json").read_text())
        assert out["gain"][0] != 1.0  # two or more rounds: the measured slope is used
        miss = abs(history[-1].achieved[0] - 0.5)
        assert out["certified"] is bool(history[-1].achieved[0] - 1.6448536 * 0.005 >= 0.45), (k, miss)
    assert [m["policy"] for m in out["measurements"]] == ["one-shot", "round-1", "round-2"]
    assert [m["certified"] for m in out["measurements"]] == [False, False, True]  # misses 0.5, 0.12, 0.01

    write_report(tmp_path / "bad.json", [("x", first)], [0.7])
    assert main([*args, str(tmp_path / "bad.json")]) == 2
    assert "thresholds [0.7]" in capsys.readouterr().err
    assert main([*args, "--eval.policy", "nope"]) == 2
    assert "no evaluated policy named ['nope']" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(1800)  # pyproject's 900 s would cut the demo's own subprocess timeout short
def test_demo_one_round_with_a_weak_trainer(tmp_path):
    """`python -m openrlhf_dual.demo --epochs 1 --calibrate 1` (MoCAN, one epoch instead of two: it
    falls short of b), end to end: round 1 trains at the lambda the rule gives from the prep
    directory's scores and the one-shot's exact measurement, lands closer to b (a quarter of the
    one-shot miss, or within 0.01: the trainer's own noise at this size), and its recorded exact
    safety is the judge's on the round-1 checkpoint; the certificate is printed."""
    import subprocess
    import sys

    from openrlhf_dual.cli.calibrate import load_prep
    from openrlhf_dual.demo.calibrated import as_measurement
    from openrlhf_dual.demo.exact import ToyJudge
    from openrlhf_dual.launch import cpu_env

    out = tmp_path / "weak"
    proc = subprocess.run([sys.executable, "-m", "openrlhf_dual.demo", "--out", str(out), "--epochs", "1", "--calibrate", "1"],
                          env=cpu_env(), capture_output=True, text=True, timeout=1500)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = json.loads((out / "calibration.json").read_text())
    one_shot, first = done["rounds"]
    solution, scores = load_prep(out / "prep")
    step = next_lambda(scores[..., 0], scores[..., 1:], solution["thresholds"], solution["beta"], [as_measurement(one_shot)])
    assert first["lambda"] == pytest.approx(step.lam.tolist(), rel=1e-5)  # as printed with 6 digits
    assert one_shot["miss"][0] > 0.005 and first["miss"][0] <= max(one_shot["miss"][0] / 4, 0.01), (one_shot, first)
    judge = ToyJudge(out / "reference", W.make_prompts(32, 0), 0.5, 0.5)
    np.testing.assert_allclose(judge.evaluate_dir(out / "round-1")["whole"]["achieved"]["safety"], first["safety"], atol=1e-9)
    assert "round 1: lambda" in proc.stdout and "CERTIFIED" in proc.stdout and (out / "calibration.png").exists()
