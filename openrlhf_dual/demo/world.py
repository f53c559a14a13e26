"""The embedded toy world: small enough to enumerate every response, so the constrained optimum
and any trained policy are evaluated exactly.

Prompts are a few topic words, half of them marked "risky". Every response is RESPONSE_LEN words
from RESPONSE_WORDS followed by EOS (4^3 = 64 responses per prompt). Helpfulness r and safety g
are sums of per-word values; on risky prompts the unsafe words cost twice as much. A second
constraint, engagement (ENGAGEMENT), conflicts with safety in part: refusing is safe but
unengaged, giving tips engaged and only mildly unsafe. CONSTRAINTS lists the world's constraint
functions in order; a run with m constraints uses the first m. The reference policy is a tiny
Llama fitted in-process to a prompt-dependent distribution over these responses. Exact quantities
condition the LM on this response set (the reference puts ~all its mass there).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# word: (helpfulness, safety)
RESPONSE_WORDS = {"sure": (1.0, -0.8), "tips": (0.6, -0.2), "care": (0.2, 0.5), "sorry": (-0.6, 1.0)}
# word: engagement, the second constraint's per-word value
ENGAGEMENT = {"sure": 0.2, "tips": 0.6, "care": 0.3, "sorry": -1.0}
TOPIC_WORDS = [f"t{i}" for i in range(12)]
RESPONSE_LEN = 3
RISKY = "risky"


def toy_reward(prompt: str, response: str) -> float:
    """Helpfulness of a response: the sum of its words' values (unknown words count 0)."""
    return float(sum(RESPONSE_WORDS.get(w, (0.0, 0.0))[0] for w in response.split()))


def toy_safety(prompt: str, response: str) -> float:
    """Safety of a response (higher is safer); unsafe words weigh double on risky prompts."""
    scale = 2.0 if RISKY in prompt.split() else 1.0
    vals = [RESPONSE_WORDS.get(w, (0.0, 0.0))[1] for w in response.split()]
    return float(sum(v * scale if v < 0 else v for v in vals))


def toy_engagement(prompt: str, response: str) -> float:
    """Engagement of a response (the second constraint): the sum of its words' values (unknown words count 0)."""
    return float(sum(ENGAGEMENT.get(w, 0.0) for w in response.split()))


CONSTRAINTS = (toy_safety, toy_engagement)

REWARD_FILE = '''"""Toy-world helpfulness in OpenRLHF's reward_func convention (written by openrlhf_dual.demo)."""
from openrlhf_dual.demo.world import toy_reward


def reward_func(queries, prompts, labels, **kwargs):
    return {"rewards": [toy_reward(p, q[len(p):]) for q, p in zip(queries, prompts)]}
'''
SAFETY_FILE = REWARD_FILE.replace("helpfulness", "safety").replace("toy_reward", "toy_safety")
ENGAGEMENT_FILE = REWARD_FILE.replace("helpfulness", "engagement").replace("toy_reward", "toy_engagement")
CONSTRAINT_FILES = (("safety.py", SAFETY_FILE), ("engagement.py", ENGAGEMENT_FILE))  # CONSTRAINTS as reward files


def responses() -> list[str]:
    """Every response of the world, [64] strings of RESPONSE_LEN words."""
    return [" ".join(ws) for ws in itertools.product(RESPONSE_WORDS, repeat=RESPONSE_LEN)]


def make_prompts(n: int, seed: int) -> list[str]:
    """n distinct raw prompts: two topic words, every other one marked risky."""
    rng = random.Random(seed)
    pairs = rng.sample(list(itertools.combinations(TOPIC_WORDS, 2)), n)
    return [" ".join(p) + (f" {RISKY}" if i % 2 else "") for i, p in enumerate(pairs)]


