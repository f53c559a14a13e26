"""The primal steps that keep absolute mass: the weighted-likelihood objective on OpenRLHF's SFT
trainer, and the dual-weighted likelihood anchor of the DPO objective."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from conftest import tensorboard_scalars, torchrun
from openrlhf_dual.labels import pair_labels, sample_weights
from openrlhf_dual.trainer import DualConfig, pair_anchor_weights, pseudo_preference_loss, weighted_likelihood_loss


def tabular_world(seed=0, k=6):
    rng = np.random.default_rng(seed)
    ref = rng.dirichlet(np.ones(k))
    return ref, rng.normal(size=k), rng.normal(size=k)


@pytest.mark.parametrize("beta, lam", [(0.5, 1.3), (0.1, 0.2)])
def test_weighted_likelihood_population_optimum_is_pi_lambda(beta, lam):
    """A sample that holds every response in proportion to pi_ref (the population), weighted by
    sample_weights, through weighted_likelihood_loss, minimised over a free tabular policy by an
    independent optimiser: pi_lambda = pi_ref exp((r + lam g) / beta) / Z, absolute mass included."""
    ref, r, g = tabular_world()
    counts = np.round(ref * 10_000).astype(int)
    ref = counts / counts.sum()  # exactly representable by the sample below
    sample = np.repeat(np.arange(len(ref)), counts)
    w = sample_weights(r[sample][None], g[sample][None, :, None], np.array([lam]), beta)[0]
    assert abs(w.mean() - 1) < 1e-12

    def loss(theta):
        t = torch.tensor(theta, requires_grad=True)
        value = weighted_likelihood_loss(torch.log_softmax(t, 0)[sample], torch.tensor(w))
        value.backward()
        return value.item(), t.grad.numpy()

    theta = minimize(loss, np.zeros(len(ref)), jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15}).x
    found = np.exp(theta - theta.max())
    target = ref * np.exp((r + lam * g) / beta)
    np.testing.assert_allclose(found / found.sum(), target / target.sum(), atol=1e-6)


def test_dpo_is_blind_to_mass_leaving_the_pairs_support_and_the_likelihood_is_not():
    """Scale a policy's mass on the support of pi_ref's pairs by c (the rest goes to a response no
    pair contains): DPO's population loss does not change; the weighted likelihood (and the
    anchor) grow by -log c."""
    ref, r, g = tabular_world(1)
    beta, lam = 0.5, 0.7
    pi = ref * np.exp((r + lam * g) / beta)
    pi /= pi.sum()
    c, rj = np.meshgrid(np.arange(len(ref)), np.arange(len(ref)), indexing="ij")
    c, rj = c.ravel(), rj.ravel()
    labels = torch.tensor(pair_labels(r[c], g[c][:, None], r[rj], g[rj][:, None], [lam], beta, beta))
    pair_w = torch.tensor(ref[c] * ref[rj])
    w = torch.tensor(len(ref) * pi)  # population weights pi_ref(y) w(y) = pi_lambda(y), one row per response

    def losses(scale):
        logp = torch.log(torch.tensor(pi * scale))
        logr = torch.log(torch.tensor(ref))
        dpo = sum(pair_w[i] * pseudo_preference_loss(logp[c][i : i + 1], logp[rj][i : i + 1], logr[c][i : i + 1],
                                                     logr[rj][i : i + 1], labels[i : i + 1], beta)[0]
                  for i in range(len(c)))  # fmt: skip
        return float(dpo), float(weighted_likelihood_loss(logp, w))

    (dpo1, wl1), (dpo2, wl2) = losses(1.0), losses(0.8)
    assert abs(dpo1 - dpo2) < 1e-12
    assert abs((wl2 - wl1) - (-np.log(0.8))) < 1e-9


def test_anchor_weights_are_self_normalised_per_prompt():
    rows = {
        "prompt": ["a", "a", "b"], "prompt_id": [0, 0, 1],
        "chosen_reward": [1.0, 0.0, 2.0], "chosen_safety": [[0.0], [1.0], [0.0]],
        "rejected_reward": [0.0, -1.0, 0.0], "rejected_safety": [[0.0], [0.0], [-1.0]],
    }  # fmt: skip
    w = pair_anchor_weights(rows, np.array([2.0]), 0.5)
    u_a = np.array([1.0, 0.0, 2.0, -1.0])  # r + 2 g of prompt 0's chosen/rejected responses, row by row
    want_a = 4 * np.exp(u_a / 0.5) / np.exp(u_a / 0.5).sum()
    np.testing.assert_allclose(w[:2].ravel(), want_a, rtol=1e-12)
    u_b = np.array([2.0, -2.0])
    np.testing.assert_allclose(w[2], 2 * np.exp(u_b / 0.5) / np.exp(u_b / 0.5).sum(), rtol=1e-12)


def direct_weights(reward, safety, lam, beta):
    """K softmax_k((r + lam . g) / beta) per prompt, written out: safety [N, K, m], lam [m]."""
    u = (reward + np.einsum("nkj,j->nk", safety, lam)) / beta
    e = np.exp(u - u.max(axis=1, keepdims=True))
    return reward.shape[1] * e / e.sum(axis=1, keepdims=True)


def test_sample_weights_are_k_times_each_prompts_softmax_in_float64():
    rng = np.random.default_rng(5)
    reward, safety, lam, beta = rng.normal(size=(4, 6)), rng.normal(size=(4, 6, 2)), np.array([0.7, 1.9]), 0.4
    reward[2] += 4000.0  # prompts on scales far apart: each is normalised on its own
    w = sample_weights(reward, safety, lam, beta)
    assert w.shape == (4, 6) and w.dtype == np.float64 and np.all(np.isfinite(w))
    np.testing.assert_allclose(w, direct_weights(reward, safety, lam, beta), rtol=1e-12)
    np.testing.assert_allclose(w.mean(axis=1), 1.0, rtol=1e-12)
    # one constraint: safety [N, K] and a float lambda are [N, K, 1] and [1]
    w1 = sample_weights(reward, safety[..., 0], 0.7, beta)
    np.testing.assert_allclose(w1, direct_weights(reward, safety[..., :1], np.array([0.7]), beta), rtol=1e-12)
    # float32 and integer scores give the weights of the same values in float64
    r32, g32 = reward.astype(np.float32), safety.astype(np.float32)
    l32 = lam.astype(np.float32)
    want = sample_weights(r32.astype(np.float64), g32.astype(np.float64), l32.astype(np.float64), beta)
    np.testing.assert_array_equal(sample_weights(r32, g32, l32, beta), want)
    ri, gi = np.round(reward).astype(int), np.round(safety).astype(int)
    np.testing.assert_array_equal(sample_weights(ri, gi, [1, 2], beta), sample_weights(ri * 1.0, gi * 1.0, [1.0, 2.0], beta))


def test_sample_weights_refuse_bad_input():
    reward, safety = np.zeros((2, 3)), np.zeros((2, 3, 2))
    for beta in (0.0, -0.5):
        with pytest.raises(ValueError, match=f"beta must be positive, got {beta}"):
            sample_weights(reward, safety, [1.0, 1.0], beta)
    with pytest.raises(ValueError, match="safety has 2 constraints per response but lambda has 3"):
        sample_weights(reward, safety, [1.0, 1.0, 1.0], 0.5)
    for r, g in ((np.where(np.eye(2, 3) > 0, np.nan, reward), safety), (reward, np.where(safety == 0, np.inf, 0.0))):
        with pytest.raises(ValueError, match="^non-finite scores: weights need every sample's reward and safety$"):
            sample_weights(r, g, [1.0, 1.0], 0.5)


def write_sample_prep(root, tok, lam=1.0, beta=0.5, form="model", k=8, n=8, seed=0):
    """A hand-made prep directory of scored samples with real token ids: every response is one of
    "good fine"+EOS (helpful, unsafe), "kind kind"+EOS (safe) or "bad harm" without EOS (unfinished)."""
    from openrlhf_dual.artifacts import write_json, write_jsonl

    rng = np.random.default_rng(seed)
    kinds = {
        "good fine": ((1.0, -1.0), True), "kind kind": ((-0.5, 1.0), True), "bad harm": ((0.5, -2.0), False),
    }  # fmt: skip
    prompts, samples, scores = [], [], []
    for i in range(n):
        prompts.append({"id": i, "raw": f"w{i}", "prompt": f"user : w{i} w{i + 1} assistant : "})
        texts = rng.choice(list(kinds), size=k)
        ids = [tok(t, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if kinds[t][1] else []) for t in texts]
        samples.append({"id": i, "responses": [{"text": t, "token_ids": x, "finished": kinds[t][1]} for t, x in zip(texts, ids)]})
        scores.append([kinds[t][0] for t in texts])
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "prompts.jsonl", prompts)
    write_jsonl(root / "samples" / "shard-00000.jsonl", samples)
    (root / "scores").mkdir()
    np.save(root / "scores" / "shard-00000.npy", np.array(scores))
    write_json(root / "dual.json", {"lam": [lam], "beta": beta, "feasible": True, "form": form})
    return root, np.array(scores)


def sample_dataset(tiny_model_dir, prep, lam=None, max_len=64):
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from openrlhf_dual.likelihood import WeightedSampleDataset

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = load_dataset("json", data_files=str(prep / "prompts.jsonl"), split="train")
    return WeightedSampleDataset(data, tok, max_len, SimpleNamespace(args=None),
                                 dual=DualConfig("mocan" if "margin" not in (prep / "dual.json").read_text() else "pecan",
                                                 str(prep), lam=lam)), tok  # fmt: skip


@pytest.mark.parametrize("form", ["model", "margin"])
def test_sample_dataset_weights_exact_token_ids(tiny_model_dir, tmp_path, form):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    beta, lam = 0.5, 1.5
    prep, scores = write_sample_prep(tmp_path / "prep", tok, lam=lam, beta=beta, form=form)
    ds, tok = sample_dataset(tiny_model_dir, prep)
    assert len(ds) == 8 * 8
    u = scores[..., 0] + lam * scores[..., 1]
    logits = u if form == "margin" else u / beta  # PeCAN: w proportional to exp(s_r + lam s_g)
    want = 8 * np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(ds.weights.reshape(8, 8), want, rtol=1e-12)
    samples = [json.loads(line)["responses"] for line in (prep / "samples" / "shard-00000.jsonl").read_text().splitlines()]
    batch = ds.collate_fn([ds[i] for i in range(10)])
    for row in range(10):
        ids, mask, loss_mask = (x[row] for x in batch)
        head = tok("user : w0 w1 assistant : ", add_special_tokens=False)["input_ids"]
        resp = samples[0][row]["token_ids"] if row < 8 else samples[1][row - 8]["token_ids"]
        n = int(mask.sum())
        assert ids[len(head) : n].tolist() == resp  # as generated: no EOS added to the unfinished ones
        weighted = loss_mask[: n - 1]
        assert (weighted[len(head) - 1 :] == float(ds.weights[row])).all() and (weighted[: len(head) - 1] == 0).all()
    ds2, _ = sample_dataset(tiny_model_dir, prep, lam=(0.0,))
    assert not np.allclose(ds2.weights, ds.weights)
    with pytest.raises(ValueError, match="max_len"):
        sample_dataset(tiny_model_dir, prep, max_len=8)


SFT_FLAGS = [
    "--data.max_len", "64", "--ds.attn_implementation", "eager", "--ds.zero_stage", "2",
    "--train.micro_batch_size", "8", "--train.batch_size", "16", "--train.max_epochs", "4",
    "--adam.lr", "1e-2", "--logger.logging_steps", "1",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, extra, favoured",
    [
        # patched OpenRLHF: the user's unchanged train_sft command plus --dual.* (entry-point plugin)
        ("openrlhf.cli.train_sft", [], "kind kind"),
        # stock OpenRLHF: our launcher; --dual.lambda 0 makes the helpful responses win
        ("openrlhf_dual.cli.train_sft", ["--dual.lambda", "0.0"], "good fine"),
    ],
)
def test_weighted_likelihood_launch_ways(module, extra, favoured, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prep, _ = write_sample_prep(tmp_path / "prep", tok, lam=1.5, beta=0.5)
    tb = tmp_path / "tb"
    torchrun(module, ["--model.model_name_or_path", str(tiny_model_dir), "--ckpt.output_dir", str(tmp_path / "ckpt"),
                      "--logger.tensorboard_dir", str(tb), *SFT_FLAGS, "--dual.algo", "mocan", "--dual.prep_dir",
                      str(prep), *extra], cwd=tmp_path)  # fmt: skip
    steps = 4 * 64 // 16
    assert tensorboard_scalars(tb, "train/lambda_0") == pytest.approx([0.0 if extra else 1.5] * steps)
    head = tok("user : w3 w4 assistant : ", add_special_tokens=False)["input_ids"]

    def logps(model_dir) -> dict:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        out = {}
        for text in ("good fine", "kind kind", "bad harm"):
            ids = head + tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if text != "bad harm" else [])
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
            out[text] = lp[len(head) - 1 :].gather(-1, torch.tensor(ids[len(head) :])[:, None]).sum().item()
        return out

    before, after = logps(tiny_model_dir), logps(tmp_path / "ckpt")
    gain = {t: after[t] - before[t] for t in before}
    assert max(gain, key=gain.get) == favoured, gain  # the largest weight gains the most
    # mass moves onto the samples' support (as generated: "bad harm" unfinished, without EOS)
    assert np.logaddexp.reduce(list(after.values())) > np.logaddexp.reduce(list(before.values())) + np.log(100)


@pytest.mark.slow
def test_dpo_anchor_launch(tiny_model_dir, tmp_path):
    """--dual.anchor through the stock launcher: the anchor's loss is logged and falls. Here it is
    -log pi(rejected) (weights ~ (0, 2): lambda = 2 makes every "rejected" response the dual's
    favourite), so it falls by the log-likelihood the favoured responses gain."""
    from test_trainer import TRAIN_FLAGS, write_prep_dir

    prep = write_prep_dir(tmp_path / "prep", lam=2.0)
    tb = tmp_path / "tb"
    torchrun("openrlhf_dual.cli.train_dpo", ["--model.model_name_or_path", str(tiny_model_dir), "--ckpt.output_dir",
                                             str(tmp_path / "ckpt"), "--logger.tensorboard_dir", str(tb), *TRAIN_FLAGS,
                                             "--dual.algo", "mocan", "--dual.prep_dir", str(prep),
                                             "--dual.anchor", "0.5"], cwd=tmp_path)  # fmt: skip
    anchor = tensorboard_scalars(tb, "train/anchor_loss")
    assert len(anchor) == 16 and anchor[-1] < anchor[0] - 1.0, anchor


def test_pseudo_preference_dataset_carries_anchor_weights(tiny_model_dir, tmp_path):
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from openrlhf_dual.trainer import PseudoPreferenceDataset
    from test_trainer import pair_rows, write_prep_dir

    prep = write_prep_dir(tmp_path / "prep", lam=2.0, n=8)
    data = load_dataset("json", data_files=str(prep / "pairs.jsonl"), split="train")
    args = SimpleNamespace(
        data=SimpleNamespace(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected", apply_chat_template=False),
        model=SimpleNamespace(beta=0.1),
    )
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batches = {}
    for anchor in (0.0, 1.0):
        ds = PseudoPreferenceDataset(data, tok, 64, SimpleNamespace(args=args),
                                     dual=DualConfig("mocan", str(prep), anchor=anchor), num_processors=1)  # fmt: skip
        batches[anchor] = ds.collate_fn([ds[i] for i in range(len(ds))])[4]
    # one pair per prompt (the long row dropped by OpenRLHF's filter): weights 2 softmax(u / beta_dual)
    # over the pair's two responses, u = r + lam.g, each row with its own scores
    rows = [r for r in pair_rows(8) if r["kind"] != "long"]
    assert len({r["prompt"] for r in rows}) == len(rows) == len(batches[1.0])
    for row, p in zip(rows, batches[1.0]):
        u = np.array([row["chosen_reward"] + 2.0 * row["chosen_safety"][0], row["rejected_reward"] + 2.0 * row["rejected_safety"][0]])
        want = 2 * np.exp((u - u.max()) / 0.1) / np.exp((u - u.max()) / 0.1).sum()
        assert p.weights == pytest.approx(tuple(want), rel=1e-9)
    assert all(p.weights == (0.0, 0.0) for p in batches[0.0])
    assert [p.label for p in batches[1.0]] == [p.label for p in batches[0.0]]
