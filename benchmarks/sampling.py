"""prepare's vLLM sampling against a bare vLLM `LLM.generate`, side by side in one run.

    python benchmarks/sampling.py [--prompts 64] [--k 16] [--max-new-tokens 32]   (in .venv-vllm: make bench-sampling)

Both sample the same prompts, K and lengths with the same engine settings (model, bf16, KV-cache
fraction, eager mode, per-prompt seeds): prepare's path is `ReferenceSampler("vllm")`, i.e.
OpenRLHF's `create_vllm_engines` engine (AsyncLLM in a Ray actor on a logical/real GPU) fed one
request per prompt; the bare path is `vllm.LLM.generate` on every prompt at once in this process.
The HF backend (one Ray actor) samples the same prompts beside them. Engine start-up is not timed;
each path is warmed up once, then the best of `--repeats` is kept. The model is a random-init
Llama built in-process (head_dim 64; vLLM's CPU attention takes 32 and up). Last line: the ratio of
prepare's throughput to the bare one (target >= 0.9).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ENGINE = dict(gpu_memory_utilization=0.1, enforce_eager=True)


def build_model(path: Path, hidden: int, layers: int, words: int) -> None:
    from openrlhf_dual.tiny import build_tiny_lm, build_tokenizer

    tok = build_tokenizer(path, [f"w{i}" for i in range(words)])
    build_tiny_lm(path, tok, hidden_size=hidden, num_layers=layers, num_heads=hidden // 64, max_positions=256)


def best_of(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bare_vllm(model: str, prompts: list[str], config, repeats: int) -> tuple[float, int]:
    """vllm.LLM.generate of every prompt at once (the same SamplingParams as prepare's): seconds, tokens."""
    from transformers import AutoTokenizer
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from openrlhf_dual.sampling import prompt_token_ids
    from openrlhf_dual.sampling.vllm import sampling_params

    tok = AutoTokenizer.from_pretrained(model)
    llm = LLM(model=model, dtype="bfloat16", seed=config.seed, **ENGINE)
    inputs = [TokensPrompt(prompt_token_ids=prompt_token_ids(tok, p)) for p in prompts]
    params = [sampling_params(config, i) for i in range(len(prompts))]
    seconds, outs = best_of(lambda: llm.generate(inputs, params, use_tqdm=False), repeats)
    return seconds, sum(len(c.token_ids) for o in outs for c in o.outputs)


def sampler(backend: str, model: str, prompts: list[str], config, repeats: int) -> tuple[float, int]:
    """ReferenceSampler (what prepare runs) on one engine / one actor: seconds, tokens."""
    from openrlhf_dual.sampling import ReferenceSampler

    kw = {f"vllm_{k}": v for k, v in ENGINE.items()} if backend == "vllm" else {}
    with ReferenceSampler(backend, model, 1, config, **kw) as s:
        seconds, out = best_of(lambda: s.sample(prompts, list(range(len(prompts)))), repeats)
    return seconds, sum(len(r.token_ids) for per in out for r in per)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--words", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()

    from openrlhf_dual.launch import ray_cluster
    from openrlhf_dual.sampling import SamplingConfig

    config = SamplingConfig(n=a.k, max_new_tokens=a.max_new_tokens, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "lm")
        build_model(Path(model), a.hidden, a.layers, a.words)
        prompts = [f"user : w{i} w{2 * i + 1} w{3 * i + 2} assistant :" for i in range(a.prompts)]
        with ray_cluster(num_gpus=1):
            ours = sampler("vllm", model, prompts, config, a.repeats)
            hf = sampler("hf", model, prompts, config, 1)
        bare = bare_vllm(model, prompts, config, a.repeats)

    print(f"model: Llama hidden {a.hidden}, {a.layers} layers, vocab ~{a.words}; {a.prompts} prompts x K = {a.k}, "
          f"up to {a.max_new_tokens} new tokens; best of {a.repeats} after a warm-up (HF: 1)")  # fmt: skip
    for name, (seconds, tokens) in [("bare vLLM LLM.generate", bare), ("prepare (vllm backend)", ours),
                                    ("prepare (hf backend)", hf)]:  # fmt: skip
        print(f"{name:24s} {seconds:8.2f} s  {a.prompts * a.k / seconds:9.1f} samples/s  {tokens / seconds:9.1f} tokens/s")
    assert abs(ours[1] - bare[1]) <= 0.01 * bare[1], f"different work: {ours[1]} tokens through prepare, {bare[1]} bare"
    print(f"prepare / bare vLLM throughput ratio: {bare[0] / ours[0]:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
