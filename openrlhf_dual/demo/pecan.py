"""PeCAN on the toy world: no reward or safety model, only preference data.

Helpfulness and safety preferences are drawn from Bradley-Terry models of the world's true reward
and safety, P(y1 > y0) = sigmoid(u(y1) - u(y0)), one hard label per pair, on pairs of distinct
responses of 0 to 4 response words drawn uniformly (like a preference dataset collected from many
models: it covers the responses pi_ref rarely gives, which the constrained optimum needs, and the
short or long ones a sampler sometimes returns, whose implicit rewards would otherwise be
extrapolations that dominate the sample dual; prepare's min_effective_samples shows that). DPO
with coefficient beta on such data has the population optimum pi_ref exp(u / beta), so the
implicit rewards beta log(pi_r / pi_ref) and beta log(pi_g / pi_ref) are the true reward and
safety up to prompt-only constants, and the margin E_pi[g] - E_ref[g] >= b is the true-units
threshold minus the reference's true safety. The report is in true units, like MoCAN's, plus the
split of the remaining gap between pre-alignment and the rest (sampling, dual, training).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from openrlhf_dual.artifacts import write_jsonl
from openrlhf_dual.demo import world as W
from openrlhf_dual.demo.exact import ToyJudge, summary, tilt
from openrlhf_dual.demo.steps import EPOCHS, build_reference, dpo, finish, prepare, primal_step, run_flags

LENGTHS = (0.05, 0.1, 0.1, 0.65, 0.1)  # P(response of 0, 1, 2, 3, 4 words); the world's own have 3


def preference_rows(tok, prompts: list[str], utility, pairs: int, seed: int) -> list[dict]:
    """`pairs` Bradley-Terry-labelled pairs of distinct responses per prompt, as OpenRLHF DPO rows
    {prompt, chosen, rejected}. utility(prompt, response): the true reward or safety."""
    rng = np.random.default_rng(seed)
    words = list(W.RESPONSE_WORDS)

    def draw() -> str:
        return " ".join(rng.choice(words, size=rng.choice(len(LENGTHS), p=LENGTHS)))

    rows = []
    for prompt in prompts:
        head = W.format_prompt(tok, prompt)
        for _ in range(pairs):
            y0, y1 = draw(), draw()
            while y1 == y0:
                y1 = draw()
            y1_wins = rng.random() < 1.0 / (1.0 + np.exp(utility(prompt, y0) - utility(prompt, y1)))
            chosen, rejected = (y1, y0) if y1_wins else (y0, y1)
            rows.append({"prompt": head, "chosen": chosen, "rejected": rejected})
    return rows


def margin_target(ref: W.ExactPolicy, s_r: np.ndarray, s_g: np.ndarray, margin: float, beta: float):
    """PeCAN's exact answer for given implicit rewards s_r, s_g [P, 64] (nats): lambda and
    pi_ref exp(s_r + lambda s_g) / Z meeting E_pi[beta s_g] - E_ref[beta s_g] >= margin."""
    from openrlhf_dual.dual import solve_dual

    g = beta * (s_g - np.sum(ref.probs * s_g, axis=1, keepdims=True))  # centred on pi_ref, per prompt
    lam = float(solve_dual(beta * s_r + beta * np.log(ref.probs), g, margin, beta).lam[0])
    return lam, tilt(ref, s_r + lam * s_g)


def run(a: argparse.Namespace, out: Path) -> dict:
    from transformers import AutoTokenizer

    t0 = time.time()
    print(f"[1/5] reference: tiny Llama fitted to the toy world ({a.prompts} prompts, 64 responses each)")
    ref_dir, prompts = build_reference(out, a.prompts, a.seed)
    judge = ToyJudge(ref_dir, prompts, a.threshold, a.beta)
    ref, reward, safety = judge.ref_set, judge.reward, judge.safety
    ref_whole = {k: float(np.mean(judge.reference[k])) for k in ("reward", "safety")}  # midpoints of tight bounds
    margin = a.threshold - ref_whole["safety"]  # the reference's safety over its whole distribution, as sampled

    print(f"[2/5] pre-alignment: OpenRLHF DPO on {a.pairs} Bradley-Terry pairs per prompt, helpfulness then safety")
    tok = AutoTokenizer.from_pretrained(ref_dir)
    aligned = {}
    for name, utility, offset in (("pi_r", W.toy_reward, 1), ("pi_g", W.toy_safety, 2)):
        data = out / "data" / f"{name}.jsonl"
        write_jsonl(data, preference_rows(tok, prompts, utility, a.pairs, a.seed * 10 + offset))
        aligned[name] = dpo(out, name, "openrlhf.cli.train_dpo", ref_dir, a.beta, EPOCHS["dpo"],
                            ["--data.dataset", str(data), "--data.prompt_key", "prompt"])  # fmt: skip

    print(f"[3/5] prepare --dual.algo pecan: {a.samples} samples per prompt, log-probs of 3 models, margin {margin:+.3f}")
    prep = out / "prep"
    solution = prepare(out, ref_dir, f"policy:{aligned['pi_r']}", f"policy:{aligned['pi_g']},sign=+1", margin, a.beta,
                       a.prompts, a.samples, a.seed, algo="pecan")  # fmt: skip
    shutil.copy(prep / "frontier.png", out / "frontier.png")

    print(f"[4/5] PeCAN primal step ({a.objective}) with OpenRLHF's trainer, lambda = {solution['lam'][0]:.4f}")
    ckpt = primal_step(out, "pecan", a, ref_dir, "pecan")

    print("[5/5] exact evaluation of the trained policy (whole distribution and renormalised) and of pre-alignment")
    views = judge.evaluate_dir(ckpt)
    trained = W.exact_policy(ckpt, prompts)
    pi_r, pi_g = (W.exact_policy(aligned[n], prompts) for n in ("pi_r", "pi_g"))
    s_r, s_g = np.log(pi_r.probs / ref.probs), np.log(pi_g.probs / ref.probs)
    lam_pre, target = margin_target(ref, s_r, s_g, margin, a.beta)
    pred, sol_ref = solution["predicted"], solution["reference"]
    # on the world's 64 responses: pi_r, pi_g against their targets pi_ref exp(u / beta) (how well DPO
    # recovered the utilities), PeCAN's exact answer on these implicit rewards (the gap pre-alignment
    # alone leaves) and the trained policy against that answer (sampling, the sample dual, training)
    views["renormalised"]["pre_alignment"] = {
        "kl_pi_r_to_target": pi_r.kl(tilt(ref, reward / a.beta)),
        "kl_pi_g_to_target": pi_g.kl(tilt(ref, safety / a.beta)),
        "exact_lambda": [lam_pre],
        "exact_target": summary(target, reward, safety, ref),
        "kl_exact_target_to_optimum": target.kl(judge.opt_set),
        "kl_trained_to_exact_target": trained.kl(target),
    }
    report = {
        "algo": "pecan",
        "objective": a.objective,
        "flags": run_flags(a),
        "threshold": a.threshold,
        "beta": a.beta,
        "lambda": solution["lam"],
        "reachable_safety": [float(np.mean(safety.max(axis=1)))],  # over the world's 64 responses
        # margin-form predictions moved to true units by the reference's true values
        "predicted": {"reward": ref_whole["reward"] + pred["reward"] - sol_ref["reward"],
                      "safety": [ref_whole["safety"] + pred["safety"][0]], "kl": pred["kl"]},  # fmt: skip
        "margin": margin,
        **views,
    }
    return finish(out, report, t0)
