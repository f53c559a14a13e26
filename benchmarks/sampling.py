"""prepare's vLLM sampling against a bare vLLM `LLM.generate`, side by side in one run.

    python benchmarks/sampling.py [--prompts 64] [--k 16] [--max-new-tokens 32]   (in .venv-vllm: make bench-sampling)

Both sample the same prompts, K and lengths with the same engine settings: prepare's path is
`ReferenceSampler("vllm")`, i.e. OpenRLHF's `create_vllm_engines` engine (AsyncLLM in a Ray actor on
a logical/real GPU) fed one request per prompt; the bare path is `vllm.LLM.generate` on every prompt
at once in this process, built with the settings read back from OpenRLHF's engine: bf16, KV-cache
fraction, eager mode, prefix caching, statistics logging and the scheduler's max_num_seqs and
max_num_batched_tokens (vLLM defaults the last three differently for `LLM` and for the AsyncLLM
engine OpenRLHF starts, and `create_vllm_engines` has no argument for them). A second bare engine
with `LLM`'s own defaults shows what those settings cost or gain; it is not the ratio's. Engines are
up at once and timed in turn within each repeat (the order reversed every other repeat), so a
machine busy with other work slows them alike; engine start-up is not timed; each is warmed up
once. The ratio is the median over repeats of (bare seconds / prepare seconds) within a repeat,
with its range: on a shared machine single repeats swing by 30% either way. The HF backend (one
Ray actor) samples the same prompts beside them. The model is a random-init Llama built in-process
(head_dim 64; vLLM's CPU attention takes 32 and up). Last line: the ratio of prepare's throughput
to the bare one (target >= 0.9).
"""

from __future__ import annotations

import argparse
import statistics
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


def engine_settings(engine) -> dict:
    """The `vllm.LLM` arguments of the scheduler, cache and statistics settings an OpenRLHF vLLM engine
    (a RolloutRayActor) runs with, read from the engine itself."""
    import ray

    def read(actor) -> dict:
        sched, cache = actor.llm.vllm_config.scheduler_config, actor.llm.vllm_config.cache_config
        return dict(max_num_seqs=sched.max_num_seqs, max_num_batched_tokens=sched.max_num_batched_tokens,
                    enable_prefix_caching=bool(cache.enable_prefix_caching), disable_log_stats=not actor.llm.log_stats)  # fmt: skip

    return ray.get(engine.__ray_call__.remote(read))


def side_by_side(model: str, prompts: list[str], config, repeats: int) -> dict[str, tuple[list[float], int]]:
    """prepare's path (ReferenceSampler on OpenRLHF's engine), a bare `vllm.LLM.generate` of the same
    requests on an engine with the same settings, and one with LLM's defaults; all engines up at once
    and timed in turn in each repeat, after a warm-up each. {name: (seconds per repeat, tokens)}."""
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
        same = engine_settings(ours.impl.engines[0])
        print(f"OpenRLHF's engine runs with {same}")
        llms = {"same": LLM(model=model, dtype="bfloat16", seed=config.seed, **ENGINE, **same)}
        try:
            llms["defaults"] = LLM(model=model, dtype="bfloat16", seed=config.seed, **ENGINE)
            runs = {
                "ours": lambda: ours.sample(prompts, list(range(len(prompts)))),
                **{name: (lambda llm=llm: llm.generate(inputs, params, use_tqdm=False)) for name, llm in llms.items()},
            }
            for run in runs.values():  # warm-up
                run()
            seconds: dict[str, list[float]] = {name: [] for name in runs}
            outs = {}
            for r in range(repeats):  # in turn, the order reversed every other repeat
                for name in list(runs)[:: 1 if r % 2 == 0 else -1]:
                    t, outs[name] = timed(runs[name])
                    seconds[name].append(t)
        finally:
            for llm in llms.values():  # else their engine-core processes outlive this script
                llm.llm_engine.engine_core.shutdown()
    tokens = {name: sum(len(c.token_ids) for o in outs[name] for c in o.outputs) for name in llms}
    tokens["ours"] = sum(len(r.token_ids) for per in outs["ours"] for r in per)
    return {name: (seconds[name], tokens[name]) for name in seconds}


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
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()

    from openrlhf_dual.launch import ray_cluster
    from openrlhf_dual.sampling import SamplingConfig

    config = SamplingConfig(n=a.k, max_new_tokens=a.max_new_tokens, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "lm")
        build_model(Path(model), a.hidden, a.layers, a.words)
        prompts = [f"user : w{i} w{2 * i + 1} w{3 * i + 2} assistant :" for i in range(a.prompts)]
        with ray_cluster(num_gpus=1):
            vllm_runs = side_by_side(model, prompts, config, a.repeats)
            hf = hf_backend(model, prompts, config)

    print(f"model: Llama hidden {a.hidden}, {a.layers} layers, vocab ~{a.words}; {a.prompts} prompts x K = {a.k}, "
          f"up to {a.max_new_tokens} new tokens; vLLM: {a.repeats} repeats in turn after a warm-up, best shown (HF: 1 run)")
    rows = {"same": "bare vLLM, same settings", "defaults": "bare vLLM, LLM defaults", "ours": "prepare (vllm backend)"}
    for name, label in rows.items():
        seconds, tokens = vllm_runs[name]
        print(f"{label:26s} {min(seconds):8.2f} s  {a.prompts * a.k / min(seconds):9.1f} samples/s  "
              f"{tokens / min(seconds):9.1f} tokens/s   (all: {' '.join(f'{t:.2f}' for t in seconds)})")
    seconds, tokens = hf
    print(f"{'prepare (hf backend)':26s} {seconds:8.2f} s  {a.prompts * a.k / seconds:9.1f} samples/s  {tokens / seconds:9.1f} tokens/s")
    (ours, tokens_ours), (bare, tokens_bare) = vllm_runs["ours"], vllm_runs["same"]
    assert abs(tokens_ours - tokens_bare) <= 0.01 * tokens_bare, f"different work: {tokens_ours} tokens ours, {tokens_bare} bare"
    ratios = sorted(b / o for b, o in zip(bare, ours))
    print(f"prepare / bare vLLM throughput ratio: {statistics.median(ratios):.3f} (median of {len(ratios)} repeats, "
          f"range {ratios[0]:.3f}-{ratios[-1]:.3f}; target >= 0.9)")


if __name__ == "__main__":
    main()
