"""Whole-distribution evaluation: the prefix tree against direct forward passes, and its bounds
against the exact values of a full enumeration computed independently."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from openrlhf_dual.demo.tree import expand, log_prob_floor
from openrlhf_dual.demo.whole import Enumeration, exact_multiplier, optimum_distribution, whole_distribution

CAP, BETA, LAM = 3, 0.5, 0.8


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """The tiny LM and a perturbed copy, as policy P and reference R; token values for r and g."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    policy = copy.deepcopy(ref)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = np.random.default_rng(0)
    values = rng.normal(size=(ref.config.vocab_size, 2))  # per-token reward and safety
    heads = [tok(f"user : w{i} w{i + 1} assistant :", add_special_tokens=False)["input_ids"] for i in range(2)]
    heads.append(tok("user : w7 assistant :", add_special_tokens=False)["input_ids"])  # another length
    return policy, ref, tok.eos_token_id, values, heads


def grow(models, heads, eos, eps, values):
    return expand(models, heads, eos, CAP, eps, token_scores=[values] * len(heads))


def enumerations(trees, values, eos) -> list[Enumeration]:
    """Scores: the sum of the response tokens' values; "the set": responses of CAP - 1 tokens, then EOS."""
    return [Enumeration(
        logp=t.logp[:, 0], logp_ref=t.logp[:, -1], scores=t.scores,
        on_set=(t.leaf_token == eos) & np.array([len(t.nodes[n]) == CAP - 1 for n in t.leaf_node], dtype=bool),
        cut_logp=t.cut_logp[:, 0], cut_logp_ref=t.cut_logp[:, -1], cut_scores=t.cut_scores,
        cut_tokens=(CAP - t.cut_depth).astype(np.float64), token_scores=values,
    ) for t in trees]  # fmt: skip


def test_tree_leaves_and_cuts_hold_all_the_mass_with_exact_log_probs(models):
    policy, ref, eos, values, heads = models
    trees = grow([policy, ref], heads, eos, 1e-3, values)
    for head, t in zip(heads, trees):
        total = np.logaddexp(np.logaddexp.reduce(t.logp, axis=0), np.logaddexp.reduce(t.cut_logp, axis=0))
        np.testing.assert_allclose(total, 0.0, atol=1e-9)  # every model's mass, to the last bit
        assert len(t.cut_node) > 0 and (t.cut_depth < CAP).all()
        leaves = [t.leaf(k) for k in range(len(t.logp))]
        assert all(leaf[-1] == eos or len(leaf) == CAP for leaf in leaves)
        assert all(eos not in leaf[:-1] for leaf in leaves) and len(set(leaves)) == len(leaves)
        for k in np.random.default_rng(0).choice(len(leaves), 5, replace=False):  # a direct forward pass
            ids = torch.tensor([head + list(leaves[k])])
            np.testing.assert_allclose(t.scores[k], values[[v for v in leaves[k]]].sum(0), atol=1e-12)
            for j, model in enumerate((policy, ref)):
                with torch.no_grad():
                    lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
                direct = lp[len(head) - 1 :].gather(-1, ids[0, len(head) :, None]).sum().item()
                assert abs(direct - t.logp[k, j]) < 1e-4


def test_memoised_reference_gives_the_same_tree(models):
    policy, ref, eos, values, heads = models
    plain = grow([policy, ref], heads, eos, 1e-3, values)
    memo: dict = {}
    for _ in range(2):
        again = expand([policy, ref], heads, eos, CAP, 1e-3, token_scores=[values] * len(heads), memo=[None, memo])
        for a, b in zip(plain, again):
            assert a.nodes == b.nodes and (a.leaf_token == b.leaf_token).all() and (a.cut_node == b.cut_node).all()
            np.testing.assert_allclose(a.logp, b.logp, atol=1e-5)
            np.testing.assert_allclose(a.cut_logp, b.cut_logp, atol=1e-5)
        assert len(memo) == sum(len(t.nodes) for t in plain)  # one entry per expanded prefix, none recomputed