def reference_word_probs(prompt: str) -> np.ndarray:
    """The distribution the reference LM is fitted to: i.i.d. words, helpful-leaning, less so when risky."""
    return np.array([0.45, 0.3, 0.15, 0.1]) if RISKY not in prompt.split() else np.array([0.3, 0.3, 0.25, 0.15])


def reference_table(prompts: list[str]) -> np.ndarray:
    """[P, 64] the distribution the reference LM is fitted to, over the world's responses (a
    product of `reference_word_probs`), for exact checks that need no LM."""
    index = {w: i for i, w in enumerate(RESPONSE_WORDS)}
    return np.array([[np.prod([reference_word_probs(p)[index[w]] for w in r.split()]) for r in responses()]
                     for p in prompts])  # fmt: skip


@dataclass
class ExactPolicy:
    """A policy's exact response distribution: probs [P, R] over (prompt, response)."""

    probs: np.ndarray

    def expect(self, values: np.ndarray) -> float:
        """E over prompts (uniform) and responses of values [P, R]."""
        return float(np.mean(np.sum(self.probs * values, axis=1)))

    def kl(self, other: "ExactPolicy") -> float:
        """KL(self || other) in nats, averaged over prompts."""
        p, q = self.probs, other.probs
        return float(np.mean(np.sum(np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - np.log(q)), 0.0), axis=1)))


def fit_reference(model_dir: str | Path, prompts: list[str], seed: int, steps: int = 300) -> None:
    """Fit the tiny LM in `model_dir` (in place) to `reference_word_probs` by maximum likelihood on
    sampled responses, then save it. Seconds on a CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    words = list(RESPONSE_WORDS)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        texts, prompt_lens = [], []
        for prompt in rng.choice(prompts, size=64):
            head = format_prompt(tok, prompt)
            picked = rng.choice(words, size=RESPONSE_LEN, p=reference_word_probs(prompt))
            texts.append(head + " ".join(picked) + " " + tok.eos_token)
            prompt_lens.append(len(tok(head, add_special_tokens=False)["input_ids"]))
        batch = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        for row, (n_pad, n_prompt) in enumerate(zip((batch["attention_mask"] == 0).sum(1).tolist(), prompt_lens)):
            labels[row, : n_pad + n_prompt] = -100
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(model_dir)


def format_prompt(tokenizer, prompt: str) -> str:
    """The text the policy sees: the tokenizer's chat template with a generation prompt."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def exact_policy(model_dir: str | Path, prompts: list[str]) -> ExactPolicy:
    """The LM's distribution over the world's responses (each followed by EOS), conditioned on that set."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return exact_policy_of(model, tok, prompts)


def exact_policy_of(model, tok, prompts: list[str]) -> ExactPolicy:
    """`exact_policy` for a causal LM already in memory (float32 math, no gradients)."""
    import torch

    resp = responses()
    logps = np.zeros((len(prompts), len(resp)))
    for i, prompt in enumerate(prompts):
        head = tok(format_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
        tails = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in resp]
        ids = torch.tensor([head + t for t in tails])
        with torch.no_grad():
            logits = model(ids).logits.double()
        tok_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        logps[i] = tok_logps[:, len(head) - 1 :].sum(-1).numpy()
    probs = np.exp(logps - logps.max(axis=1, keepdims=True))
    return ExactPolicy(probs / probs.sum(axis=1, keepdims=True))


def score_table(prompts: list[str], m: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Exact reward [P, R] and the first m CONSTRAINTS of every (prompt, response): safety [P, R]
    when m = 1 (as solve_dual takes one constraint), [P, R, m] otherwise."""
    if not 1 <= m <= len(CONSTRAINTS):
        raise ValueError(f"the toy world has {len(CONSTRAINTS)} constraints, not {m}")
    resp = responses()
    reward = np.array([[toy_reward(p, r) for r in resp] for p in prompts])
    safety = np.array([[[g(p, r) for g in CONSTRAINTS[:m]] for r in resp] for p in prompts])
    return reward, safety[..., 0] if m == 1 else safety
