"""What every sampling backend shares: the sampling configuration, one response, and how a
prompt text becomes the ids the policy is given."""

from __future__ import annotations

from dataclasses import dataclass


class SamplingError(RuntimeError):
    """A backend returned something other than K responses per prompt."""


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


def to_response(prompt: str, prompt_ids: list[int], token_ids: list[int], eos_id: int, tokenizer) -> Response:
    """A generated id sequence cut after its first EOS, its text as it reads after the prompt."""
    finished = eos_id in token_ids
    if finished:
        token_ids = token_ids[: token_ids.index(eos_id) + 1]
    return Response(response_text(tokenizer, prompt, prompt_ids, token_ids), list(token_ids), finished)


def check_counts(got: list[list[Response]], n: int, backend: str) -> list[list[Response]]:
    """Exactly n responses for every prompt, or a SamplingError naming the first prompt short of them."""
    for j, per_prompt in enumerate(got):
        if len(per_prompt) != n:
            raise SamplingError(f"{backend} returned {len(per_prompt)} responses for prompt {j} of this batch, not K = {n}")
    return got
