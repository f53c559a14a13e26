"""Peak memory and time of prepare after sampling (records, the dual, the frontier, pairs) as the
number of prompts N grows, on synthetic finished shards as a resumed prep directory holds them:
samples/shard-*.jsonl with K responses of T token ids and their text, scores/shard-*.npy, the
manifest. Each size is measured in a fresh subprocess (`run_prepare` on the finished directory;
peak RSS is that process's VmHWM, imports included), then deleted. The disk each size needs is
estimated first and a size that would take more than half the free space is refused.

    python benchmarks/prepare_scale.py [--sizes 1000 3000 30000] [--samples 128] [--tokens 256] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = [f"w{i}" for i in range(60)]
REWARD = "def reward_func(queries, prompts, labels):\n    return {'rewards': [0.0 for q in queries]}\n"
POOL = 1024  # distinct synthetic responses, drawn K at a time per prompt
SHARD_SIZE = 64


def response_pool(tokens: int, seed: int = 0) -> list[str]:
    """JSON of synthetic responses: T token ids of a 32k vocabulary and ~4 characters of text per token."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(POOL):
        ids = rng.integers(0, 32000, tokens).tolist()
        text = " ".join(WORDS[j % 60] for j in ids)
        out.append(json.dumps({"text": text, "token_ids": ids, "finished": bool(i % 7)}))
    return out


def estimate_bytes(n: int, k: int, tokens: int) -> int:
    """Samples as JSONL, plus pairs.jsonl (K/2 pairs a prompt, two texts each), plus scores."""
    pool = response_pool(tokens)
    per_response = np.mean([len(x) for x in pool[:64]])
    per_text = np.mean([len(json.loads(x)["text"]) for x in pool[:64]])
    return int(n * k * (per_response + per_text + 8 * 2) + n * (k // 2) * 200)


def write_prep(root: Path, n: int, k: int, tokens: int, ref: Path) -> dict:
    """A prep directory whose every shard is sampled and scored; returns its PrepConfig as a dict."""
    from openrlhf_dual.artifacts import write_jsonl, write_npy
    from openrlhf_dual.prep import SHARD, PrepConfig, open_manifest

    (root / "reward.py").write_text(REWARD)
    cfg = PrepConfig(
        prep_dir=str(root / "prep"), ref_model=str(ref), prompt_dataset="synthetic", reward=f"file:{root / 'reward.py'}",
        safety=(f"file:{root / 'reward.py'},sign=+1",), thresholds=(-0.5,), beta=0.1, max_samples=n, n_samples=k,
        max_new_tokens=tokens, shard_size=SHARD_SIZE,
    )  # fmt: skip
    open_manifest(cfg)
    prep = Path(cfg.prep_dir)
    write_jsonl(prep / "prompts.jsonl", ({"id": i, "raw": f"question {i}", "prompt": f"user : question {i} assistant : "}
                                         for i in range(n)))  # fmt: skip
    pool, rng = response_pool(tokens), np.random.default_rng(1)
    (prep / "samples").mkdir()
    for s in range(0, n, SHARD_SIZE):
        ids = range(s, min(n, s + SHARD_SIZE))
        with open(prep / "samples" / f"{SHARD.format(s // SHARD_SIZE)}.jsonl", "w") as f:
            for i in ids:
                picks = rng.integers(0, POOL, k)
                f.write(f'{{"id": {i}, "responses": [' + ", ".join(pool[j] for j in picks) + "]}\n")
        write_npy(prep / "scores" / f"{SHARD.format(s // SHARD_SIZE)}.npy", rng.normal(size=(len(ids), k, 2)))
    return dataclasses.asdict(cfg)


def measure(cfg: dict) -> None:
    """In a fresh process: run_prepare on a finished prep directory; prints a JSON line."""
    from openrlhf_dual.prep import PrepConfig, run_prepare

    cfg = PrepConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    t, cpu = time.perf_counter(), time.process_time()
    sol = run_prepare(cfg)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    peak = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak / 1024, "lam": sol["lam"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 30000], help="N prompts")
    p.add_argument("--samples", type=int, default=128, help="K responses per prompt")
    p.add_argument("--tokens", type=int, default=256, help="T token ids per response")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the synthetic prep directories go")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        return measure(json.loads(a.measure))
    from openrlhf_dual.tiny import build_tiny_lm, build_tokenizer

    free = shutil.disk_usage(a.dir).free
    need = {n: estimate_bytes(n, a.samples, a.tokens) for n in a.sizes}
    print(f"disk: {a.dir} has {free / 1e9:.1f} GB free; needed per size (one at a time): "
          + ", ".join(f"N={n}: {b / 1e9:.1f} GB" for n, b in need.items()), flush=True)  # fmt: skip
    if max(need.values()) > free / 2:
        sys.exit(f"refused: the largest size needs more than half the free space of {a.dir}; "
                 "use --dir elsewhere, fewer --sizes or fewer --tokens")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(dir=a.dir, prefix="prepare_scale_") as tmp:
        ref = Path(tmp) / "ref"  # the reference model is only identified, never loaded, after sampling
        build_tiny_lm(ref, build_tokenizer(ref, WORDS))
        for n in a.sizes:
            root = Path(tmp) / f"n{n}"
            root.mkdir()
            t = time.perf_counter()
            cfg = write_prep(root, n, a.samples, a.tokens, ref)
            wrote = time.perf_counter() - t
            on_disk = sum(f.stat().st_size for f in (root / "prep").rglob("*") if f.is_file())
            proc = subprocess.run([sys.executable, __file__, "--measure", json.dumps(cfg)], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"N={n}: prepare failed:\n{proc.stderr[-3000:]}")
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            pairs = (root / "prep" / "pairs.jsonl").stat().st_size
            rows.append((n, got["seconds"], got["cpu_seconds"], got["peak_rss_mb"], on_disk / 1e9))
            print(f"N={n}: wrote {on_disk / 1e9:.2f} GB of shards in {wrote:.0f} s; prepare {got['seconds']:.1f} s "
                  f"({got['cpu_seconds']:.1f} s CPU), "
                  f"peak RSS {got['peak_rss_mb']:.0f} MB, pairs.jsonl {pairs / 1e9:.2f} GB", flush=True)  # fmt: skip
            shutil.rmtree(root)
    print(f"\nprepare after sampling, K = {a.samples} responses of {a.tokens} token ids per prompt, "
          f"one fresh process per size (scores array: N x K x 2 float64):")  # fmt: skip
    print("(wall time depends on what else runs on the machine; CPU time of the prepare process does not)")
    print(f"{'N prompts':>10} {'shards GB':>10} {'wall s':>8} {'CPU s':>8} {'CPU s / 1k N':>13} {'peak RSS MB':>12} {'scores MB':>10}")
    for n, sec, cpu, rss, disk in rows:
        print(f"{n:>10} {disk:>10.2f} {sec:>8.1f} {cpu:>8.1f} {1000 * cpu / n:>13.2f} {rss:>12.0f} {n * a.samples * 2 * 8 / 1e6:>10.1f}")
    n, _, _, rss, _ = rows[-1]
    print(f"largest size: N = {n} prompts x K = {a.samples} x {a.tokens} tokens: peak RSS {rss:.0f} MB "
          f"({'within' if rss <= 2048 else 'OVER'} the 2 GB target)")


if __name__ == "__main__":
    main()
