"""Scoring sampled responses on Ray: one actor per text source, a group of actors per log-prob model.

`SampleScorer` gives [n, K, 1 + m] scores of K responses for each of n prompts:
- MoCAN: reward then each safety from the text sources (openrlhf_dual.scoring);
- PeCAN: implicit rewards s = log pi_X(y|x) - log pi_ref(y|x) in nats, for the pre-aligned
  pi_r then each pi_g_j (`policy:` sources), from log-probs of the exact generated token ids.
Sources must already be validated (parse_source); errors name the source that failed.
"""

from __future__ import annotations

import numpy as np


class ScoringError(RuntimeError):
    """A source failed or returned scores of the wrong shape or non-finite values."""


class _TextSourceActor:
    """Ray actor body holding one text source (models loaded once per actor)."""

    def __init__(self, spec: str, role: str, device: str | None):
        from openrlhf_dual.scoring import build_scorer, parse_source

        self.scorer = build_scorer(parse_source(spec, role=role), device=device or _gpu_or_cpu())

    def score(self, raw_prompts: list[str], prompts: list[str], responses: list[str]) -> np.ndarray:
        from openrlhf_dual.scoring import ScoreBatch

        return self.scorer.score(ScoreBatch(raw_prompts, prompts, responses))


class _LogProbActor:
    """Ray actor body holding one causal LM for sequence log-probs."""

    def __init__(self, model_path: str, device: str | None, batch_size: int):
        from openrlhf_dual.scoring.logprob import SequenceLogProb

        self.logprob = SequenceLogProb(model_path, device=device, batch_size=batch_size)

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> np.ndarray:
        return self.logprob(prompt_ids, response_ids)


