"""Steps shared by the MoCAN and PeCAN demos (and benchmarks/primal_dual.py): the fitted reference,
the dual step, training runs under torchrun (DPO, or the weighted-likelihood primal step on
OpenRLHF's SFT trainer), the report."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from openrlhf_dual.artifacts import write_json, write_jsonl
from openrlhf_dual.demo import world as W
from openrlhf_dual.launch import torchrun

DPO_BATCH = 32  # pairs per optimizer step in the demos' DPO runs (--train.batch_size)
LIKELIHOOD_BATCH = 64  # samples per optimizer step of the weighted-likelihood step
LIKELIHOOD_LR = 3e-3
OBJECTIVES = ("likelihood", "dpo")  # the primal step: weighted likelihood (default) or the paper's DPO
EPOCHS = {"likelihood": 2, "dpo": 3}  # of the primal step; PeCAN's pre-alignment DPO runs use EPOCHS["dpo"]


def build_reference(out: Path, n_prompts: int, seed: int, hidden_size: int = 32) -> tuple[Path, list[str]]:
    """The tiny Llama fitted to the toy world, its prompts (also as data/prompts.jsonl) and the
    toy reward and constraints (W.CONSTRAINT_FILES) as reward files. Returns (reference dir, raw
    prompts). vLLM's CPU attention needs head_dim >= 32: hidden_size 64 (2 heads) loads there and
    fits the world as well as the default 32 (at hidden 128, or 64 with one head, the fit
    misplaces EOS)."""
    from openrlhf_dual.tiny import build_tiny_lm, build_tokenizer

    ref_dir = out / "reference"
    tok = build_tokenizer(ref_dir, W.TOPIC_WORDS + [W.RISKY] + list(W.RESPONSE_WORDS))
    build_tiny_lm(ref_dir, tok, hidden_size=hidden_size, seed=seed)
    prompts = W.make_prompts(n_prompts, seed)
    W.fit_reference(ref_dir, prompts, seed=seed)
    write_jsonl(out / "data" / "prompts.jsonl", [{"input": x} for x in prompts])
    (out / "reward.py").write_text(W.REWARD_FILE)
    for name, text in W.CONSTRAINT_FILES:
        (out / name).write_text(text)
    return ref_dir, prompts


def prepare(out: Path, ref_dir: Path, reward: str, safety: str | Sequence[str], threshold: float | Sequence[float],
            beta: float, n_prompts: int, n_samples: int, seed: int, algo: str = "mocan") -> dict:  # fmt: skip
    """The dual step on the world's prompts (out/data/prompts.jsonl) into out/prep, with one safety
    source and threshold, or one of each per constraint; returns dual.json."""
    from openrlhf_dual.prep import PrepConfig, run_prepare

    safety = (safety,) if isinstance(safety, str) else tuple(safety)
    thresholds = tuple(float(b) for b in np.atleast_1d(threshold))
    return run_prepare(
        PrepConfig(
            prep_dir=str(out / "prep"), ref_model=str(ref_dir), prompt_dataset=str(out / "data" / "prompts.jsonl"),
            reward=reward, safety=safety, thresholds=thresholds, beta=beta, algo=algo, apply_chat_template=True,
            max_samples=n_prompts, n_samples=n_samples, max_new_tokens=W.RESPONSE_LEN + 1, seed=seed, shard_size=16,
        )
    )  # fmt: skip


def primal_step(out: Path, name: str, a, ref_dir: Path, algo: str, extra: list[str] = ()) -> Path:
    """CAN's one training run on the prep directory out/prep, with the demo's objective
    (a.objective: weighted likelihood, or the paper's DPO with optional anchor a.anchor)."""
    flags = ["--dual.algo", algo, "--dual.prep_dir", str(out / "prep"), *extra]
    if a.objective == "likelihood":
        return likelihood(out, name, ref_dir, a.epochs, flags)
    anchor = ["--dual.anchor", str(a.anchor)] if a.anchor else []
    return dpo(out, name, "openrlhf_dual.cli.train_dpo", ref_dir, a.beta, a.epochs, [*flags, *anchor])


def dpo(out: Path, name: str, module: str, ref_dir: Path, beta: float, epochs: int, extra: list[str]) -> Path:
    """One DPO run with OpenRLHF's trainer (`module`: openrlhf.cli.train_dpo or ours): torchrun,
    2 ranks, DeepSpeed ZeRO-2, on CPU here. Returns the HF checkpoint directory."""
    return _run(out, name, module, [
        "--model.model_name_or_path", str(ref_dir), "--model.beta", str(beta),
        "--train.micro_batch_size", "16", "--train.batch_size", str(DPO_BATCH), "--train.max_epochs", str(epochs),
        "--adam.lr", "3e-3", "--lr_warmup_ratio", "0.05", *extra,
    ])  # fmt: skip


def likelihood(out: Path, name: str, ref_dir: Path, epochs: int, extra: list[str], lr: float = LIKELIHOOD_LR) -> Path:
    """One weighted-likelihood run (openrlhf_dual.cli.train_sft on prepare's samples; pass
    --dual.algo and --dual.prep_dir in `extra`) with OpenRLHF's SFT trainer, set up like `dpo`."""
    return _run(out, name, "openrlhf_dual.cli.train_sft", [
        "--model.model_name_or_path", str(ref_dir),
        "--train.micro_batch_size", str(LIKELIHOOD_BATCH // 2), "--train.batch_size", str(LIKELIHOOD_BATCH),
        "--train.max_epochs", str(epochs), "--adam.lr", str(lr), "--lr_warmup_ratio", "0.05", *extra,
    ])  # fmt: skip


def _run(out: Path, name: str, module: str, args: list[str]) -> Path:
    ckpt = out / name
    args = [
        "--ds.zero_stage", "2", "--ds.attn_implementation", "eager", "--ds.param_dtype", "bf16", "--data.max_len", "64",
        "--ckpt.output_dir", str(ckpt), "--logger.logging_steps", "1",
        "--logger.tensorboard_dir", str(out / "tensorboard" / name), *args,
    ]  # fmt: skip
    proc = torchrun(module, args)
    log = out / f"{name}.log"
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{name} training failed (exit {proc.returncode}); see {log}")
    return ckpt


def run_flags(a) -> dict:
    """The flags that fix a MoCAN or PeCAN demo's world, samples and training, as report.json
    records them (what `--calibrate` checks before it continues the demo)."""
    return {"seed": a.seed, "prompts": a.prompts, "samples": a.samples, "epochs": a.epochs, "objective": a.objective,
            "anchor": a.anchor, "pairs": a.pairs, "constraints": a.constraints, "beta": a.beta,
            "thresholds": np.atleast_1d(a.threshold).tolist()}  # fmt: skip


def finish(out: Path, report: dict, t0: float) -> dict:
    """Write report.json and print the comparison with the exact optimum, whole distribution
    first, then the renormalised view."""
    report["seconds"] = round(time.time() - t0, 1)
    write_json(out / "report.json", report)
    w, r = report["whole"], report["renormalised"]
    got, opt, ref = w["achieved"], w["optimum"], w["reference"]

    def span(x, fmt="+.3f"):
        return f"[{x[0]:{fmt}}, {x[1]:{fmt}}]"

    thresholds = report["thresholds"] if "thresholds" in report else [report["threshold"]]
    lines = [
        f"  threshold {b:+.3f}: {W.CONSTRAINTS[j].__name__.removeprefix('toy_')} reference {span(ref['safety'][j])} -> "
        f"achieved {span(got['safety'][j])} (optimum {span(opt['safety'][j])}); lambda from samples "
        f"{report['lambda'][j]:.4f} vs exact {opt['lambda'][j]:.4f}\n"
        for j, b in enumerate(thresholds)
    ]
    wrote = " and ".join(str(out / f) for f in ("report.json", "frontier.png", "constraints.png") if (out / f).exists())
    print(
        f"\nwhole distribution (every response up to {w['generation_cap']} tokens; intervals bound what the "
        f"enumeration did not reach):\n"
        + "".join(lines) +
        f"  reward {span(ref['reward'])} -> {span(got['reward'])} (optimum {span(opt['reward'])})\n"
        f"  mass on the world's 64 responses: reference {ref['mass_on_set'][0]:.2%}, optimum {opt['mass_on_set'][0]:.2%}, "
        f"trained {got['mass_on_set'][0]:.2%} (worst prompt {got['mass_on_set_min_prompt']:.2%})\n"
        f"  KL(trained || optimum) {span(w['kl_to_optimum'], '.4f')} vs KL(reference || optimum) "
        f"{span(w['kl_ref_to_optimum'], '.4f')}\n"
        f"renormalised to the 64 responses (blind to mass leaving them): KL(trained || optimum) "
        f"{r['kl_to_optimum']:.4f} vs {r['kl_ref_to_optimum']:.4f}, safety "
        + ", ".join(f"{x:+.3f}" for x in r["achieved"]["safety"]) +
        f"\nwrote {wrote} in {report['seconds']} s"
    )  # fmt: skip
    return report
