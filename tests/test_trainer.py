"""The MoCAN trainer: the loss, the labelled dataset, and both launch ways with real OpenRLHF."""

from __future__ import annotations

import json
import pickle
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from openrlhf.models.loss import DPOLoss

from conftest import WORDS, tensorboard_scalars, torchrun
from openrlhf_dual import launch
from openrlhf_dual.labels import pair_labels
from openrlhf_dual.trainer import DualConfig, PromptLength, pseudo_preference_loss


def random_logps(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-10 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_hard_labels_equal_openrlhf_dpo_loss(beta):
    pc, pr, rc, rr = random_logps()
    ones = torch.ones(64, dtype=torch.float64)
    ours, ours_c, ours_r = pseudo_preference_loss(pc, pr, rc, rr, ones, beta)
    theirs, theirs_c, theirs_r = DPOLoss(beta)(pc, pr, rc, rr)
    assert abs(ours.item() - theirs.item()) < 1e-6
    assert torch.allclose(ours_c, theirs_c) and torch.allclose(ours_r, theirs_r)
    # label 0 means the "rejected" response is preferred: DPOLoss with the pair swapped
    ours0, _, _ = pseudo_preference_loss(pc, pr, rc, rr, torch.zeros(64, dtype=torch.float64), beta)
    swapped, _, _ = DPOLoss(beta)(pr, pc, rr, rc)
    assert abs(ours0.item() - swapped.item()) < 1e-6


def test_soft_label_optimum_is_the_label():
    """Minimising the loss over the implicit margin z gives sigmoid(beta z) = p."""
    beta, p = 0.1, 0.8
    z = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15)
    zero = torch.zeros(1, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss, _, _ = pseudo_preference_loss(z, zero, zero, zero, torch.tensor([p], dtype=torch.float64), beta)
        loss.backward()
        return loss

    opt.step(closure)
    assert abs(torch.sigmoid(beta * z).item() - p) < 1e-6


def test_prompt_length_survives_pickle_and_list_doubling():
    x = PromptLength(7, 0.25)
    y = pickle.loads(pickle.dumps(x))
    assert y == 7 and y.label == 0.25 and isinstance(y, int)
    assert [p.label for p in [x] * 2] == [0.25, 0.25]


TEXTS = {"A": ("good fine kind", "bad harm rude"), "B": ("w1 w2 w3", "w4 w5 w6")}
LONG_ROW = 1  # the row whose prompt is too long for --data.max_len 64: OpenRLHF's dataset drops it


def pair_rows(n=64, seed=0) -> list[dict]:
    """n pairs, each with its own scores, alternating two kinds: in A the chosen response is helpful
    but unsafe (r + lam.g prefers it at lam = 0, not at lam = 2); in B the reverse. Plus one row
    (at LONG_ROW) that OpenRLHF filters out, so labels must survive filtering too."""
    rng = np.random.default_rng(seed)
    words = random.Random(seed)
    rows = []
    for i in range(n):
        u, v = rng.uniform(0, 0.5, 2)
        kind = "AB"[i % 2]
        sign = 1.0 if kind == "A" else -1.0
        rows.append({
            "prompt": " ".join(words.choice(WORDS[:40]) for _ in range(4)) + " ",
            "chosen": TEXTS[kind][0], "rejected": TEXTS[kind][1], "kind": kind,
            "chosen_reward": sign * (1.0 + u), "chosen_safety": [-sign * (1.0 + v)],
            "rejected_reward": 0.0, "rejected_safety": [sign * 1.0],
        })  # fmt: skip
    long = dict(rows[0], prompt=" ".join(["w1"] * 70) + " ", kind="long")
    return rows[:LONG_ROW] + [long] + rows[LONG_ROW:]


def expected_labels(rows, lam, beta_dual, beta_policy):
    """sigmoid(beta_policy / beta_dual * (r(c) + lam g(c) - r(r) - lam g(r))) for every row, by hand."""
    margin = np.array([r["chosen_reward"] + lam * r["chosen_safety"][0] - r["rejected_reward"] - lam * r["rejected_safety"][0]
                       for r in rows])  # fmt: skip
    return 1 / (1 + np.exp(-beta_policy / beta_dual * margin))


def write_prep_dir(root, lam, beta=0.1, n=64, seed=0):
    """A hand-made prep directory (dual.json and pairs.jsonl, see pair_rows)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dual.json").write_text(json.dumps({"lam": [lam], "beta": beta, "feasible": True}))
    with open(root / "pairs.jsonl", "w") as f:
        for row in pair_rows(n, seed):
            f.write(json.dumps(row) + "\n")
    return root


def test_dataset_carries_labels(tiny_model_dir, tmp_path):
    """Every row's label, after OpenRLHF's filtering and collate, is that row's own."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from openrlhf_dual.trainer import PseudoPreferenceDataset

    prep = write_prep_dir(tmp_path / "prep", lam=2.0, beta=0.1, n=12)
    data = load_dataset("json", data_files=str(prep / "pairs.jsonl"), split="train")
    args = SimpleNamespace(
        data=SimpleNamespace(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected", apply_chat_template=False),
        model=SimpleNamespace(beta=0.2),  # label temperature beta_policy / beta_dual = 2
    )
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ds = PseudoPreferenceDataset(
        data, tok, 64, SimpleNamespace(args=args), dual=DualConfig("mocan", str(prep)), num_processors=1
    )
    rows = [r for r in pair_rows(12) if r["kind"] != "long"]
    assert len(ds) == 12
    want = expected_labels(rows, 2.0, 0.1, 0.2)
    assert len(set(np.round(want, 6))) == 12  # every pair has its own label
    order = [5, 0, 11, 3, 7, 1, 2, 4, 6, 8, 9, 10]  # a batch in another order, as a sampler makes
    chosen_ids, _, reject_ids, _, lengths = ds.collate_fn([ds[i] for i in order])
    assert all(isinstance(p, PromptLength) for p in lengths)
    for b, i in enumerate(order):
        assert lengths[b].label == pytest.approx(want[i], abs=1e-12), (b, i)
        prompt_len = len(tok(rows[i]["prompt"], add_special_tokens=False)["input_ids"])
        assert int(lengths[b]) == prompt_len
        text = tok.decode(chosen_ids[b], skip_special_tokens=True)
        assert text.split() == (rows[i]["prompt"] + rows[i]["chosen"]).split(), (b, text)
        assert tok.decode(reject_ids[b], skip_special_tokens=True).endswith(rows[i]["rejected"])
    hard = PseudoPreferenceDataset(data, tok, 64, SimpleNamespace(args=args), num_processors=1,
                                   dual=DualConfig("mocan", str(prep), lam=(0.5,), hard_labels=True, label_seed=3))  # fmt: skip
    draws = pair_labels(*score_arrays(pair_rows(12)), [0.5], 0.1, 0.2, hard=True, seed=3)
    kept = [j for j, r in enumerate(pair_rows(12)) if r["kind"] != "long"]
    assert [hard[i][4].label for i in range(12)] == draws[kept].tolist()


def score_arrays(rows):
    """(chosen_reward [n], chosen_safety [n, 1], rejected_reward [n], rejected_safety [n, 1])."""
    return tuple(np.array([r[k] for r in rows]) for k in ("chosen_reward", "chosen_safety", "rejected_reward",
                                                          "rejected_safety"))  # fmt: skip


def test_missing_score_column_is_a_clear_error(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from openrlhf_dual.trainer import PseudoPreferenceDataset

    prep = write_prep_dir(tmp_path / "prep", lam=1.0, n=2)
    data = Dataset.from_list([{"prompt": "w1", "chosen": "good", "rejected": "bad"}])
    args = SimpleNamespace(model=SimpleNamespace(beta=0.1), data=SimpleNamespace(apply_chat_template=False))
    strategy = SimpleNamespace(args=args)  # OpenRLHF's parsed args always carry both sections
    with pytest.raises(ValueError, match="lacks columns.*chosen_reward"):
        PseudoPreferenceDataset(data, AutoTokenizer.from_pretrained(tiny_model_dir), 64, strategy,
                                dual=DualConfig("mocan", str(prep)))


def test_pair_labels_temperature():
    p = pair_labels(np.array([1.0]), np.array([[0.0]]), np.array([0.0]), np.array([[1.0]]), np.array([0.5]), 0.1, 0.2)
    assert p[0] == pytest.approx(1 / (1 + np.exp(-2 * 0.5)))


def test_hard_labels_are_bernoulli_draws_of_each_pairs_probability():
    """Each pair's hard label is 1 with its own soft label's probability: per-probability
    frequencies over interleaved pairs (a coin, or labels shuffled across pairs, fail), seeded."""
    probs = np.array([0.02, 0.2, 0.5, 0.8, 0.98])
    n = 2000
    margin = np.tile(np.log(probs / (1 - probs)), n)  # pair i has probability probs[i % 5]
    args = (margin, np.zeros((5 * n, 1)), np.zeros(5 * n), np.zeros((5 * n, 1)), [1.0], 0.1, 0.1)
    np.testing.assert_allclose(pair_labels(*args), np.tile(probs, n), rtol=1e-12)
    hard = pair_labels(*args, hard=True, seed=3)
    assert set(np.unique(hard)) == {0.0, 1.0}
    freq = hard.reshape(n, 5).mean(axis=0)
    assert np.all(np.abs(freq - probs) <= 4.5 * np.sqrt(probs * (1 - probs) / n)), freq
    assert np.array_equal(pair_labels(*args, hard=True, seed=3), hard)
    assert not np.array_equal(pair_labels(*args, hard=True, seed=4), hard)
    sure = pair_labels(np.array([50.0, -50.0]), np.zeros((2, 1)), np.zeros(2), np.zeros((2, 1)), [0.0], 0.1, 0.1,
                       hard=True)  # fmt: skip
    assert sure.tolist() == [1.0, 0.0]
    assert np.array_equal(pair_labels(*args, hard=True), pair_labels(*args, hard=True, seed=0))  # the default seed


def test_dual_config_refuses_a_prep_dir_of_the_other_algo_or_no_lambda(tmp_path):
    mocan, pecan = tmp_path / "mocan", tmp_path / "pecan"
    for root, form in ((mocan, "model"), (pecan, "margin")):
        root.mkdir()
        (root / "dual.json").write_text(json.dumps({"lam": [0.5, 0.0], "beta": 0.2, "form": form}))
    lam, beta = DualConfig("mocan", str(mocan)).multiplier()
    assert lam.tolist() == [0.5, 0.0] and beta == 0.2
    assert DualConfig("pecan", str(pecan)).multiplier()[0].tolist() == [0.5, 0.0]
    with pytest.raises(ValueError, match="prepared with --dual.algo pecan; train with --dual.algo pecan"):
        DualConfig("mocan", str(pecan)).solution()
    with pytest.raises(ValueError, match="prepared with --dual.algo mocan; train with --dual.algo mocan"):
        DualConfig("pecan", str(mocan)).solution()
    assert DualConfig("mocan", str(mocan), lam=(1.5, 2.0)).multiplier()[0].tolist() == [1.5, 2.0]
    for bad in ((-0.1, 0.0), (float("inf"), 0.0)):
        with pytest.raises(ValueError, match="lambda must be finite and >= 0"):
            DualConfig("mocan", str(mocan), lam=bad).multiplier()
    (mocan / "dual.json").write_text(json.dumps({"lam": [None], "beta": 0.2, "form": "model"}))  # infeasible
    with pytest.raises(ValueError, match="is the threshold infeasible"):
        DualConfig("mocan", str(mocan)).multiplier()
    with pytest.raises(FileNotFoundError, match="run `python -m openrlhf_dual.cli.prepare` first"):
        DualConfig("mocan", str(tmp_path / "none")).solution()


def trainer_args(ipo: bool) -> SimpleNamespace:
    """The parts of OpenRLHF's train_dpo arguments its DPOTrainer reads at construction."""
    return SimpleNamespace(
        model=SimpleNamespace(label_smoothing=0.0, ipo_enable=ipo, aux_loss_coef=0.0, nll_loss_coef=0.0),
        ds=SimpleNamespace(packing_samples=False),
        logger=SimpleNamespace(wandb=SimpleNamespace(key=None), tensorboard_dir=None),
    )


def test_mocan_trainer_refuses_ipo(tmp_path):
    """OpenRLHF's DPOTrainer construction (no model needed) with --model.ipo_enable: refused, since
    IPO's loss has no soft-label form; without it, the trainer takes lambda from the prep dir."""
    from openrlhf_dual.trainer import MoCANTrainer

    prep = write_prep_dir(tmp_path / "prep", lam=1.5, n=2)
    parts = dict(model=None, ref_model=None, tokenizer=None, optim=None, train_dataloader=None, eval_dataloader=None,
                 scheduler=None, beta=0.1, dual=DualConfig("mocan", str(prep)))  # fmt: skip
    with pytest.raises(ValueError, match="--model.ipo_enable has no pseudo-preference form"):
        MoCANTrainer(strategy=SimpleNamespace(args=trainer_args(ipo=True)), **parts)
    trainer = MoCANTrainer(strategy=SimpleNamespace(args=trainer_args(ipo=False)), **parts)
    assert trainer.lam.tolist() == [1.5] and trainer.loss_fn == trainer._loss


TRAIN_FLAGS = [
    "--data.max_len", "64", "--ds.attn_implementation", "eager", "--ds.zero_stage", "2",
    "--train.micro_batch_size", "4", "--train.batch_size", "8", "--train.max_epochs", "2",
    "--adam.lr", "1e-3", "--logger.logging_steps", "1",
]


def step_label_means(rows: list[dict], labels: np.ndarray, epochs: int, seed: int = 42) -> list[float]:
    """The mean label of each optimizer step's 8 pairs (2 ranks x micro batch 4), with the pairs each
    rank draws from OpenRLHF's own DistributedSampler (seeded with --train.seed, as its
    setup_dataloader makes it) over the dataset left after OpenRLHF's filtering."""
    from openrlhf.utils.distributed_sampler import DistributedSampler

    kept = [i for i, r in enumerate(rows) if r["kind"] != "long"]
    means = []
    for epoch in range(epochs):
        per_rank = []
        for rank in range(2):
            sampler = DistributedSampler(kept, num_replicas=2, rank=rank, shuffle=True, seed=seed, drop_last=True)
            sampler.set_epoch(epoch)
            per_rank.append([kept[i] for i in sampler])
        for step in range(len(per_rank[0]) // 4):
            means.append(float(np.mean([labels[i] for r in per_rank for i in r[4 * step : 4 * step + 4]])))
    return means


def preference_shift(model_dir, adapter_dir=None, *, reference_dir) -> dict[str, float]:
    """For each kind of pair: the trained policy's log pi(chosen) - log pi(rejected) minus the
    reference's (nats, summed over response tokens and EOS, as DPO scores a pair), averaged over
    the kind's pairs. Weights loaded from what the run saved (a LoRA adapter onto the reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reference_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        policy = PeftModel.from_pretrained(policy, adapter_dir)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32)

    def logp(model, prompt, response):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].double().log_softmax(-1)
        return float(logits[torch.arange(len(p) - 1, ids.shape[1] - 1), ids[0, len(p) :]].sum())

    out = {}
    for kind in ("A", "B"):
        shifts = []
        for r in [r for r in pair_rows() if r["kind"] == kind][:8]:
            pol = logp(policy, r["prompt"], r["chosen"]) - logp(policy, r["prompt"], r["rejected"])
            ref = logp(reference, r["prompt"], r["chosen"]) - logp(reference, r["prompt"], r["rejected"])
            shifts.append(pol - ref)
        out[kind] = float(np.mean(shifts))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, extra, used, hard",
    [
        # patched OpenRLHF: the user's unchanged train_dpo command plus --dual.* (entry-point plugin)
        ("openrlhf.cli.train_dpo", [], 2.0, False),
        # stock OpenRLHF: our launcher module; --dual.lambda overrides the solved lambda (2.0), with
        # hard (Bernoulli) labels
        ("openrlhf_dual.cli.train_dpo", ["--dual.lambda", "0.0", "--dual.hard_labels", "--dual.label_seed", "5"], 0.0,
         True),
    ],
)  # fmt: skip
def test_mocan_launch_ways(module, extra, used, hard, tiny_model_dir, tmp_path):
    prep = write_prep_dir(tmp_path / "prep", lam=2.0)
    tb = tmp_path / "tb"
    torchrun(
        module,
        ["--model.model_name_or_path", str(tiny_model_dir), "--ckpt.output_dir", str(tmp_path / "ckpt"),
         "--logger.tensorboard_dir", str(tb), *TRAIN_FLAGS, "--dual.algo", "mocan", "--dual.prep_dir", str(prep), *extra],
        cwd=tmp_path,
    )
    assert tensorboard_scalars(tb, "train/lambda_0") == pytest.approx([used] * 16)
    rows = pair_rows()
    labels = expected_labels(rows, used, 0.1, 0.1)
    if hard:
        labels = pair_labels(*score_arrays(rows), [used], 0.1, 0.1, hard=True, seed=5)
        assert max(tensorboard_scalars(tb, "train/label_entropy")) < 1e-9
    # each step's logged mean label is that of the pairs the sampler put in the step
    assert tensorboard_scalars(tb, "train/label_mean") == pytest.approx(step_label_means(rows, labels, 2), abs=1e-6)
    # The saved policy moves towards the labels' preference for each kind of pair, not towards the
    # "chosen" column: at lambda 2 the safe response of each pair (A's rejected, B's chosen).
    shift = preference_shift(tmp_path / "ckpt", reference_dir=tiny_model_dir)
    direction = 1.0 if used == 0.0 else -1.0
    assert direction * shift["A"] > 0.5 and -direction * shift["B"] > 0.5, shift
    # the policy agrees with its labels more often than not over the last epoch (one step's 8 hard
    # labels are too few: a B pair's label is 1 one time in 4 at lambda 0)
    assert np.mean(tensorboard_scalars(tb, "train/label_agreement")[-8:]) > 0.6


@pytest.mark.slow
def test_mocan_with_zero3_lora_gradient_checkpointing_and_resume(tiny_model_dir, tmp_path):
    """OpenRLHF's own features keep working under MoCAN: ZeRO-3, LoRA, gradient checkpointing,
    DeepSpeed checkpoints, and resuming from them: a run resumed from its step-4 checkpoint (as if
    stopped there) trains steps 5 to 8 with the losses of the uninterrupted run."""
    prep = write_prep_dir(tmp_path / "prep", lam=2.0)
    flags = [
        "--model.model_name_or_path", str(tiny_model_dir), "--data.max_len", "64", "--ds.attn_implementation", "eager",
        "--ds.zero_stage", "3", "--ds.lora.rank", "4", "--ds.lora.alpha", "8", "--model.gradient_checkpointing_enable",
        "--train.micro_batch_size", "4", "--train.batch_size", "8", "--train.max_epochs", "1", "--adam.lr", "1e-2",
        "--logger.logging_steps", "1", "--ckpt.save_steps", "4",
        "--ckpt.path", str(tmp_path / "ckpts"), "--dual.algo", "mocan", "--dual.prep_dir", str(prep),
    ]  # fmt: skip
    torchrun("openrlhf_dual.cli.train_dpo",
             [*flags, "--ckpt.output_dir", str(tmp_path / "out"), "--logger.tensorboard_dir", str(tmp_path / "tb")],
             cwd=tmp_path)  # fmt: skip
    shift = preference_shift(tiny_model_dir, tmp_path / "out", reference_dir=tiny_model_dir)
    assert shift["A"] < -0.5 and shift["B"] > 0.5, shift  # lambda = 2: towards each pair's safe response
    assert {p.name for p in (tmp_path / "ckpts").iterdir()} >= {"global_step4", "global_step8"}
    (tmp_path / "ckpts" / "latest").write_text("global_step4")
    out = torchrun("openrlhf_dual.cli.train_dpo",
                   [*flags, "--ckpt.load_enable", "--ckpt.output_dir", str(tmp_path / "resumed"),
                    "--logger.tensorboard_dir", str(tmp_path / "tb_resumed")], cwd=tmp_path)  # fmt: skip
    assert "consumed_samples: 32" in out
    whole = launch.read_scalars(tmp_path / "tb", "train/loss")
    resumed = launch.read_scalars(tmp_path / "tb_resumed", "train/loss")
    assert [s for s, _, _ in whole] == list(range(1, 9)) and [s for s, _, _ in resumed] == [5, 6, 7, 8]
    np.testing.assert_allclose([v for *_, v in resumed], [v for *_, v in whole[4:]], rtol=1e-3)
    assert np.ptp([v for *_, v in whole]) > 0.01  # the loss moves, so continuity means something
    again = preference_shift(tiny_model_dir, tmp_path / "resumed", reference_dir=tiny_model_dir)
    assert again == pytest.approx(shift, rel=1e-3)
