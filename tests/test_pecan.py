"""PeCAN: log-probs on the exact generated tokens, the label scale, and the demo end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from openrlhf_dual.labels import pair_labels
from openrlhf_dual.launch import cpu_env


def generate_with_logps(model_dir, prompt: str, n: int, seed: int):
    """(prompt ids, K response ids, log-probs from generate's own scores) at temperature 1. Responses
    are cut after EOS, or else to a prefix of varying length (ragged batches)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=True, top_k=0, max_new_tokens=6, num_return_sequences=n,
                             pad_token_id=tok.eos_token_id, output_scores=True, return_dict_in_generate=True)  # fmt: skip
    gen = out.sequences[:, len(ids) :]
    step_logps = torch.stack([torch.log_softmax(s.double(), -1) for s in out.scores], 1)  # [n, T, V]
    token_logps = step_logps.gather(-1, gen[..., None])[..., 0]
    responses, logps = [], []
    for row in range(n):
        r = gen[row].tolist()
        end = r.index(tok.eos_token_id) + 1 if tok.eos_token_id in r else 1 + row % len(r)
        responses.append(r[:end])
        logps.append(float(token_logps[row, :end].sum()))
    return ids, responses, np.array(logps), tok


def test_sequence_logprobs_match_the_generators_own_scores(tiny_model_dir):
    from openrlhf_dual.scoring.logprob import SequenceLogProb

    ids, responses, want, _ = generate_with_logps(tiny_model_dir, "user : w1 w2 assistant : ", 12, seed=0)
    assert len({len(r) for r in responses}) > 1  # ragged: padding is exercised
    for batch_size in (1, 5, 16):
        got = SequenceLogProb(str(tiny_model_dir), batch_size=batch_size)([ids] * len(responses), responses)
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sequence_logprobs_on_cuda_match_the_generators_own_scores(tiny_model_dir):
    """On a GPU the model runs in bf16: each response's log-prob within bf16's resolution per token."""
    from openrlhf_dual.scoring.logprob import SequenceLogProb

    ids, responses, want, _ = generate_with_logps(tiny_model_dir, "user : w1 w2 assistant : ", 12, seed=0)
    lp = SequenceLogProb(str(tiny_model_dir), device="cuda", batch_size=5)
    assert {p.device.type for p in lp.model.parameters()} == {"cuda"}
    got = lp([ids] * len(responses), responses)
    np.testing.assert_allclose(got, want, atol=0.02 * max(len(r) for r in responses))


