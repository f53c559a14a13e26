"""Training pairs for the pseudo-preference DPO step, in OpenRLHF's prompt/chosen/rejected JSONL
convention, each carrying the raw scores of both responses so the trainer can label them for any
lambda without re-scoring. `chosen` is the response with the higher r + lambda.g at the lambda
given here (so stock tools read a sensible hard preference); the trainer's labels decide."""

from __future__ import annotations

import numpy as np

from openrlhf_dual.labels import combined_reward


def pair_row(prompt: str, prompt_id: int, texts: tuple[str, str], scores: np.ndarray, lam: np.ndarray) -> dict:
    """One pair. scores [2, 1 + m]: reward then safeties of texts[0] and texts[1]."""
    first_wins = combined_reward(scores[:, 0], scores[:, 1:], lam)
    c, r = (0, 1) if first_wins[0] >= first_wins[1] else (1, 0)
    return {
        "prompt": prompt,
        "prompt_id": prompt_id,
        "chosen": texts[c],
        "rejected": texts[r],
        "chosen_reward": float(scores[c, 0]),
        "chosen_safety": [float(v) for v in scores[c, 1:]],
        "rejected_reward": float(scores[r, 0]),
        "rejected_safety": [float(v) for v in scores[r, 1:]],
    }


def pairs_from_samples(
    prompts: list[dict], responses: list[list[str]], scores: np.ndarray, lam: np.ndarray
) -> tuple[list[dict], int]:
    """Disjoint pairs (0,1), (2,3), ... of each prompt's K reference samples: independent draws
    from pi_ref x pi_ref, as the pseudo-preference objective assumes. scores [N, K, 1 + m].
    Pairs of identical texts carry no signal and are dropped; returns (rows, number dropped)."""
    rows, dropped = [], 0
    for p, texts, s in zip(prompts, responses, scores):
        for k in range(0, len(texts) - 1, 2):
            if texts[k] == texts[k + 1]:
                dropped += 1
                continue
            rows.append(pair_row(p["prompt"], p["id"], (texts[k], texts[k + 1]), s[k : k + 2], lam))
    return rows, dropped
