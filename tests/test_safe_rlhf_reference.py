"""Our `safe_rlhf:` scorer against Safe-RLHF's OWN code.

tests/fixtures/safe_rlhf_reference.json holds the token ids and end scores that Safe-RLHF's score
models (commit 507b060 for the v1.0-era LlamaModelForScore, e8cca16 for LlamaForScore), run under
transformers 4.44.2, gave on checkpoints that tests/safe_rlhf_reference.py builds byte for byte
the same here (how to regenerate: that file's docstring). This test rebuilds the checkpoints,
checks their bytes against the recorded hashes, and scores the same texts with our scorer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from openrlhf_dual.scoring import ScoreBatch, build_scorer, parse_source
from safe_rlhf_reference import CASES, KINDS, build, file_hashes

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "safe_rlhf_reference.json").read_text())
BATCH = ScoreBatch([p for p, _ in CASES], [""] * len(CASES), [r for _, r in CASES])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return build(tmp_path_factory.mktemp("safe_rlhf"))


def test_the_fixture_covers_every_kind_and_our_checkpoints_are_the_recorded_bytes(checkpoints):
    assert sorted(FIXTURE["kinds"]) == sorted(KINDS)
    assert [list(c) for c in CASES] == FIXTURE["cases"]
    for name, path in checkpoints.items():
        assert file_hashes(path) == FIXTURE["kinds"][name]["files"], f"{name}: rebuilt checkpoint differs from the recorded one"


@pytest.mark.parametrize("name", sorted(KINDS))
def test_scores_and_token_ids_agree_with_safe_rlhf(checkpoints, name):
    """Default options (the checkpoint's dtype, Safe-RLHF's truncation at 512 without EOS)."""
    scorer = build_scorer(parse_source(f"safe_rlhf:{checkpoints[name]}"))
    ids = [scorer.inner.input_ids(p, r) for p, r in CASES]
    assert ids == FIXTURE["ids"]
    theirs = np.array(FIXTURE["kinds"][name]["scores"]["auto"])
    ours = scorer.score(BATCH)
    # bf16 checkpoints compute in bf16 on both sides, through different kernels: agreement to bf16's resolution
    tol = 0.05 if name == "v1_bf16" else 1e-4
    assert np.abs(ours - theirs).max() <= tol, (ours - theirs).tolist()


def test_bf16_checkpoint_read_in_fp32_agrees_with_safe_rlhf(checkpoints):
    scorer = build_scorer(parse_source(f"safe_rlhf:{checkpoints['v1_bf16']},dtype=float32"))
    theirs = np.array(FIXTURE["kinds"]["v1_bf16"]["scores"]["float32"])
    assert np.abs(scorer.score(BATCH) - theirs).max() <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(KINDS))
def test_scores_on_cuda_agree_with_safe_rlhf(checkpoints, name):
    """The GPU path (weights loaded straight to the device, sdpa attention): fp32 kinds, and the
    bf16 checkpoint read in fp32, agree with Safe-RLHF's CPU numbers to 1e-4."""
    option = ",dtype=float32" if name == "v1_bf16" else ""
    scorer = build_scorer(parse_source(f"safe_rlhf:{checkpoints[name]}{option}"), device="cuda")
    assert {p.device.type for p in scorer.inner.backbone.parameters()} == {"cuda"}
    theirs = np.array(FIXTURE["kinds"][name]["scores"]["float32" if option else "auto"])
    assert np.abs(scorer.score(BATCH) - theirs).max() <= 1e-4
