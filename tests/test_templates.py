"""Prompt templates applied once: the PPO reward recovers the user's raw text of prompts prepare
never saw (stripping prepare's input template or chat template) for scorers with their own
conversation template, the DPO trainer refuses to template prepare's pairs a second time, and no
recipe asks it to."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import WORDS, torchrun
from openrlhf_dual.launch import cpu_env
from openrlhf_dual.ppo_reward import PromptTemplate
from recipe_commands import RECIPES, flag_values, recorded_commands
from test_scoring import direct_safe_rlhf, safe_rlhf_checkpoint

TEMPLATE = "user : {} assistant : "


def test_prompt_template_strips_exactly_what_was_added(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = lambda r: tok.apply_chat_template([{"role": "user", "content": r}], tokenize=False, add_generation_prompt=True)  # noqa: E731
    for template, render in [(PromptTemplate(TEMPLATE), TEMPLATE.format), (PromptTemplate(None, tok), chat)]:
        for raw in ("w1  w2 ", "", "assistant : w3"):
            assert template.raw(render(raw)) == raw
        with pytest.raises(ValueError, match="does not carry the template prepare formatted its prompts with"):
            template.raw("w1 w2")
    assert PromptTemplate(None).raw("w1 w2") == "w1 w2"  # prepare used no template


@pytest.fixture(scope="module", params=["input_template", "chat_template"])
def prep(request, tiny_model_dir, tmp_path_factory) -> tuple[Path, Path, dict]:
    """prepare (the real CLI) with a Safe-RLHF cost model as the safety source, prompts formatted by
    an input template or by the reference's chat template."""
    root = tmp_path_factory.mktemp(f"prep_{request.param}")
    cost, parts = safe_rlhf_checkpoint(tiny_model_dir, root / "cost", bias=True, v2=False)
    (root / "len.py").write_text("def reward_func(queries, prompts, labels):\n"
                                 "    return {'rewards': [float(len(q) - len(p)) for q, p in zip(queries, prompts)]}\n")  # fmt: skip
    (root / "prompts.jsonl").write_text("".join(json.dumps({"input": f"w{i} w{i + 3}"}) + "\n" for i in range(3)))
    fmt = ["--data.input_template", TEMPLATE] if request.param == "input_template" else ["--data.apply_chat_template"]
    proc = subprocess.run(
        [sys.executable, "-m", "openrlhf_dual.cli.prepare", "--ref.model_name_or_path", str(tiny_model_dir),
         "--data.prompt_dataset", str(root / "prompts.jsonl"), *fmt, "--rollout.n_samples_per_prompt", "2",
         "--rollout.max_new_tokens", "4", "--dual.prep_dir", str(root / "prep"), "--dual.reward", f"file:{root / 'len.py'}",
         "--dual.safety", f"safe_rlhf:{cost},sign=-1", "--dual.threshold", "-1000", "--dual.beta", "1.0"],
        env=cpu_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "prep", cost, parts


@pytest.mark.slow
def test_ppo_reward_gives_safe_rlhf_the_raw_text_of_unseen_prompts(prep, tiny_model_dir):
    from transformers import AutoTokenizer

    from openrlhf_dual.ppo_reward import CombinedReward
    from openrlhf_dual.scoring import ScoreBatch

    prep_dir, cost, parts = prep
    inputs = json.loads((prep_dir / "manifest.json").read_text())["inputs"]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    raw = [f"{WORDS[i]} {WORDS[i + 7]}" for i in range(10, 14)]  # prompts prepare never saw
    if inputs["input_template"]:
        prompts = [TEMPLATE.format(r) for r in raw]
    else:
        prompts = [tok.apply_chat_template([{"role": "user", "content": r}], tokenize=False, add_generation_prompt=True)
                   for r in raw]  # fmt: skip
    responses = ["good fine", "bad harm rude", "w1", "kind"]
    got = CombinedReward(prep_dir).score([p + r for p, r in zip(prompts, responses)], prompts)
    want = -direct_safe_rlhf(parts, AutoTokenizer.from_pretrained(cost), ScoreBatch(raw, prompts, responses))
    assert np.allclose(got[:, 2], want, atol=1e-5)
    # what the cost model saw before: its conversation template around the already templated prompt
    doubled = -direct_safe_rlhf(parts, AutoTokenizer.from_pretrained(cost), ScoreBatch(prompts, prompts, responses))
    assert not np.allclose(got[:, 2], doubled, atol=1e-3)
    with pytest.raises(ValueError, match="does not carry the template prepare formatted its prompts with"):
        CombinedReward(prep_dir).score(["w1 w2 good"], ["w1 w2 "])


@pytest.mark.slow
@pytest.mark.parametrize("prep", ["input_template"], indirect=True)
def test_train_dpo_refuses_to_template_the_pairs_again(prep, tiny_model_dir, tmp_path):
    prep_dir = prep[0]
    proc_args = [
        "--model.model_name_or_path", str(tiny_model_dir), "--data.dataset", str(prep_dir / "pairs.jsonl"),
        "--data.prompt_key", "prompt", "--data.input_template", TEMPLATE, "--data.max_len", "64",
        "--ds.zero_stage", "0", "--ds.attn_implementation", "eager", "--train.micro_batch_size", "2",
        "--train.batch_size", "2", "--train.max_epochs", "1", "--ckpt.output_dir", str(tmp_path / "out"),
        "--dual.algo", "mocan", "--dual.prep_dir", str(prep_dir),
    ]  # fmt: skip
    from openrlhf_dual import launch

    proc = launch.torchrun("openrlhf_dual.cli.train_dpo", proc_args, nproc=1, cwd=tmp_path, timeout=600)
    assert proc.returncode != 0
    assert "drop --data.input_template / --data.apply_chat_template" in proc.stdout + proc.stderr
    # without the second template the same run trains
    i = proc_args.index("--data.input_template")
    torchrun("openrlhf_dual.cli.train_dpo", proc_args[:i] + proc_args[i + 2 :], nproc=1, cwd=tmp_path)


def test_no_recipe_templates_prepared_pairs_again(tmp_path):
    """Every training run on a prep directory (train_dpo or train_sft with --dual.prep_dir) leaves the
    prompts alone: prepare wrote them with the template already applied."""
    runs = 0
    for recipe in sorted(RECIPES.glob("*.sh")):
        for argv in recorded_commands(recipe, tmp_path / recipe.stem):
            if any(a.endswith(("train_dpo", "train_sft")) for a in argv) and flag_values(argv, "--dual.prep_dir"):
                runs += 1
                assert "--data.input_template" not in argv and "--data.apply_chat_template" not in argv, (recipe.name, argv)
    assert runs >= 5
