"""Exact evaluation of policies on the toy world, in two views that must not be confused.

- "whole": what a user of the policy gets. The response space is what generation with a cap of
  `cap` new tokens returns (the cap prepare samples with: the world's 3 words and EOS): a
  finished response (ending in EOS within the cap) or an unfinished one (`cap` tokens without
  EOS, counted off the set and scored on the text it has at the cap). Every response of that
  space, not only the world's 64, is scored by the world's own toy_reward and constraint
  functions (which read any text); the constrained optimum pi_lambda* = pi_ref exp((r + lambda*.g)
  / beta) / Z and its lambda* [m] are defined over the same space, Z included. Enumerated by
  demo.tree down to a probability floor `eps` (every prefix of the world's responses always
  expanded, so the mass on the set is exact), bounded beyond it by demo.whole: every number is an
  interval [lo, hi]. What it cannot see: what an uncapped generator would write past the cap
  (only that it went on).
- "renormalised": both distributions restricted to the world's 64 responses and renormalised
  there (what the demos reported before; blind to mass that leaves the set).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from openrlhf_dual.demo import world as W
from openrlhf_dual.demo.tree import expand, log_prob_floor
from openrlhf_dual.demo.whole import Enumeration, exact_multiplier, optimum_distribution, whole_distribution

EPS = 1e-6  # enumeration floor: a prefix is expanded when the judged policy gives it more


def columns(safety: np.ndarray) -> np.ndarray:
    """safety [P, R] (one constraint) or [P, R, m] as [P, R, m]."""
    return safety.reshape(*safety.shape[:2], -1)


def tilt(ref: W.ExactPolicy, logits: np.ndarray) -> W.ExactPolicy:
    """pi_ref exp(logits) / Z per prompt, on the world's set; logits [P, 64] in nats."""
    x = logits + np.log(ref.probs)
    probs = np.exp(x - x.max(axis=1, keepdims=True))
    return W.ExactPolicy(probs / probs.sum(axis=1, keepdims=True))


def exact_optimum(ref: W.ExactPolicy, reward: np.ndarray, safety: np.ndarray, thresholds: np.ndarray, beta: float):
    """lambda* [m] and pi_lambda* on the world's set, renormalised (pi_ref conditioned on the set),
    via the dual core: logmeanexp over responses of (r + beta log pi_ref + lam . g) / beta.
    safety [P, 64] or [P, 64, m], thresholds a float or [m]."""
    from openrlhf_dual.dual import solve_dual

    lam = np.asarray(solve_dual(reward + beta * np.log(ref.probs), safety, thresholds, beta).lam, dtype=np.float64)
    return lam, tilt(ref, (reward + columns(safety) @ lam) / beta)


def summary(policy: W.ExactPolicy, reward: np.ndarray, safety: np.ndarray, ref: W.ExactPolicy) -> dict:
    """E[r], E[g_j] ([m]) and KL(policy || reference) in nats, on the set."""
    g = columns(safety)
    return {"reward": policy.expect(reward), "safety": [policy.expect(g[..., j]) for j in range(g.shape[2])],
            "kl": policy.kl(ref)}  # fmt: skip


