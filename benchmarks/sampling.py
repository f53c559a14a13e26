"""prepare's vLLM sampling against a bare vLLM `LLM.generate`, side by side in one run.

    python benchmarks/sampling.py [--prompts 64] [--k 16] [--max-new-tokens 32]   (in .venv-vllm: make bench-sampling)

Both sample the same prompts, K and lengths with the same engine settings (model, bf16, KV-cache
fraction, eager mode, per-prompt seeds): prepare's path is `ReferenceSampler("vllm")`, i.e.
OpenRLHF's `create_vllm_engines` engine (AsyncLLM in a Ray actor on a logical/real GPU) fed one
request per prompt; the bare path is `vllm.LLM.generate` on every prompt at once in this process.
Both engines are up at once and timed alternately, so a machine busy with other work slows both
alike; engine start-up is not timed; each is warmed up once, then the best of `--repeats` is kept.
The HF backend (one Ray actor) samples the same prompts beside them. The model is a random-init
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


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def side_by_side(model: str, prompts: list[str], config, repeats: int) -> tuple[tuple[float, int], tuple[float, int]]:
    """prepare's path (ReferenceSampler on OpenRLHF's engine) and a bare `vllm.LLM.generate` of the
    same requests, both engines up at once and timed alternately (so a busy machine slows both
    alike); best of `repeats` after a warm-up each. Returns ((seconds, tokens) ours, bare)."""
    from transformers import AutoTokenizer
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from openrlhf_dual.sampling import ReferenceSampler, prompt_token_ids
    from openrlhf_dual.sampling.vllm import sampling_params

    tok = AutoTokenizer.from_pretrained(model)
    inputs = [TokensPrompt(prompt_token_ids=prompt_token_ids(tok, p)) for p in prompts]
    params = [sampling_params(config, i) for i in range(len(prompts))]
    engine = {f"vllm_{k}": v for k, v in ENGINE.items()}
    with ReferenceSampler("vllm", model, 1, config, **engine) as ours:
        llm = LLM(model=model, dtype="bfloat16", seed=config.seed, **ENGINE)
        try:
            run_ours = lambda: ours.sample(prompts, list(range(len(prompts))))  # noqa: E731
            run_bare = lambda: llm.generate(inputs, params, use_tqdm=False)  # noqa: E731
            run_ours(), run_bare()  # warm-up
            t_ours, t_bare = [], []
            for _ in range(repeats):
                t, out_ours = timed(run_ours)
                t_ours.append(t)
                t, out_bare = timed(run_bare)
                t_bare.append(t)
        finally:
            llm.llm_engine.engine_core.shutdown()  # else its engine-core process outlives this script
    tokens_ours = sum(len(r.token_ids) for per in out_ours for r in per)
    tokens_bare = sum(len(c.token_ids) for o in out_bare for c in o.outputs)
    return (min(t_ours), tokens_ours), (min(t_bare), tokens_bare)


def hf_backend(model: str, prompts: list[str], config) -> tuple[float, int]:
    """ReferenceSampler("hf"), one actor, once after a warm-up prompt: seconds, tokens."""
    from openrlhf_dual.sampling import ReferenceSampler

    with ReferenceSampler("hf", model, 1, config) as s:
        s.sample(prompts[:1], [0])
        seconds, out = timed(lambda: s.sample(prompts, list(range(len(prompts)))))
    return seconds, sum(len(r.token_ids) for per in out for r in per)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--words", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    from openrlhf_dual.launch import ray_cluster
    from openrlhf_dual.sampling import SamplingConfig

    config = SamplingConfig(n=a.k, max_new_tokens=a.max_new_tokens, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "lm")
        build_model(Path(model), a.hidden, a.layers, a.words)
        prompts = [f"user : w{i} w{2 * i + 1} w{3 * i + 2} assistant :" for i in range(a.prompts)]
        with ray_cluster(num_gpus=1):
            ours, bare = side_by_side(model, prompts, config, a.repeats)
            hf = hf_backend(model, prompts, config)

    print(f"model: Llama hidden {a.hidden}, {a.layers} layers, vocab ~{a.words}; {a.prompts} prompts x K = {a.k}, "
          f"up to {a.max_new_tokens} new tokens; vLLM: best of {a.repeats}, alternating, after a warm-up (HF: 1 run)")  # fmt: skip
    for name, (seconds, tokens) in [("bare vLLM LLM.generate", bare), ("prepare (vllm backend)", ours),
                                    ("prepare (hf backend)", hf)]:  # fmt: skip
        print(f"{name:24s} {seconds:8.2f} s  {a.prompts * a.k / seconds:9.1f} samples/s  {tokens / seconds:9.1f} tokens/s")
    assert abs(ours[1] - bare[1]) <= 0.01 * bare[1], f"different work: {ours[1]} tokens through prepare, {bare[1]} bare"
    print(f"prepare / bare vLLM throughput ratio: {bare[0] / ours[0]:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
