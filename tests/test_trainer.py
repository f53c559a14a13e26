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


def write_prep_dir(root, lam, beta=0.1, n=64, seed=0):
    """A hand-made prep directory: chosen responses are helpful but unsafe, rejected ones safe."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dual.json").write_text(json.dumps({"lam": [lam], "beta": beta, "feasible": True}))
    rng = random.Random(seed)
    with open(root / "pairs.jsonl", "w") as f:
        for _ in range(n):
            row = {
                "prompt": " ".join(rng.choice(WORDS[:40]) for _ in range(4)),
                "chosen": "good fine kind",
                "rejected": "bad harm rude",
                "chosen_reward": 1.0,
                "chosen_safety": [-1.0],
                "rejected_reward": 0.0,
                "rejected_safety": [1.0],
            }
            f.write(json.dumps(row) + "\n")
    return root


def test_dataset_carries_labels(tiny_model_dir, tmp_path):
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from openrlhf_dual.trainer import PseudoPreferenceDataset

    prep = write_prep_dir(tmp_path / "prep", lam=2.0, n=8)
    data = load_dataset("json", data_files=str(prep / "pairs.jsonl"), split="train")
    args = SimpleNamespace(
        data=SimpleNamespace(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected", apply_chat_template=False),
        model=SimpleNamespace(beta=0.1),
    )
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ds = PseudoPreferenceDataset(
        data, tok, 64, SimpleNamespace(args=args), dual=DualConfig("mocan", str(prep)), num_processors=1
    )
    expected = 1 / (1 + np.exp(3.0))  # sigmoid((1 - 2) - (0 + 2))
    batch = ds.collate_fn([ds[i] for i in range(len(ds))])
    assert len(ds) == 8
    assert all(isinstance(p, PromptLength) for p in batch[4])
    assert [p.label for p in batch[4]] == pytest.approx([expected] * 8, abs=1e-12)
    assert int(batch[4][0]) == len(tok(data[0]["prompt"], add_special_tokens=False)["input_ids"])


def test_missing_score_column_is_a_clear_error(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from openrlhf_dual.trainer import PseudoPreferenceDataset

    prep = write_prep_dir(tmp_path / "prep", lam=1.0, n=2)
    data = Dataset.from_list([{"prompt": "w1", "chosen": "good", "rejected": "bad"}])
    strategy = SimpleNamespace(args=SimpleNamespace(model=SimpleNamespace(beta=0.1)))
    with pytest.raises(ValueError, match="lacks columns.*chosen_reward"):
        PseudoPreferenceDataset(data, AutoTokenizer.from_pretrained(tiny_model_dir), 64, strategy,
                                dual=DualConfig("mocan", str(prep)))


def test_pair_labels_temperature():
    p = pair_labels(np.array([1.0]), np.array([[0.0]]), np.array([0.0]), np.array([[1.0]]), np.array([0.5]), 0.1, 0.2)
    assert p[0] == pytest.approx(1 / (1 + np.exp(-2 * 0.5)))
    hard = pair_labels(np.zeros(1000), np.zeros((1000, 1)), np.zeros(1000), np.zeros((1000, 1)), [1.0], 0.1, 0.1,
                       hard=True, seed=3)
    assert set(np.unique(hard)) == {0.0, 1.0} and abs(hard.mean() - 0.5) < 0.06


TRAIN_FLAGS = [
    "--data.max_len", "64", "--ds.attn_implementation", "eager", "--ds.zero_stage", "2",
    "--train.micro_batch_size", "4", "--train.batch_size", "8", "--train.max_epochs", "2",
    "--adam.lr", "1e-3", "--logger.logging_steps", "1",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, lam, extra, prefers_chosen",
    [
        # patched OpenRLHF: the user's unchanged train_dpo command plus --dual.* (entry-point plugin)
        ("openrlhf.cli.train_dpo", 2.0, [], False),
        # stock OpenRLHF: our launcher module; --dual.lambda overrides the solved lambda
        ("openrlhf_dual.cli.train_dpo", 2.0, ["--dual.lambda", "0.0"], True),
    ],
)
def test_mocan_launch_ways(module, lam, extra, prefers_chosen, tiny_model_dir, tmp_path):
    prep = write_prep_dir(tmp_path / "prep", lam=lam)
    tb = tmp_path / "tb"
    torchrun(
        module,
        ["--model.model_name_or_path", str(tiny_model_dir), "--ckpt.output_dir", str(tmp_path / "ckpt"),
         "--logger.tensorboard_dir", str(tb), *TRAIN_FLAGS, "--dual.algo", "mocan", "--dual.prep_dir", str(prep), *extra],
        cwd=tmp_path,
    )
    used = 0.0 if extra else lam
    assert tensorboard_scalars(tb, "train/lambda_0") == pytest.approx([used] * 16)
    label = 1 / (1 + np.exp(-((1 - used) - used)))  # sigmoid(r_lam(chosen) - r_lam(rejected))
    assert tensorboard_scalars(tb, "train/label_mean") == pytest.approx([label] * 16, abs=1e-6)
    margin = np.array(tensorboard_scalars(tb, "train/chosen_reward")) - np.array(
        tensorboard_scalars(tb, "train/reject_reward"))
    # The policy moves towards the labels' preference, not towards the "chosen" column.
    assert (margin[-1] > 0.05) == prefers_chosen and (margin[-1] < -0.05) != prefers_chosen, margin
    agreement = tensorboard_scalars(tb, "train/label_agreement")
    assert agreement[-1] > 0.5
    assert (tmp_path / "ckpt" / "model.safetensors").exists()


@pytest.mark.slow
def test_mocan_with_zero3_lora_gradient_checkpointing_and_resume(tiny_model_dir, tmp_path):
    """OpenRLHF's own features keep working under MoCAN: ZeRO-3, LoRA, gradient checkpointing,
    DeepSpeed checkpoints, and resuming from them."""
    prep = write_prep_dir(tmp_path / "prep", lam=2.0)
    flags = [
        "--model.model_name_or_path", str(tiny_model_dir), "--data.max_len", "64", "--ds.attn_implementation", "eager",
        "--ds.zero_stage", "3", "--ds.lora.rank", "4", "--ds.lora.alpha", "8", "--model.gradient_checkpointing_enable",
        "--train.micro_batch_size", "4", "--train.batch_size", "8", "--train.max_epochs", "1", "--adam.lr", "1e-2",
        "--logger.logging_steps", "1", "--ckpt.output_dir", str(tmp_path / "out"), "--ckpt.save_steps", "4",
        "--ckpt.path", str(tmp_path / "ckpts"), "--dual.algo", "mocan", "--dual.prep_dir", str(prep),
    ]  # fmt: skip
    torchrun("openrlhf_dual.cli.train_dpo", [*flags, "--logger.tensorboard_dir", str(tmp_path / "tb")], cwd=tmp_path)
    margin = np.array(tensorboard_scalars(tmp_path / "tb", "train/chosen_reward")) - np.array(
        tensorboard_scalars(tmp_path / "tb", "train/reject_reward"))
    assert margin[-1] < -0.05, margin  # labels (lambda = 2) prefer the safe "rejected" responses
    assert (tmp_path / "out" / "adapter_config.json").exists()
    assert {p.name for p in (tmp_path / "ckpts").iterdir()} >= {"global_step4", "global_step8"}
    out = torchrun("openrlhf_dual.cli.train_dpo", [*flags, "--ckpt.load_enable"], cwd=tmp_path)
    assert "Loaded the checkpoint" in out and "consumed_samples: 64" in out
