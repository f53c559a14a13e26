"""The `hf` backend: batched `transformers` generation in a Ray actor (CPU or GPU)."""

from __future__ import annotations

from openrlhf_dual.sampling.base import Response, SamplingConfig, prompt_token_ids, to_response


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
            out.append([to_response(prompt, ids[0].tolist(), g, self.tokenizer.eos_token_id, self.tokenizer) for g in gen])
        return out


class HFActors:
    """`num_actors` HFGenerator actors; prompts are dealt round-robin and gathered in order."""

    def __init__(self, model_path: str, num_actors: int, config: SamplingConfig, num_gpus_per_actor: float = 0.0):
        import ray

        actor = ray.remote(HFGenerator).options(num_cpus=0, num_gpus=num_gpus_per_actor)
        self.actors = [actor.remote(model_path, config) for _ in range(num_actors)]

    def sample(self, prompts: list[str], indices: list[int]) -> list[list[Response]]:
        import ray

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

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
