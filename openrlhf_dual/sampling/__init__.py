"""K responses per prompt from the reference policy, as Ray actors.

Backends: `hf` (batched `transformers` generation in Ray actors; CPU or GPU; sampling/hf.py) and
`vllm` (OpenRLHF's own vLLM engines on Ray; GPU, or vLLM's CPU build; sampling/vllm.py). Prompts
arrive as the exact text the policy is given (templates applied) and are tokenised as OpenRLHF's
rollout does (add_special_tokens=False). Each prompt's randomness is seeded from (seed, global
prompt index), so any split of prompts over actors or shards, and any rerun, gives the same
responses. GPU requests go through sampling/placement.py (bounded waits, clear errors).
"""

from __future__ import annotations

from openrlhf_dual.sampling.base import (
    Response,
    SamplingConfig,
    SamplingError,
    check_counts,
    prompt_token_ids,
    response_text,
    to_response,
)
from openrlhf_dual.sampling.placement import PlacementError, Stage
from openrlhf_dual.sampling.vllm import vllm_sampling_kwargs

__all__ = [
    "PlacementError", "ReferenceSampler", "Response", "SamplingConfig", "SamplingError", "Stage", "prompt_token_ids",
    "response_text", "sampler_stage", "to_response", "vllm_sampling_kwargs",
]  # fmt: skip


def sampler_stage(backend: str, num_actors: int, num_gpus_per_actor: float, vllm: dict) -> Stage:
    """The GPUs a ReferenceSampler with these arguments asks for (vllm: its `vllm_*` keyword arguments)."""
    from openrlhf_dual.sampling.vllm import engines_stage

    if backend == "vllm":
        return engines_stage(vllm.get("vllm_num_engines", 1), vllm.get("vllm_tensor_parallel_size", 1))
    gpus = f"{num_gpus_per_actor:g} GPU each"
    return Stage("sample", tuple({"GPU": num_gpus_per_actor} for _ in range(num_actors)), f"{num_actors} HF actors x {gpus}")


class ReferenceSampler:
    """Creates the sampling actors on the current Ray cluster and spreads prompts over them.
    `stages`: every stage of the calling job, for the placement error's message."""

    def __init__(
        self,
        backend: str,
        model_path: str,
        num_actors: int,
        config: SamplingConfig,
        *,
        num_gpus_per_actor: float = 0.0,
        vllm_num_engines: int = 1,
        vllm_tensor_parallel_size: int = 1,
        vllm_gpu_memory_utilization: float = 0.9,
        vllm_enforce_eager: bool = False,
        vllm_enable_prefix_caching: bool = False,
        stages: list[Stage] | None = None,
    ):
        self.backend, self.config = backend, config
        if backend == "hf":
            from openrlhf_dual.sampling import placement
            from openrlhf_dual.sampling.hf import HFActors

            stage = sampler_stage(backend, num_actors, num_gpus_per_actor, {})
            placement.await_gpus(stage, stages or [stage])
            self.impl = HFActors(model_path, num_actors, config, num_gpus_per_actor)
        elif backend == "vllm":
            from openrlhf_dual.sampling.vllm import VLLMEngines

            self.impl = VLLMEngines(
                model_path, config, num_engines=vllm_num_engines, tensor_parallel_size=vllm_tensor_parallel_size,
                gpu_memory_utilization=vllm_gpu_memory_utilization, enforce_eager=vllm_enforce_eager,
                enable_prefix_caching=vllm_enable_prefix_caching, stages=stages,
            )  # fmt: skip
        else:
            raise ValueError(f"unknown sampling backend {backend!r}: use 'hf' or 'vllm'")

    def sample(self, prompts: list[str], indices: list[int]) -> list[list[Response]]:
        """K responses per prompt, in prompt order. `indices` are the prompts' global indices."""
        if not prompts or len(prompts) != len(indices):
            raise ValueError(f"need as many indices as prompts (>0), got {len(prompts)} and {len(indices)}")
        return check_counts(self.impl.sample(prompts, indices), self.config.n, self.backend)

    def close(self) -> None:
        self.impl.close()

    def __enter__(self) -> "ReferenceSampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
