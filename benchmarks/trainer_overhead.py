"""Step time of each CAN primal step over stock OpenRLHF DPOTrainer step time, side by side in one run.

Same model and the same texts for every trainer: 256 pairs (prompt of 32 words, responses of 64)
for the DPO trainers (stock DPOTrainer; MoCANTrainer, the paper's pseudo-preference DPO; the same
with --dual.anchor), and their 512 responses as prepare-style samples for the SFT trainers (stock
SFTTrainer on the same texts; WeightedLikelihoodTrainer). A DPO step takes 16 pairs (32 sequences
through the policy and 32 through the reference), an SFT step 32 sequences (policy only). The runs
alternate round by round, and the step time is read from OpenRLHF's tensorboard events (wall-time
differences between consecutive steps, first steps dropped as warm-up), so start-up costs are
excluded.

    python benchmarks/trainer_overhead.py [--rounds 2] [--pairs 256]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

import numpy as np

from openrlhf_dual.artifacts import write_jsonl
from openrlhf_dual.launch import read_scalars, torchrun
from openrlhf_dual.tiny import build_tiny_lm, build_tokenizer

WORDS = [f"w{i}" for i in range(200)]


def make_inputs(root: Path, pairs: int) -> tuple[Path, Path, Path]:
    """(model dir, prep dir with pairs and scored samples, plain SFT dataset)."""
    tok = build_tokenizer(root / "model", WORDS)
    build_tiny_lm(root / "model", tok, hidden_size=256, num_layers=4, num_heads=4, max_positions=256)
    rng = random.Random(0)
    prep = root / "prep"
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    rows, prompts, samples, scores = [], [], [], []
    for i in range(pairs):
        prompt, chosen, rejected = text(32), text(64), text(64)
        s = [[rng.gauss(0, 1), rng.gauss(0, 1)] for _ in range(2)]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_reward": s[0][0],
                     "chosen_safety": [s[0][1]], "rejected_reward": s[1][0], "rejected_safety": [s[1][1]]})  # fmt: skip
        prompts.append({"id": i, "raw": prompt, "prompt": prompt})
        ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in (chosen, rejected)]
        samples.append({"id": i, "responses": [{"text": t, "token_ids": x, "finished": True} for t, x in zip((chosen, rejected), ids)]})
        scores.append(s)
    write_jsonl(prep / "pairs.jsonl", rows)
    write_jsonl(prep / "prompts.jsonl", prompts)
    write_jsonl(prep / "samples" / "shard-00000.jsonl", samples)
    (prep / "scores").mkdir()
    np.save(prep / "scores" / "shard-00000.npy", np.array(scores))
    (prep / "dual.json").write_text(json.dumps({"lam": [0.7], "beta": 0.1, "form": "model"}))
    write_jsonl(root / "sft.jsonl", [{"input": r["prompt"], "output": t} for r in rows for t in (r["chosen"], r["rejected"])])
    return root / "model", prep, root / "sft.jsonl"


def step_times(tb: Path, tag: str, warmup: int = 3) -> list[float]:
    walls = [w for _, w, _ in read_scalars(tb, tag)]
    return [b - a for a, b in zip(walls[warmup:], walls[warmup + 1 :])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pairs", type=int, default=256)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, prep, sft = make_inputs(root, a.pairs)
        common = [
            "--model.model_name_or_path", str(model), "--data.max_len", "256", "--ds.attn_implementation", "eager",
            "--ds.zero_stage", "2", "--train.max_epochs", "1", "--logger.logging_steps", "1",
        ]  # fmt: skip
        dpo = ["--data.dataset", str(prep / "pairs.jsonl"), "--data.prompt_key", "prompt", "--train.micro_batch_size", "8",
               "--train.batch_size", "16"]  # fmt: skip
        sft_flags = ["--train.micro_batch_size", "16", "--train.batch_size", "32"]
        dual = ["--dual.algo", "mocan", "--dual.prep_dir", str(prep)]
        runs = {  # name: (module, flags, tensorboard tag logged every step)
            "stock DPOTrainer": ("openrlhf.cli.train_dpo", [*dpo], "train/loss"),
            "MoCANTrainer (DPO)": ("openrlhf_dual.cli.train_dpo", [*dpo, *dual], "train/loss"),
            "MoCANTrainer (DPO + anchor)": ("openrlhf_dual.cli.train_dpo", [*dpo, *dual, "--dual.anchor", "1.0"], "train/loss"),
            "stock SFTTrainer": ("openrlhf.cli.train_sft", [*sft_flags, "--data.dataset", str(sft), "--data.input_key", "input",
                                                           "--data.output_key", "output", "--data.input_template", "{} "],
                                 "train/gpt_loss"),  # fmt: skip
            "WeightedLikelihoodTrainer": ("openrlhf_dual.cli.train_sft", [*sft_flags, *dual], "train/gpt_loss"),
        }
        times = {name: [] for name in runs}
        for r in range(a.rounds):
            for i, (name, (module, extra, tag)) in enumerate(runs.items()):
                tb, out = root / f"tb-{r}-{i}", root / f"ckpt-{r}-{i}"
                proc = torchrun(module, [*common, "--logger.tensorboard_dir", str(tb), "--ckpt.output_dir", str(out), *extra])
                if proc.returncode != 0:
                    raise SystemExit(f"{name}:\n" + proc.stdout[-3000:] + proc.stderr[-3000:])
                times[name] += step_times(tb, tag)
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med["stock DPOTrainer"]
    print(f"{'trainer':<30}{'steps':>7}{'median step s':>16}{'/ stock DPO':>13}")
    for name, t in times.items():
        print(f"{name:<30}{len(t):>7}{med[name]:>16.4f}{med[name] / base:>12.3f}x")
    print(f"MoCAN (DPO) / stock DPO: {med['MoCANTrainer (DPO)'] / base:.3f} (target <= 1.05); weighted likelihood / "
          f"stock SFT: {med['WeightedLikelihoodTrainer'] / med['stock SFTTrainer']:.3f}; a DPO step: 16 pairs = 32 "
          f"sequences through the policy and 32 through the reference; an SFT step: 32 sequences through the policy")


if __name__ == "__main__":
    main()
