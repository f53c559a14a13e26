"""K responses per prompt from the reference policy, as Ray actors.

Backends: `hf` (batched `transformers` generation in Ray actors; CPU or GPU) and `vllm` (OpenRLHF's
own vLLM engines on Ray; GPU). Prompts arrive as the exact text the policy is given (templates
applied) and are tokenised as OpenRLHF's rollout does (add_special_tokens=False). Each prompt's
randomness is seeded from (seed, global prompt index), so any split of prompts over actors or
shards, and any rerun, gives the same responses.
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm import tqdm


@dataclass(frozen=True)
class SamplingConfig:
    n: int  # K responses per prompt
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 42

    def __post_init__(self):
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"need n >= 1 and max_new_tokens >= 1, got n={self.n}, max_new_tokens={self.max_new_tokens}")

    def prompt_seed(self, index: int) -> int:
        """Seed of one prompt's K samples (global prompt index)."""
        return (self.seed * 1_000_003 + index) % (2**31 - 1)


@dataclass(frozen=True)
class Response:
    text: str  # as it reads after its prompt (response_text), special tokens skipped
    token_ids: list[int]  # exactly the generated tokens, EOS included when generated
    finished: bool  # ended with EOS (else stopped at max_new_tokens)


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """The ids a policy is given for a prompt text, as OpenRLHF's rollout tokenises it."""
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def response_text(tokenizer, prompt: str, prompt_ids: list[int], response_ids: list[int]) -> str:
    """The response as text exactly as it reads after its prompt: decode(prompt + response ids)
    after the prompt text (or after the decoded prompt ids), special tokens skipped. Decoded alone,
    a SentencePiece response would lose its leading space ("▁Mix" -> "Mix"), and scorers and
    re-tokenising trainers would read other tokens than the policy generated."""
    full = tokenizer.decode([*prompt_ids, *response_ids], skip_special_tokens=True)
    for head in (prompt, tokenizer.decode(prompt_ids, skip_special_tokens=True)):
        if full.startswith(head):
            return full[len(head) :]
    return tokenizer.decode(response_ids, skip_special_tokens=True)


def _response(prompt: str, prompt_ids: list[int], token_ids: list[int], eos_id: int, tokenizer) -> Response:
    finished = eos_id in token_ids
    if finished:
        token_ids = token_ids[: token_ids.index(eos_id) + 1]
    return Response(response_text(tokenizer, prompt, prompt_ids, token_ids), list(token_ids), finished)


class HFGenerator:
    """Ray actor body: one transformers causal LM generating K samples per prompt."""

    def __init__(self, model_path: str, config: SamplingConfig, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, trust_remote_code=trust_remote_code,
            attn_implementation="eager" if self.device == "cpu" else None,
        ).to(self.device).eval()  # fmt: skip
        self.config = config
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def generate(self, prompts: list[str], indices: list[int]) -> list[list[Response]]:
        """K responses for each prompt; one generate call per prompt, seeded by its index."""
        cfg, torch = self.config, self.torch
        out = []
        for prompt, index in zip(prompts, indices):
            ids = torch.tensor([prompt_token_ids(self.tokenizer, prompt)], device=self.device)
            torch.manual_seed(cfg.prompt_seed(index))
            with torch.no_grad():
                seqs = self.model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=cfg.temperature,
                    top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.n,
                    pad_token_id=self.pad_id, eos_token_id=self.tokenizer.eos_token_id,
                )  # fmt: skip
            gen = seqs[:, ids.shape[1] :].tolist()
            out.append([_response(prompt, ids[0].tolist(), g, self.tokenizer.eos_token_id, self.tokenizer) for g in gen])
        return out


def vllm_sampling_kwargs(config: SamplingConfig, index: int) -> dict:
    """Arguments of vllm.SamplingParams for one prompt's K samples (seeded by its global index)."""
    return dict(
        n=config.n, temperature=config.temperature, top_p=config.top_p, top_k=-1, max_tokens=config.max_new_tokens,
        seed=config.prompt_seed(index), include_stop_str_in_output=True,
    )  # fmt: skip


class ReferenceSampler:
    """Creates the sampling actors on the current Ray cluster and spreads prompts over them."""

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
    ):
        import ray

        self.backend, self.config = backend, config
        if backend == "hf":
            actor = ray.remote(HFGenerator).options(num_cpus=0, num_gpus=num_gpus_per_actor)
            self.actors = [actor.remote(model_path, config) for _ in range(num_actors)]
        elif backend == "vllm":
            try:
                import vllm  # noqa: F401
                from openrlhf.trainer.ray.vllm_engine import create_vllm_engines
            except ImportError as err:
                raise RuntimeError(
                    "the vllm backend needs vLLM: install openrlhf-dual[vllm] on a CUDA machine, or use --dual.backend hf"
                ) from err
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            self.actors = create_vllm_engines(
                vllm_num_engines, vllm_tensor_parallel_size, model_path, config.seed, False,
                vllm_enable_prefix_caching, vllm_enforce_eager, None,
                gpu_memory_utilization=vllm_gpu_memory_utilization,
            )  # fmt: skip
        else:
            raise ValueError(f"unknown sampling backend {backend!r}: use 'hf' or 'vllm'")

    def sample(self, prompts: list[str], indices: list[int]) -> list[list[Response]]:
        """K responses per prompt, in prompt order. `indices` are the prompts' global indices."""
        import ray

        if not prompts or len(prompts) != len(indices):
            raise ValueError(f"need as many indices as prompts (>0), got {len(prompts)} and {len(indices)}")
        if self.backend == "vllm":
            return self._sample_vllm(prompts, indices)
        chunks = [list(range(i, len(prompts), len(self.actors))) for i in range(len(self.actors))]
        futures = {
            i: a.generate.remote([prompts[j] for j in c], [indices[j] for j in c])
            for i, (a, c) in enumerate(zip(self.actors, chunks))
            if c
        }
        out: list = [None] * len(prompts)
        for i, got in futures.items():
            for j, responses in zip(chunks[i], ray.get(got)):
                out[j] = responses
        return out

    def _sample_vllm(self, prompts: list[str], indices: list[int]) -> list[list[Response]]:
        import ray
        from vllm import SamplingParams

        eos = self.tokenizer.eos_token_id
        futures, prompt_ids = [], []
        for j, (prompt, index) in enumerate(zip(prompts, indices)):
            prompt_ids.append(prompt_token_ids(self.tokenizer, prompt))
            engine = self.actors[j % len(self.actors)]
            params = SamplingParams(**vllm_sampling_kwargs(self.config, index))
            futures.append(engine.generate.remote(prompt_ids[-1], params))
        outs = [ray.get(f) for f in tqdm(futures, desc="vllm sampling", leave=False)]
        return [[_response(prompt, p, list(c.token_ids), eos, self.tokenizer) for c in o.outputs]
                for prompt, p, o in zip(prompts, prompt_ids, outs)]  # fmt: skip

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)

    def __enter__(self) -> "ReferenceSampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
