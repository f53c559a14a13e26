"""Throughput of the dual-preprocessing step on CPU, per stage, and the share of its wall time
spent outside generation and scoring (Ray start, model loading, I/O, the dual, pairs).

One prepare run on a tiny random Llama (hf backend, local Ray) with a Python reward file and a
Safe-RLHF-format score model built here, N prompts x K samples.

    python benchmarks/prepare.py [--prompts 64] [--samples 32] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from openrlhf_dual.prep import PrepConfig, run_prepare
from openrlhf_dual.tiny import build_tiny_lm, build_tokenizer

WORDS = [f"w{i}" for i in range(60)]
REWARD = "def reward_func(queries, prompts, labels):\n    return {'rewards': [len(q) - len(p) for q, p in zip(queries, prompts)]}\n"


def safe_rlhf_cost_model(lm_dir: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    head = torch.nn.Linear(lm.config.hidden_size, 1)
    weights = {f"model.{k}": v.contiguous() for k, v in lm.model.state_dict().items()}
    weights.update({f"score_head.{k}": v.contiguous() for k, v in head.state_dict().items()})
    out.mkdir()
    save_file(weights, out / "model.safetensors")
    cfg = lm.config.to_dict()
    cfg.update(architectures=["LlamaModelForScore"], bias=True)
    (out / "config.json").write_text(json.dumps(cfg))
    for f in lm_dir.glob("*token*"):
        shutil.copy(f, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = build_tokenizer(root / "ref", WORDS)
        build_tiny_lm(root / "ref", tok, hidden_size=64, num_layers=2)
        cost = safe_rlhf_cost_model(root / "ref", root / "cost")
        (root / "reward.py").write_text(REWARD)
        (root / "prompts.jsonl").write_text("".join(json.dumps({"input": f"{WORDS[i % 60]} {WORDS[(7 * i) % 60]}"}) + "\n" for i in range(a.prompts)))
        t0 = time.perf_counter()
        run_prepare(PrepConfig(
            prep_dir=str(root / "prep"), ref_model=str(root / "ref"), prompt_dataset=str(root / "prompts.jsonl"),
            reward=f"file:{root / 'reward.py'}", safety=(f"safe_rlhf:{cost},sign=-1",), thresholds=(-1e9,),
            max_samples=a.prompts, n_samples=a.samples, max_new_tokens=a.max_new_tokens, shard_size=16,
        ))  # fmt: skip
        wall = time.perf_counter() - t0
        stages = json.loads((root / "prep" / "manifest.json").read_text())["stages"]
    n = a.prompts * a.samples
    other = wall - stages["sample_seconds"] - stages["score_seconds"]
    print(f"{n} responses ({a.prompts} prompts x {a.samples}, <= {a.max_new_tokens} new tokens), wall {wall:.1f} s")
    print(f"  sampling (hf actor)          {n / stages['sample_seconds']:8.1f} responses/s")
    print(f"  scoring (file + safe_rlhf)   {n / stages['score_seconds']:8.1f} responses/s")
    print(f"  outside sampling and scoring {other:8.1f} s = {100 * other / wall:.1f}% of wall (target < 5%)")


if __name__ == "__main__":
    main()