def load_lm(model_dir: str | Path):
    """(float32 causal LM in eval mode, tokenizer) from an HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), tok


class ToyJudge:
    """Both views of any policy on the world's `prompts`, against the reference in `ref_dir`, for
    E[g_j] >= threshold_j (`threshold`: a float, one constraint, or [m]: the world's first m
    CONSTRAINTS) with KL coefficient beta. The reference's enumeration and lambda* are computed
    once. Responses are scored by the world's toy_reward and constraint functions token by token
    (all are sums over words; a token is at most one word)."""

    def __init__(self, ref_dir: str | Path, prompts: list[str], threshold: float | Sequence[float], beta: float,
                 cap: int = W.RESPONSE_LEN + 1, eps: float = EPS):  # fmt: skip
        self.ref, self.tok = load_lm(ref_dir)
        self.prompts, self.beta, self.cap, self.eps = prompts, beta, cap, eps
        self.thresholds = np.atleast_1d(np.asarray(threshold, dtype=np.float64))
        funcs = (W.toy_reward, *W.CONSTRAINTS[: len(self.thresholds)])
        self.eos = self.tok.eos_token_id
        self.heads = [self.tok(W.format_prompt(self.tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
        words = [tuple(self.tok(r, add_special_tokens=False)["input_ids"]) for r in W.responses()]
        self.set_index = {seq: j for j, seq in enumerate(words)}  # a response: these tokens, then EOS
        self.keep = {seq[:d] for seq in words for d in range(1, len(seq) + 1)}
        texts = [self.tok.decode([v], skip_special_tokens=True) for v in range(self.ref.config.vocab_size)]
        self.token_scores = [np.array([[f(p, t) for f in funcs] for t in texts]) for p in prompts]
        self.token_log_ratio = -log_prob_floor(self.ref)
        self._ref_memo: dict = {}

        self.reward, self.safety = W.score_table(prompts, len(self.thresholds))  # safety [P, 64] or [P, 64, m]
        ref_trees = self._expand([self.ref])
        self.ref_set = self._on_set(ref_trees, 0)
        self.lam_renormalised, self.opt_set = exact_optimum(self.ref_set, self.reward, self.safety, self.thresholds, beta)
        ref_enums = [self._enumeration(i, t, 0, 0) for i, t in enumerate(ref_trees)]
        self.lam = exact_multiplier(ref_enums, self.thresholds, beta)
        self.optimum = optimum_distribution(ref_enums, self.lam, beta)  # the reference and pi_lambda*, whole
        self.reference = self.optimum["reference"]

    def _expand(self, models: list) -> list:
        """Trees where models[0] has mass; the reference's next-token log-probs are kept across calls."""
        memo = [self._ref_memo if m is self.ref else None for m in models]
        return expand(models, self.heads, self.eos, self.cap, self.eps, self.keep, self.token_scores, memo)

    def _set_members(self, tree) -> np.ndarray:
        """[n] index of each leaf in the world's response list, -1 when off the set."""
        node_index = np.array([self.set_index.get(n, -1) for n in tree.nodes])
        return np.where(tree.leaf_token == self.eos, node_index[tree.leaf_node], -1)

    def _enumeration(self, i: int, tree, policy: int, ref: int) -> Enumeration:
        return Enumeration(
            logp=tree.logp[:, policy], logp_ref=tree.logp[:, ref], scores=tree.scores,
            on_set=self._set_members(tree) >= 0, cut_logp=tree.cut_logp[:, policy], cut_logp_ref=tree.cut_logp[:, ref],
            cut_scores=tree.cut_scores, cut_tokens=(self.cap - tree.cut_depth).astype(np.float64),
            token_scores=self.token_scores[i],
        )  # fmt: skip

    def _on_set(self, trees, model: int) -> W.ExactPolicy:
        """One model's distribution over the world's 64 responses, renormalised there."""
        logp = np.full((len(trees), len(self.set_index)), -np.inf)
        for i, t in enumerate(trees):
            members = self._set_members(t)
            logp[i, members[members >= 0]] = t.logp[members >= 0, model]
        probs = np.exp(logp - logp.max(axis=1, keepdims=True))
        return W.ExactPolicy(probs / probs.sum(axis=1, keepdims=True))

    def evaluate(self, model) -> dict:
        """{"renormalised": ..., "whole": ...} for a causal LM in memory (eval mode, float32)."""
        trees = self._expand([model, self.ref])
        on_set = self._on_set(trees, 0)
        enums = [self._enumeration(i, t, 0, 1) for i, t in enumerate(trees)]
        whole = whole_distribution(enums, self.optimum, self.lam, self.beta, self.token_log_ratio)
        reference = {k: v for k, v in summary(self.ref_set, self.reward, self.safety, self.ref_set).items() if k != "kl"}
        renormalised = {
            "reference": reference,
            "optimum": {"lambda": self.lam_renormalised.tolist(), **summary(self.opt_set, self.reward, self.safety, self.ref_set)},
            "achieved": summary(on_set, self.reward, self.safety, self.ref_set),
            "kl_to_optimum": on_set.kl(self.opt_set),
            "kl_ref_to_optimum": self.ref_set.kl(self.opt_set),
        }
        whole = {
            "generation_cap": self.cap, "eps": self.eps, "token_log_ratio_bound": self.token_log_ratio,
            "reference": whole["reference"], "optimum": {"lambda": self.lam.tolist(), **whole["optimum"]},
            "achieved": whole["policy"], "kl_to_optimum": whole["kl_to_optimum"],
            "kl_ref_to_optimum": whole["kl_ref_to_optimum"], "unseen": whole["unseen"],
        }  # fmt: skip
        return {"renormalised": renormalised, "whole": whole}

    def evaluate_dir(self, model_dir: str | Path) -> dict:
        return self.evaluate(load_lm(model_dir)[0])