def test_bounds_contain_the_exact_whole_distribution_values(models):
    """Full enumeration (eps = 0) computed directly; pruned enumerations must bracket it."""
    policy, ref, eos, values, heads = models
    full = enumerations(grow([policy, ref], heads, eos, 0.0, values), values, eos)
    assert all(len(e.cut_logp) == 0 for e in full)
    kl, kl_ref, on, e_g, e_r = [], [], [], [], []
    for e in full:  # the direct way: Q normalised over every response
        p, r = np.exp(e.logp), np.exp(e.logp_ref)
        q = r * np.exp((e.scores[:, 0] + LAM * e.scores[:, 1]) / BETA)
        q /= q.sum()
        kl.append(np.sum(p * np.log(p / q)))
        kl_ref.append(np.sum(r * np.log(r / q)))
        on.append(p[e.on_set].sum())
        e_g.append(p @ e.scores[:, 1])
        e_r.append(q @ e.scores[:, 0])
    truth = {"kl": np.mean(kl), "kl_ref": np.mean(kl_ref), "on": np.mean(on), "g": np.mean(e_g), "opt_r": np.mean(e_r)}
    L = -log_prob_floor(ref)
    exact = whole_distribution(full, optimum_distribution(full, [LAM], BETA), [LAM], BETA, L)
    for got, want in ((exact["kl_to_optimum"], truth["kl"]), (exact["kl_ref_to_optimum"], truth["kl_ref"]),
                      (exact["policy"]["mass_on_set"], truth["on"]), (exact["policy"]["safety"][0], truth["g"]),
                      (exact["optimum"]["reward"], truth["opt_r"])):  # fmt: skip
        np.testing.assert_allclose(got, [want, want], rtol=1e-9, atol=1e-12)  # nothing unseen: no width
    assert truth["kl"] > 0.05 and truth["kl_ref"] > 0.05  # a case with something to measure
    for eps in (1e-3, 3e-2):
        opt = optimum_distribution(enumerations(grow([ref], heads, eos, eps, values), values, eos), [LAM], BETA)
        b = whole_distribution(enumerations(grow([policy, ref], heads, eos, eps, values), values, eos), opt, [LAM], BETA, L)
        assert b["unseen"]["policy"] > 0 and b["unseen"]["reference"] > 0
        for (lo, hi), want in ((b["kl_to_optimum"], truth["kl"]), (b["kl_ref_to_optimum"], truth["kl_ref"]),
                               (b["policy"]["mass_on_set"], truth["on"]), (b["policy"]["safety"][0], truth["g"]),
                               (b["optimum"]["reward"], truth["opt_r"])):  # fmt: skip
            assert lo - 1e-12 <= want <= hi + 1e-12, (eps, lo, want, hi)
            assert hi - lo > 0
        assert all(b[k]["mass_on_set"][1] <= 1.0 for k in ("policy", "optimum", "reference"))  # a probability


def test_log_prob_floor_holds(models):
    policy, ref, *_ = models
    for model in (policy, ref):
        floor = log_prob_floor(model)
        ids = torch.randint(0, model.config.vocab_size, (64, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits.double(), -1)
        assert lp.min().item() >= floor and floor > -1e3


def test_exact_multiplier_meets_the_threshold_on_the_whole_distribution(models):
    """lambda* from the enumeration against a root of E_Q[g] = b found independently (brentq)."""
    policy, ref, eos, values, heads = models
    enums = enumerations(grow([ref], heads, eos, 0.0, values), values, eos)

    def safety_at(lam):
        vals = []
        for e in enums:
            x = e.logp_ref + (e.scores[:, 0] + lam * e.scores[:, 1]) / BETA
            q = np.exp(x - x.max())
            vals.append((q / q.sum()) @ e.scores[:, 1])
        return np.mean(vals)

    b = safety_at(0.0) + 0.5 * (safety_at(5.0) - safety_at(0.0))
    lam = exact_multiplier(enums, [b], BETA)[0]
    assert abs(lam - brentq(lambda x: safety_at(x) - b, 0.0, 5.0, xtol=1e-12)) < 1e-7
    assert abs(optimum_distribution(enums, [lam], BETA)["optimum"]["safety"][0][0] - b) < 1e-8
