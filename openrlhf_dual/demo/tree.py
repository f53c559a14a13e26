"""Every response causal LMs can give to a prompt, as a prefix tree expanded down to a probability floor.

Generation with a cap of T new tokens returns a finished response (tokens ending in EOS, at most T
of them) or an unfinished one (T tokens without EOS). `expand` walks that space for several
models at once, depth by depth, with one batched forward pass per model, depth and prompt length
(each new depth feeds one token per prefix on top of its parent's KV cache): a prefix is
expanded when some model gives it probability above `eps`, or when it is in `keep`. Each child of
an expanded prefix that ends a response (EOS, or the T-th token) is a leaf with exact
log-probabilities; any other child below the floor is cut, with its exact log-probabilities,
so the mass that was not enumerated is known exactly, per model.

Scores that are sums over tokens (`token_scores` [V, S] per prompt) are accumulated along the
paths, for leaves and cut prefixes alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Tree:
    """One prompt's enumeration under M models; log-probs in nats. A leaf or cut prefix is an
    expanded prefix `nodes[node]` followed by one more token."""

    nodes: list[tuple[int, ...]]  # expanded prefixes (token ids), the empty one first
    leaf_node: np.ndarray  # [n]
    leaf_token: np.ndarray  # [n]
    logp: np.ndarray  # [n, M]
    scores: np.ndarray  # [n, S] summed token scores of each leaf
    cut_node: np.ndarray  # [k]
    cut_token: np.ndarray  # [k]
    cut_logp: np.ndarray  # [k, M]: the exact mass of everything below each cut prefix
    cut_scores: np.ndarray  # [k, S] summed token scores of each cut prefix

    def leaf(self, j: int) -> tuple[int, ...]:
        return (*self.nodes[self.leaf_node[j]], int(self.leaf_token[j]))

    def cut(self, j: int) -> tuple[int, ...]:
        return (*self.nodes[self.cut_node[j]], int(self.cut_token[j]))

    @property
    def cut_depth(self) -> np.ndarray:
        """[k] tokens in each cut prefix."""
        return np.array([len(self.nodes[n]) + 1 for n in self.cut_node], dtype=np.int64)


def expand(models: list, heads: list[list[int]], eos_id: int, cap: int, eps: float,
           keep: set[tuple[int, ...]] = frozenset(), token_scores: list[np.ndarray] | None = None) -> list[Tree]:  # fmt: skip
    """Trees for prompts with token ids `heads` under `models` (causal LMs in eval mode sharing a
    vocabulary). keep: prefixes always expanded (e.g. every proper prefix of a response set)."""
    import torch

    vocab = models[0].config.vocab_size
    scores = np.stack(token_scores) if token_scores is not None else np.zeros((len(heads), vocab, 0))
    floor = np.log(eps) if eps > 0 else -np.inf
    nodes: list[list[tuple[int, ...]]] = [[()] for _ in heads]
    found = {"leaf": [], "cut": []}  # chunks of (prompt, node, token, logp [., M], scores [., S])
    groups: dict[int, list[int]] = {}
    for i, h in enumerate(heads):
        groups.setdefault(len(h), []).append(i)
    for members in groups.values():
        # the rows being expanded: their prompt, node index, log-probs [B, M] and scores [B, S]
        prompt = np.array(members)
        node = np.zeros(len(members), dtype=np.int64)
        base = np.zeros((len(members), len(models)))
        acc = np.zeros((len(members), scores.shape[2]))
        inputs = torch.tensor([heads[i] for i in members])
        caches = [None] * len(models)
        for depth in range(cap):
            lp = []
            for m, model in enumerate(models):
                with torch.no_grad():
                    out = model(input_ids=inputs, past_key_values=caches[m], use_cache=True, logits_to_keep=1)
                caches[m] = out.past_key_values
                lp.append(torch.log_softmax(out.logits[:, -1].double(), dim=-1).numpy())
            child = base[:, None, :] + np.stack(lp, axis=-1)  # [B, V, M]
            ends = np.zeros((len(prompt), vocab), dtype=bool)
            ends[:, eos_id] = True
            if depth + 1 == cap:
                ends[:] = True
            grow = ~ends & (child.max(axis=-1) > floor)
            for b in range(len(prompt)):  # prefixes in keep grow whatever their mass
                prefix = nodes[prompt[b]][node[b]]
                if not prefix or prefix in keep:
                    for v in range(vocab):
                        grow[b, v] |= not ends[b, v] and (*prefix, v) in keep
            for kind, mask in (("leaf", ends), ("cut", ~ends & ~grow)):
                rows, toks = np.nonzero(mask)
                found[kind].append((prompt[rows], node[rows], toks, child[rows, toks],
                                    acc[rows] + scores[prompt[rows], toks]))  # fmt: skip
            rows, toks = np.nonzero(grow)
            if not len(rows):
                break
            new_node = np.empty(len(rows), dtype=np.int64)
            for j, (b, v) in enumerate(zip(rows, toks)):
                new_node[j] = len(nodes[prompt[b]])
                nodes[prompt[b]].append((*nodes[prompt[b]][node[b]], int(v)))
            acc = acc[rows] + scores[prompt[rows], toks]
            prompt, node, base = prompt[rows], new_node, child[rows, toks]
            for cache in caches:
                cache.reorder_cache(torch.as_tensor(rows))
            inputs = torch.as_tensor(toks)[:, None]
    flat = {kind: [np.concatenate(parts) for parts in zip(*chunks)] for kind, chunks in found.items()}
    trees = []
    for i in range(len(heads)):
        leaf, cut = ([a[f[0] == i] for a in f[1:]] for f in (flat["leaf"], flat["cut"]))
        trees.append(Tree(nodes[i], *leaf, *cut))
    return trees


def log_prob_floor(model) -> float:
    """A lower bound (nats) on log p(v | context) for every token v and every context, from the
    weights of a Llama-style head: logits = W (gamma * x / rms(x)), so |logit_v| <= A_v =
    sqrt(d) ||W_v * gamma|| (RMS normalisation gives ||x / rms(x)|| <= sqrt(d)), hence
    log p_v >= -A_v - log sum_u exp(A_u). Rigorous, loose (tens of nats)."""
    import torch

    norm, head = model.model.norm, model.lm_head
    if getattr(head, "bias", None) is not None or not hasattr(norm, "weight"):
        raise ValueError("log_prob_floor needs a final RMS norm and a bias-free LM head (Llama-style)")
    w = head.weight.detach().double() * norm.weight.detach().double()[None, :]
    a = w.norm(dim=1) * np.sqrt(w.shape[1])
    return float((-a.max() - torch.logsumexp(a, 0)).item())
