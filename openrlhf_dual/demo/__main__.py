"""The embedded default: MoCAN end to end on the enumerable toy world, checked against the exact
constrained optimum.

    python -m openrlhf_dual.demo --out DIR [--seed N] [--dual.threshold B]

Steps: build and fit the tiny reference LM; prepare on a local Ray (hf sampling actors, the toy
reward and safety scored through the real reward-file adapter, the dual, pairs); MoCAN training
with the real OpenRLHF DPO trainer under torchrun (2 ranks, ZeRO-2); exact evaluation of the
trained checkpoint by enumerating every response. Writes DIR/report.json and DIR/frontier.png.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from openrlhf_dual.artifacts import write_json, write_jsonl
from openrlhf_dual.demo import world as W
from openrlhf_dual.launch import torchrun


def exact_optimum(ref: W.ExactPolicy, reward: np.ndarray, safety: np.ndarray, threshold: float, beta: float):
    """lambda* and pi_lambda* of the world itself (all responses, weighted by pi_ref), via the dual
    core: logmeanexp over responses of (r + beta log pi_ref + lam g) / beta is beta log E_ref[...] + const."""
    from openrlhf_dual.dual import solve_dual

    tilted = reward + beta * np.log(ref.probs)
    sol = solve_dual(tilted, safety, threshold, beta)
    logits = (tilted + sol.lam[0] * safety) / beta
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return float(sol.lam[0]), W.ExactPolicy(probs / probs.sum(axis=1, keepdims=True))


def summary(policy: W.ExactPolicy, reward: np.ndarray, safety: np.ndarray, ref: W.ExactPolicy) -> dict:
    return {"reward": policy.expect(reward), "safety": [policy.expect(safety)], "kl": policy.kl(ref)}


def train(out: Path, prep: Path, ref_dir: Path, beta: float, epochs: int) -> Path:
    """MoCAN with OpenRLHF's DPO trainer: torchrun, 2 ranks, DeepSpeed ZeRO-2, on CPU here."""
    ckpt = out / "mocan"
    args = [
        "--model.model_name_or_path", str(ref_dir), "--model.beta", str(beta),
        "--ds.zero_stage", "2", "--ds.attn_implementation", "eager", "--ds.param_dtype", "bf16",
        "--train.micro_batch_size", "16", "--train.batch_size", "32", "--train.max_epochs", str(epochs),
        "--adam.lr", "3e-3", "--lr_warmup_ratio", "0.05", "--data.max_len", "64",
        "--ckpt.output_dir", str(ckpt), "--logger.logging_steps", "1",
        "--logger.tensorboard_dir", str(out / "tensorboard"),
        "--dual.algo", "mocan", "--dual.prep_dir", str(prep),
    ]  # fmt: skip
    proc = torchrun("openrlhf_dual.cli.train_dpo", args)
    (out / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"training failed (exit {proc.returncode}); see {out / 'train.log'}")
    return ckpt


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dual.threshold", dest="threshold", type=float, default=0.5, help="E[safety] >= B")
    p.add_argument("--dual.beta", dest="beta", type=float, default=0.5)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=128, help="K reference samples per prompt")
    p.add_argument("--epochs", type=int, default=3)
    a = p.parse_args(argv)
    t0 = time.time()
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    ref_dir, prep = out / "reference", out / "prep"

    from openrlhf_dual.prep import PrepConfig, run_prepare
    from openrlhf_dual.tiny import build_tiny_lm, build_tokenizer

    print(f"[1/4] reference: tiny Llama fitted to the toy world ({a.prompts} prompts, 64 responses each)")
    tok = build_tokenizer(ref_dir, W.TOPIC_WORDS + [W.RISKY] + list(W.RESPONSE_WORDS))
    build_tiny_lm(ref_dir, tok, seed=a.seed)
    prompts = W.make_prompts(a.prompts, a.seed)
    W.fit_reference(ref_dir, prompts, seed=a.seed)
    write_jsonl(out / "data" / "prompts.jsonl", [{"input": x} for x in prompts])
    (out / "reward.py").write_text(W.REWARD_FILE)
    (out / "safety.py").write_text(W.SAFETY_FILE)

    ref = W.exact_policy(ref_dir, prompts)
    reward, safety = W.score_table(prompts)
    lam_opt, opt = exact_optimum(ref, reward, safety, a.threshold, a.beta)

    print(f"[2/4] prepare: {a.samples} samples per prompt on a local Ray, scored, dual solved, pairs written")
    solution = run_prepare(
        PrepConfig(
            prep_dir=str(prep), ref_model=str(ref_dir), prompt_dataset=str(out / "data" / "prompts.jsonl"),
            reward=f"file:{out / 'reward.py'}", safety=(f"file:{out / 'safety.py'},sign=+1",),
            thresholds=(a.threshold,), beta=a.beta, apply_chat_template=True, max_samples=a.prompts,
            n_samples=a.samples, max_new_tokens=W.RESPONSE_LEN + 1, seed=a.seed, shard_size=16,
        )
    )  # fmt: skip
    shutil.copy(prep / "frontier.png", out / "frontier.png")

    print(f"[3/4] MoCAN: OpenRLHF DPO trainer on pseudo-preferences, lambda = {solution['lam'][0]:.4f}")
    ckpt = train(out, prep, ref_dir, a.beta, a.epochs)

    print("[4/4] exact evaluation of the trained policy by enumeration")
    trained = W.exact_policy(ckpt, prompts)
    report = {
        "threshold": a.threshold,
        "beta": a.beta,
        "lambda": solution["lam"],
        "reference": {"reward": ref.expect(reward), "safety": [ref.expect(safety)]},
        "reachable_safety": [float(np.mean(safety.max(axis=1)))],
        "predicted": {k: solution["predicted"][k] for k in ("reward", "safety", "kl")},
        "optimum": {"lambda": [lam_opt], **summary(opt, reward, safety, ref)},
        "achieved": summary(trained, reward, safety, ref),
        "kl_to_optimum": trained.kl(opt),
        "kl_ref_to_optimum": ref.kl(opt),
        "seconds": round(time.time() - t0, 1),
    }
    write_json(out / "report.json", report)
    print(
        f"\nthreshold {a.threshold:+.3f}: reference safety {report['reference']['safety'][0]:+.3f} -> "
        f"achieved {report['achieved']['safety'][0]:+.3f} (exact optimum {report['optimum']['safety'][0]:+.3f})\n"
        f"lambda from samples {solution['lam'][0]:.4f} vs exact {lam_opt:.4f}; reward "
        f"{report['reference']['reward']:+.3f} -> {report['achieved']['reward']:+.3f} "
        f"(optimum {report['optimum']['reward']:+.3f})\n"
        f"KL(trained || optimum) = {report['kl_to_optimum']:.4f} vs KL(reference || optimum) = "
        f"{report['kl_ref_to_optimum']:.4f}\nwrote {out / 'report.json'} and {out / 'frontier.png'} "
        f"in {report['seconds']} s"
    )
    return report


if __name__ == "__main__":
    main()