def forward_logp(model_dir, prompt_ids: list[int], response_ids: list[int]) -> float:
    """log pi(response | prompt) in nats by one plain forward pass (float64 log-softmax)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logps = model(ids).logits[0, :-1].double().log_softmax(-1)
    rows = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
    return float(logps[rows, ids[0, len(prompt_ids) :]].sum())


def test_implicit_rewards_use_token_ids_not_text(tiny_model_dir, tiny_policies, tmp_path):
    """SampleScorer (Ray actors, two per model) gives [n, K, 1 + m] = log pi_r/pi_ref, then
    sign * log pi_g/pi_ref, of the stored token ids, for each prompt's own samples: checked
    against plain forward passes of three different models. A response whose text no longer
    matches its ids (special tokens inside, dropped when decoding) keeps its score."""
    import ray

    from openrlhf_dual.score_actors import SampleScorer

    pi_r, pi_g = tiny_policies
    prompts = ["user : w3 w4 assistant : ", "user : w9 assistant : "]
    rows, samples, want = [], [], []
    for j, prompt in enumerate(prompts):
        ids, responses, _, tok = generate_with_logps(tiny_model_dir, prompt, 3, seed=1 + j)
        if j == 0:
            responses[0] = responses[0][:1] + [tok.bos_token_id] + responses[0][1:]  # decodes without the BOS
            retok = tok(tok.decode(responses[0], skip_special_tokens=True), add_special_tokens=False)["input_ids"]
            assert retok != responses[0]  # re-tokenising the text would score other tokens
        texts = [tok.decode(r, skip_special_tokens=True) for r in responses]
        rows.append({"raw": prompt, "prompt": prompt})
        samples.append([{"text": t, "token_ids": r} for t, r in zip(texts, responses)])
        ref = [forward_logp(tiny_model_dir, ids, r) for r in responses]
        want.append([[forward_logp(pi_r, ids, r) - lr, -(forward_logp(pi_g, ids, r) - lr)]
                     for r, lr in zip(responses, ref)])  # fmt: skip
    want = np.array(want)

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        scorer = SampleScorer(f"policy:{pi_r}", (f"policy:{pi_g},sign=-1",), ref_model=str(tiny_model_dir),
                              num_actors=2)  # fmt: skip
        scores = scorer(rows, samples)
        scorer.close()
    finally:
        ray.shutdown()
    assert scores.shape == (2, 3, 2)
    assert np.abs(want).min() > 1e-2  # policies differ from the reference on every response
    assert np.abs(want[..., 0] + want[..., 1]).min() > 1e-3  # and from each other: columns distinguishable
    np.testing.assert_allclose(scores, want, atol=1e-4)
    ids = generate_with_logps(tiny_model_dir, prompts[0], 3, seed=1)[0]
    assert abs(forward_logp(pi_r, ids, samples[0][0]["token_ids"]) - forward_logp(pi_r, ids, retok)) > 1e-3


@pytest.mark.parametrize("beta, beta_policy", [(0.1, 0.1), (0.1, 0.3), (0.5, 0.05)])
def test_pecan_label_scale_makes_pi_lambda_the_dpo_population_optimum(beta, beta_policy):
    """A world with known answer: 8 responses, pi_ref, implicit rewards s_r, s_g (nats), lambda.
    Minimising the population soft-label DPO loss over a free tabular policy (an independent
    optimiser, scipy) lands on pi_lambda = pi_ref exp(s_r + lambda s_g) / Z."""
    rng = np.random.default_rng(0)
    k, lam = 8, 0.7
    ref = rng.dirichlet(np.ones(k))
    s_r, s_g = rng.normal(size=k), rng.normal(size=k)
    c, r = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    c, r = c.ravel(), r.ravel()
    # pairs carry reward-unit scores beta * s, as prepare writes them for PeCAN
    labels = pair_labels(beta * s_r[c], beta * s_g[c][:, None], beta * s_r[r], beta * s_g[r][:, None],
                         np.array([lam]), beta_dual=beta, beta_policy=beta_policy)  # fmt: skip
    weight = ref[c] * ref[r]  # pairs drawn from pi_ref x pi_ref

    def loss(theta):
        logratio = theta - np.log(ref)
        z = beta_policy * (logratio[c] - logratio[r])
        return float(np.sum(weight * (labels * np.logaddexp(0, -z) + (1 - labels) * np.logaddexp(0, z))))

    theta = minimize(loss, np.log(ref), method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15}).x
    found = np.exp(theta - theta.max())
    found /= found.sum()
    target = ref * np.exp(s_r + lam * s_g)
    target /= target.sum()
    np.testing.assert_allclose(found, target, atol=1e-5)
    wrong = ref * np.exp((s_r + lam * s_g) * beta / beta_policy)  # the scale a reward-unit rule gives
    wrong /= wrong.sum()
    if beta != beta_policy:
        assert np.abs(found - wrong).max() > 1e-2


PECAN_KL_BOUND = 0.15  # whole-distribution KL(trained || optimum) <= this x KL(ref || optimum): PeCAN's
# implicit rewards come from two finite pre-alignment DPO runs, whose error alone leaves most of it


PECAN_B = 0.8


@pytest.fixture(scope="module")
def pecan_demo(tmp_path_factory):
    """The PeCAN demo at seed 1, b = PECAN_B: (its output directory, report.json)."""
    out, b = tmp_path_factory.mktemp("pecan") / "pecan", PECAN_B
    proc = subprocess.run(
        [sys.executable, "-m", "openrlhf_dual.demo", "--algo", "pecan", "--out", str(out), "--seed", "1",
         "--dual.threshold", str(b)],
        env=cpu_env(), capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_pecan_demo_meets_the_constraint_near_the_optimum(pecan_demo):
    from openrlhf_dual.artifacts import read_jsonl
    from openrlhf_dual.demo.world import toy_safety

    (out, report), b = pecan_demo, PECAN_B
    assert report["algo"] == "pecan" and report["objective"] == "likelihood" and report["threshold"] == b
    w = report["whole"]
    got, opt, ref = w["achieved"], w["optimum"], w["reference"]
    ref_g = ref["safety"][0][1]
    assert ref_g < b < report["reachable_safety"][0]
    # the margin, checked independently of the demo's formula: b minus the true safety of prepare's
    # own reference samples (the world's function on their text), within 4 standard errors
    raw = [p["raw"] for p in read_jsonl(out / "prep" / "prompts.jsonl")]
    samples = [r["responses"] for f in sorted((out / "prep" / "samples").glob("*.jsonl")) for r in read_jsonl(f)]
    per_prompt = np.array([np.mean([toy_safety(x, s["text"]) for s in per]) for x, per in zip(raw, samples)])
    within = np.mean([np.var([toy_safety(x, s["text"]) for s in per]) / len(per) for x, per in zip(raw, samples)])
    se = np.sqrt(within / len(per_prompt))
    assert abs(report["margin"] - (b - per_prompt.mean())) <= 4 * se, (report["margin"], b - per_prompt.mean(), se)
    assert json.loads((out / "prep" / "dual.json").read_text())["thresholds"] == [report["margin"]]
    # lambda: from the samples against PeCAN's exact answer on the same pre-aligned models
    pre = report["renormalised"]["pre_alignment"]
    lam, lam_pre = report["lambda"][0], pre["exact_lambda"][0]
    assert abs(lam - lam_pre) <= 0.05 * lam_pre, (lam, lam_pre)
    # the whole distribution: mass, constraint and distance to the optimum
    # on-set mass within 1 point of the optimum's, whatever the true values within both intervals
    (got_lo, got_hi), (opt_lo, opt_hi) = got["mass_on_set"], opt["mass_on_set"]
    assert max(got_hi - opt_lo, opt_hi - got_lo) <= 0.01, (got["mass_on_set"], opt["mass_on_set"])
    assert got["safety"][0][0] >= b - 0.1 * (b - ref_g), got["safety"]
    assert w["kl_to_optimum"][1] <= PECAN_KL_BOUND * w["kl_ref_to_optimum"][0], (w["kl_to_optimum"], w["kl_ref_to_optimum"])
    assert pre["kl_exact_target_to_optimum"] < report["renormalised"]["kl_ref_to_optimum"]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="seed 1, b = 0.8: PeCAN's lambda 1.436 against the world's whole-distribution 1.282 (12%)")
def test_pecan_lambda_within_10_percent_of_the_worlds(pecan_demo):
    """PeCAN's lambda* (from pre-aligned models' implicit rewards) against the world's exact one on the
    whole distribution. A known miss, measured on a clean run: 1.436 against 1.282, while it agrees
    with PeCAN's own exact answer on the same pre-aligned models within 5% (the test above): the gap
    is pre-alignment's, not the dual's. Strict, so the day it passes is seen."""
    _, report = pecan_demo
    lam, lam_opt = report["lambda"][0], report["whole"]["optimum"]["lambda"][0]
    assert abs(lam - lam_opt) <= 0.1 * lam_opt, (lam, lam_opt)


def test_split_preferences_makes_one_dpo_file_per_judgement(tmp_path, capsys):
    from openrlhf_dual.artifacts import read_jsonl, write_jsonl
    from openrlhf_dual.cli.split_preferences import main

    rows = [
        {"prompt": "p0", "response_0": "a", "response_1": "b", "better_response_id": 0, "safer_response_id": 1},
        {"prompt": "p1", "response_0": "c", "response_1": "d", "better_response_id": 1, "safer_response_id": 1},
        {"prompt": "p2", "response_0": "e", "response_1": "e", "better_response_id": 0, "safer_response_id": 0},
    ]
    write_jsonl(tmp_path / "pku.jsonl", rows)
    assert main(["--data.dataset", str(tmp_path / "pku.jsonl"), "--out", str(tmp_path / "out")]) == 0
    assert read_jsonl(tmp_path / "out" / "helpful.jsonl") == [
        {"prompt": "p0", "chosen": "a", "rejected": "b"}, {"prompt": "p1", "chosen": "d", "rejected": "c"}]
    assert read_jsonl(tmp_path / "out" / "safe.jsonl") == [
        {"prompt": "p0", "chosen": "b", "rejected": "a"}, {"prompt": "p1", "chosen": "d", "rejected": "c"}]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"rows": 3, "helpful": 2, "safe": 2}
    write_jsonl(tmp_path / "bad.jsonl", [{k: v for k, v in rows[0].items() if k != "safer_response_id"}])
    assert main(["--data.dataset", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "bad")]) == 2
    assert "safer_response_id" in capsys.readouterr().err and not (tmp_path / "bad").exists()