def _gpu_or_cpu() -> str:
    """Inside an actor given GPUs: "cuda" if it sees one (Ray's GPUs may be logical ones on a CPU machine)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _get(name: str, future) -> np.ndarray:
    import ray

    try:
        return np.asarray(ray.get(future), dtype=np.float64)
    except ray.exceptions.RayTaskError as err:
        raise ScoringError(f"scorer {name} failed: {err.cause}") from err


def _checked(name: str, col: np.ndarray, n: int) -> np.ndarray:
    if col.shape != (n,):
        raise ScoringError(f"scorer {name} returned {col.shape} scores for {n} responses")
    if not np.all(np.isfinite(col)):
        raise ScoringError(f"scorer {name} returned {int(np.sum(~np.isfinite(col)))} non-finite scores")
    return col


class LogProbGroup:
    """`num_actors` Ray actors holding one model; a batch is split evenly across them."""

    def __init__(self, model_path: str, num_actors: int = 1, num_gpus_per_actor: float = 0.0, batch_size: int = 16):
        import ray

        device = None if num_gpus_per_actor > 0 else "cpu"  # None: the actor's own choice
        actor = ray.remote(_LogProbActor).options(num_cpus=0, num_gpus=num_gpus_per_actor)
        self.name = model_path
        self.actors = [actor.remote(model_path, device, batch_size) for _ in range(max(1, num_actors))]

    def submit(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> tuple[list, int]:
        """Futures over contiguous chunks, one per actor, and n; `collect` joins them."""
        cuts = np.linspace(0, len(prompt_ids), len(self.actors) + 1).astype(int)
        futures = [a.score.remote(prompt_ids[lo:hi], response_ids[lo:hi]) for a, lo, hi in zip(self.actors, cuts[:-1], cuts[1:])]
        return futures, len(prompt_ids)

    def collect(self, submitted: tuple[list, int]) -> np.ndarray:
        """log pi(y|x) [n] in nats."""
        futures, n = submitted
        return _checked(self.name, np.concatenate([_get(self.name, f) for f in futures]), n)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


def scorer_stage(reward: str, safety: tuple[str, ...], num_actors: int = 1, num_gpus_per_actor: float = 0.0):
    """The GPUs a SampleScorer with these arguments asks for: one actor per text source, or
    `num_actors` per model (pi_ref and each policy) for `policy:` sources. Specs must be valid."""
    from openrlhf_dual.sampling.placement import Stage
    from openrlhf_dual.scoring import parse_source

    m = len(safety)
    if parse_source(reward, "reward").kind == "policy":
        n, what = (2 + m) * max(1, num_actors), f"{2 + m} log-prob models x {max(1, num_actors)} actors"
    else:
        n, what = 1 + m, f"{1 + m} scorer actors"
    return Stage("score", tuple({"GPU": num_gpus_per_actor} for _ in range(n)), f"{what} x {num_gpus_per_actor:g} GPU")


class SampleScorer:
    """Every source of a prep configuration on the current Ray cluster; `__call__(rows, samples)`
    -> float64 [n, K, 1 + m]. rows: prompt rows {"raw", "prompt"}; samples: per prompt K dicts
    {"text", "token_ids"} (token_ids needed for `policy:` sources only)."""

    def __init__(self, reward: str, safety: tuple[str, ...], *, ref_model: str, num_actors: int = 1,
                 num_gpus_per_actor: float = 0.0):  # fmt: skip
        import ray
        from transformers import AutoTokenizer

        from openrlhf_dual.scoring import parse_source

        self.owns_ray = not ray.is_initialized()  # else: the caller's cluster (e.g. `ray job submit`)
        if self.owns_ray:
            ray.init()
        specs = [parse_source(reward, "reward")] + [parse_source(s, "safety") for s in safety]
        self.implicit = specs[0].kind == "policy"
        if any((s.kind == "policy") != self.implicit for s in specs):
            raise ValueError("use policy: sources for all of reward and safety (PeCAN) or for none (MoCAN)")
        self.names = [s.text for s in specs]
        if self.implicit:  # pi_ref first, then pi_r, pi_g_j; signs applied to the log-ratios
            self.signs = np.array([s.sign for s in specs])
            self.tokenizer = AutoTokenizer.from_pretrained(ref_model, trust_remote_code=False)
            self.groups = [LogProbGroup(m, num_actors, num_gpus_per_actor) for m in [ref_model, *(s.location for s in specs)]]
        else:
            device = None if num_gpus_per_actor > 0 else "cpu"  # None: the actor's own choice
            actor = ray.remote(_TextSourceActor).options(num_cpus=0, num_gpus=num_gpus_per_actor)
            roles = ["reward"] + ["safety"] * len(safety)
            self.actors = [actor.remote(spec, role, device) for spec, role in zip([reward, *safety], roles)]

    def __call__(self, rows: list[dict], samples: list[list[dict]]) -> np.ndarray:
        n, k = len(rows), len(samples[0])
        if self.implicit:
            from openrlhf_dual.sampling import prompt_token_ids

            prompt_ids = [prompt_token_ids(self.tokenizer, r["prompt"]) for r in rows for _ in range(k)]
            response_ids = [s["token_ids"] for per_prompt in samples for s in per_prompt]
            submitted = [g.submit(prompt_ids, response_ids) for g in self.groups]
            ref, *models = [g.collect(s) for g, s in zip(self.groups, submitted)]
            cols = [sign * (lp - ref) for sign, lp in zip(self.signs, models)]
        else:
            raw = [r["raw"] for r in rows for _ in range(k)]
            prompts = [r["prompt"] for r in rows for _ in range(k)]
            texts = [s["text"] for per_prompt in samples for s in per_prompt]
            futures = [a.score.remote(raw, prompts, texts) for a in self.actors]
            cols = [_checked(name, _get(name, f), n * k) for name, f in zip(self.names, futures)]
        return np.stack(cols, axis=-1).reshape(n, k, len(cols))

    def close(self) -> None:
        """Free the actors; shut Ray down if this scorer started it (close it last)."""
        import ray

        for g in getattr(self, "groups", []):
            g.close()
        for a in getattr(self, "actors", []):
            ray.kill(a)
        if self.owns_ray:
            ray.shutdown()
