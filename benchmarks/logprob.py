"""PeCAN's log-prob scoring: responses per second per actor on this CPU, and the overhead of
`SequenceLogProb` (padding, length sorting, the response-token log-softmax and sum) against a bare
forward pass of the same padded batches, measured side by side in one run.

    python benchmarks/logprob.py [--responses 256] [--hidden 256] [--vocab 32000]

The model is a random-init Llama built in-process (no downloads): a 32k vocabulary as in Llama-2,
so the log-softmax over the vocabulary costs what it costs there, relative to a small trunk.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_model(path: Path, hidden: int, layers: int, vocab: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), max_position_embeddings=1024)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)


def bare_forward(lp, prompts: list[list[int]], responses: list[list[int]]) -> None:
    """The same batches (same order, same right padding) through the model, logits discarded."""
    order = np.argsort([-(len(p) + len(r)) for p, r in zip(prompts, responses)], kind="stable")
    for start in range(0, len(order), lp.batch_size):
        rows = order[start : start + lp.batch_size]
        seqs = [prompts[i] + responses[i] for i in rows]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        attn = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
            attn[row, : len(s)] = 1
        with torch.no_grad():
            lp.model(input_ids=ids, attention_mask=attn)


def best_of_alternating(fns: list, repeats: int) -> list[float]:
    """Each function's best time over `repeats` rounds, the functions run in turn within each round
    (so a change of load on the machine falls on all of them alike)."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            t = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - t)
    return [min(spent) for spent in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--responses", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    from openrlhf_dual.scoring.logprob import SequenceLogProb

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, a.vocab, size=rng.integers(32, 96)).tolist() for _ in range(a.responses)]
    responses = [rng.integers(3, a.vocab, size=rng.integers(16, 128)).tolist() for _ in range(a.responses)]
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp), a.hidden, a.layers, a.vocab)
        lp = SequenceLogProb(tmp, device="cpu", batch_size=a.batch_size)
        lp(prompts[:4], responses[:4])  # warm up
        t_bare, t_lp = best_of_alternating([lambda: bare_forward(lp, prompts, responses), lambda: lp(prompts, responses)], a.repeats)
    tokens = sum(len(x) + len(y) for x, y in zip(prompts, responses))
    print(f"model: Llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}; {a.responses} responses, "
          f"{tokens} tokens, batch {a.batch_size}, {torch.get_num_threads()} threads, best of {a.repeats} alternating rounds")  # fmt: skip
    print(f"bare forward      {t_bare:8.3f} s   {a.responses / t_bare:8.1f} responses/s")
    print(f"SequenceLogProb   {t_lp:8.3f} s   {a.responses / t_lp:8.1f} responses/s per actor")
    print(f"overhead ratio    {t_lp / t_bare:8.3f} x  (target <= 1.1)")


if __name__ == "__main__":
    main()
