"""The real `openrlhf.cli.train_dpo` trains on CPU through the patch: torchrun, 2 ranks, ZeRO-2."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import tensorboard_scalars, torchrun


@pytest.mark.slow
def test_stock_train_dpo_zero2_two_ranks(tiny_model_dir, dpo_dataset_dir, tmp_path):
    out_dir, tb_dir = tmp_path / "ckpt", tmp_path / "tb"
    torchrun(
        "openrlhf.cli.train_dpo",
        [
            "--model.model_name_or_path", str(tiny_model_dir),
            "--data.dataset", str(dpo_dataset_dir),
            "--data.prompt_key", "prompt",
            "--data.max_len", "64",
            "--ds.attn_implementation", "eager",
            "--ds.zero_stage", "2",
            "--train.micro_batch_size", "4",
            "--train.batch_size", "8",
            "--train.max_epochs", "2",
            "--adam.lr", "1e-3",
            "--ckpt.output_dir", str(out_dir),
            "--logger.logging_steps", "1",
            "--logger.tensorboard_dir", str(tb_dir),
        ],
        cwd=tmp_path,
    )
    losses = tensorboard_scalars(tb_dir, "train/loss")
    assert len(losses) == 16, losses  # 64 pairs / batch 8 = 8 steps per epoch, 2 epochs
    assert abs(losses[0] - 0.6931) < 0.01, "DPO starts at log(2) when policy == reference"
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, f"loss did not fall: {losses}"

    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out_dir / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.allclose(before[k].float(), after[k].float(), atol=1e-4)]
    assert len(changed) >= len(before) // 2, f"only {changed} changed"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir)
    ids = torch.tensor([[1, 5, 6, 7]])
    assert torch.isfinite(model(ids).logits).all()
