"""Steps shared by the MoCAN and PeCAN demos (and benchmarks/primal_dual.py): the fitted reference,
the dual step, DPO runs under torchrun, the exact constrained optimum and exact summaries of a
policy, the report."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from openrlhf_dual.artifacts import write_json, write_jsonl
from openrlhf_dual.demo import world as W
from openrlhf_dual.launch import torchrun

DPO_BATCH = 32  # pairs per optimizer step in the demos' DPO runs (--train.batch_size)


def build_reference(out: Path, n_prompts: int, seed: int, hidden_size: int = 32) -> tuple[Path, list[str]]:
    """The tiny Llama fitted to the toy world, its prompts (also as data/prompts.jsonl) and the
    toy reward and safety as reward files. Returns (reference dir, raw prompts). vLLM's CPU
    attention needs head_dim >= 32: hidden_size 64 (2 heads) loads there and fits the world as
    well as the default 32 (at hidden 128, or 64 with one head, the fit misplaces EOS)."""
    from openrlhf_dual.tiny import build_tiny_lm, build_tokenizer

    ref_dir = out / "reference"
    tok = build_tokenizer(ref_dir, W.TOPIC_WORDS + [W.RISKY] + list(W.RESPONSE_WORDS))
    build_tiny_lm(ref_dir, tok, hidden_size=hidden_size, seed=seed)
    prompts = W.make_prompts(n_prompts, seed)
    W.fit_reference(ref_dir, prompts, seed=seed)
    write_jsonl(out / "data" / "prompts.jsonl", [{"input": x} for x in prompts])
    (out / "reward.py").write_text(W.REWARD_FILE)
    (out / "safety.py").write_text(W.SAFETY_FILE)
    return ref_dir, prompts


def tilt(ref: W.ExactPolicy, logits: np.ndarray) -> W.ExactPolicy:
    """pi_ref exp(logits) / Z per prompt; logits [P, 64] in nats."""
    x = logits + np.log(ref.probs)
    probs = np.exp(x - x.max(axis=1, keepdims=True))
    return W.ExactPolicy(probs / probs.sum(axis=1, keepdims=True))


def exact_optimum(ref: W.ExactPolicy, reward: np.ndarray, safety: np.ndarray, threshold: float, beta: float):
    """lambda* and pi_lambda* of the world itself (all responses, weighted by pi_ref), via the dual
    core: logmeanexp over responses of (r + beta log pi_ref + lam g) / beta is beta log E_ref[...] + const."""
    from openrlhf_dual.dual import solve_dual

    lam = float(solve_dual(reward + beta * np.log(ref.probs), safety, threshold, beta).lam[0])
    return lam, tilt(ref, (reward + lam * safety) / beta)


def prepare(out: Path, ref_dir: Path, reward: str, safety: str, threshold: float, beta: float, n_prompts: int,
            n_samples: int, seed: int, algo: str = "mocan") -> dict:  # fmt: skip
    """The dual step on the world's prompts (out/data/prompts.jsonl) into out/prep; returns dual.json."""
    from openrlhf_dual.prep import PrepConfig, run_prepare

    return run_prepare(
        PrepConfig(
            prep_dir=str(out / "prep"), ref_model=str(ref_dir), prompt_dataset=str(out / "data" / "prompts.jsonl"),
            reward=reward, safety=(safety,), thresholds=(threshold,), beta=beta, algo=algo, apply_chat_template=True,
            max_samples=n_prompts, n_samples=n_samples, max_new_tokens=W.RESPONSE_LEN + 1, seed=seed, shard_size=16,
        )
    )  # fmt: skip


def summary(policy: W.ExactPolicy, reward: np.ndarray, safety: np.ndarray, ref: W.ExactPolicy) -> dict:
    """Exact E[r], E[g] ([1]) and KL(policy || reference) in nats."""
    return {"reward": policy.expect(reward), "safety": [policy.expect(safety)], "kl": policy.kl(ref)}


def dpo(out: Path, name: str, module: str, ref_dir: Path, beta: float, epochs: int, extra: list[str]) -> Path:
    """One DPO run with OpenRLHF's trainer (`module`: openrlhf.cli.train_dpo or ours): torchrun,
    2 ranks, DeepSpeed ZeRO-2, on CPU here. Returns the HF checkpoint directory."""
    ckpt = out / name
    args = [
        "--model.model_name_or_path", str(ref_dir), "--model.beta", str(beta),
        "--ds.zero_stage", "2", "--ds.attn_implementation", "eager", "--ds.param_dtype", "bf16",
        "--train.micro_batch_size", "16", "--train.batch_size", str(DPO_BATCH), "--train.max_epochs", str(epochs),
        "--adam.lr", "3e-3", "--lr_warmup_ratio", "0.05", "--data.max_len", "64",
        "--ckpt.output_dir", str(ckpt), "--logger.logging_steps", "1",
        "--logger.tensorboard_dir", str(out / "tensorboard" / name), *extra,
    ]  # fmt: skip
    proc = torchrun(module, args)
    log = out / f"{name}.log"
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{name} training failed (exit {proc.returncode}); see {log}")
    return ckpt


def finish(out: Path, report: dict, t0: float, lam_from_samples: float) -> dict:
    """Write report.json and print the comparison with the exact optimum."""
    report["seconds"] = round(time.time() - t0, 1)
    write_json(out / "report.json", report)
    print(
        f"\nthreshold {report['threshold']:+.3f}: reference safety {report['reference']['safety'][0]:+.3f} -> "
        f"achieved {report['achieved']['safety'][0]:+.3f} (exact optimum {report['optimum']['safety'][0]:+.3f})\n"
        f"lambda from samples {lam_from_samples:.4f} vs exact {report['optimum']['lambda'][0]:.4f}; reward "
        f"{report['reference']['reward']:+.3f} -> {report['achieved']['reward']:+.3f} "
        f"(optimum {report['optimum']['reward']:+.3f})\n"
        f"KL(trained || optimum) = {report['kl_to_optimum']:.4f} vs KL(reference || optimum) = "
        f"{report['kl_ref_to_optimum']:.4f}\nwrote {out / 'report.json'} and {out / 'frontier.png'} "
        f"in {report['seconds']} s"
    )
    return report
