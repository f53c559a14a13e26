"""MoCAN trainer step time over stock OpenRLHF DPOTrainer step time, side by side in one run.

Same model, same pairs, same flags; the runs alternate (stock, mocan, stock, mocan, ...) and the
step time is read from OpenRLHF's tensorboard events (wall-time differences between consecutive
steps, first steps dropped as warm-up), so start-up costs are excluded.

    python benchmarks/trainer_overhead.py [--rounds 2] [--pairs 256]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

from openrlhf_dual.launch import read_scalars, torchrun
from openrlhf_dual.tiny import build_tiny_lm, build_tokenizer

WORDS = [f"w{i}" for i in range(200)]


def make_inputs(root: Path, pairs: int) -> tuple[Path, Path]:
    tok = build_tokenizer(root / "model", WORDS)
    build_tiny_lm(root / "model", tok, hidden_size=256, num_layers=4, num_heads=4, max_positions=256)
    rng = random.Random(0)
    prep = root / "prep"
    prep.mkdir()
    (prep / "dual.json").write_text(json.dumps({"lam": [0.7], "beta": 0.1}))
    with open(prep / "pairs.jsonl", "w") as f:
        for _ in range(pairs):
            text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
            f.write(json.dumps({
                "prompt": text(32), "chosen": text(64), "rejected": text(64),
                "chosen_reward": rng.gauss(0, 1), "chosen_safety": [rng.gauss(0, 1)],
                "rejected_reward": rng.gauss(0, 1), "rejected_safety": [rng.gauss(0, 1)],
            }) + "\n")  # fmt: skip
    return root / "model", prep


def step_times(tb: Path, warmup: int = 3) -> list[float]:
    walls = [w for _, w, _ in read_scalars(tb, "train/loss")]
    return [b - a for a, b in zip(walls[warmup:], walls[warmup + 1 :])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pairs", type=int, default=256)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, prep = make_inputs(root, a.pairs)
        common = [
            "--model.model_name_or_path", str(model), "--data.dataset", str(prep / "pairs.jsonl"),
            "--data.prompt_key", "prompt", "--data.max_len", "256", "--ds.attn_implementation", "eager",
            "--ds.zero_stage", "2", "--train.micro_batch_size", "8", "--train.batch_size", "16",
            "--train.max_epochs", "1", "--logger.logging_steps", "1",
        ]  # fmt: skip
        runs = {
            "stock DPOTrainer": ("openrlhf.cli.train_dpo", []),
            "MoCANTrainer": ("openrlhf_dual.cli.train_dpo", ["--dual.algo", "mocan", "--dual.prep_dir", str(prep)]),
        }
        times = {name: [] for name in runs}
        for r in range(a.rounds):
            for name, (module, extra) in runs.items():
                tb = root / f"tb-{r}-{module}"
                out = root / f"ckpt-{r}-{module}"
                proc = torchrun(module, [*common, "--logger.tensorboard_dir", str(tb), "--ckpt.output_dir", str(out), *extra])
                if proc.returncode != 0:
                    raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
                times[name] += step_times(tb)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{'trainer':<20}{'steps':>7}{'median step s':>16}")
    for name, t in times.items():
        print(f"{name:<20}{len(t):>7}{med[name]:>16.4f}")
    print(f"ratio MoCAN / stock: {med['MoCANTrainer'] / med['stock DPOTrainer']:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
