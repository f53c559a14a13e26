"""The dual-preprocessing step end to end on a local Ray: resume, refusal to mix inputs, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import WORDS
from openrlhf_dual.artifacts import read_jsonl
from openrlhf_dual.launch import cpu_env

REWARD = '''
def reward_func(queries, prompts, labels, **kwargs):
    return {"rewards": [float(q[len(p):].count("good") - q[len(p):].count("bad")) for q, p in zip(queries, prompts)]}
'''
SAFETY = '''
def reward_func(queries, prompts, labels, **kwargs):
    return {"rewards": [float(len(q[len(p):].split())) - 2.0 for q, p in zip(queries, prompts)]}
'''
BROKEN = '''
def reward_func(queries, prompts, labels, **kwargs):
    return {"rewards": [float("nan") if "w7" in p else 0.0 for q, p in zip(queries, prompts)]}
'''


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep_inputs")
    (root / "reward.py").write_text(REWARD)
    (root / "safety.py").write_text(SAFETY)
    (root / "broken.py").write_text(BROKEN)
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"question": f"{WORDS[i]} {WORDS[i + 1]}"}) + "\n")
    return root


def prepare_cmd(model: Path, inputs: Path, prep: Path, *extra: str, threshold: str = "0.0") -> list[str]:
    return [
        sys.executable, "-m", "openrlhf_dual.cli.prepare",
        "--ref.model_name_or_path", str(model), "--data.prompt_dataset", str(inputs / "prompts.jsonl"),
        "--data.input_key", "question", "--data.apply_chat_template", "--data.max_samples", "12",
        "--rollout.n_samples_per_prompt", "8", "--rollout.max_new_tokens", "4", "--train.seed", "7",
        "--dual.reward", f"file:{inputs / 'reward.py'}", "--dual.safety", f"file:{inputs / 'safety.py'},sign=+1",
        "--dual.threshold", threshold, "--dual.beta", "0.5", "--dual.shard_size", "2", "--dual.prep_dir", str(prep),
        *extra,
    ]  # fmt: skip


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=timeout)


def artifact_bytes(prep: Path) -> dict[str, bytes]:
    files = sorted(prep.glob("scores/*.npy")) + sorted(prep.glob("samples/*.jsonl"))
    files += [prep / "dual.json", prep / "pairs.jsonl", prep / "prompts.jsonl"]
    return {str(f.relative_to(prep)): f.read_bytes() for f in files}


@pytest.mark.slow
def test_kill_and_resume_is_byte_identical(tiny_model_dir, inputs, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    proc = run(prepare_cmd(tiny_model_dir, inputs, whole))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sol = json.loads((whole / "dual.json").read_text())
    assert sol["feasible"] and len(sol["lam"]) == 1
    assert len(list(whole.glob("scores/*.npy"))) == 6
    scores = np.concatenate([np.load(f) for f in sorted(whole.glob("scores/*.npy"))])
    assert scores.shape == (12, 8, 2)

    killed = subprocess.Popen(prepare_cmd(tiny_model_dir, inputs, resumed), env=cpu_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600  # prepare samples every shard, then scores them: kill it while sampling
    while len(list(resumed.glob("samples/*.jsonl"))) < 2 and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    done = len(list(resumed.glob("samples/*.jsonl")))
    assert 2 <= done < 6 or len(list(resumed.glob("scores/*.npy"))) < 6, f"kill landed after {done} of 6 shards"
    assert not (resumed / "dual.json").exists()

    proc = run(prepare_cmd(tiny_model_dir, inputs, resumed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert artifact_bytes(resumed) == artifact_bytes(whole)


@pytest.mark.slow
def test_infeasible_threshold_keeps_scores_and_rerun_only_resolves(tiny_model_dir, inputs, tmp_path):
    prep = tmp_path / "prep"
    proc = run(prepare_cmd(tiny_model_dir, inputs, prep, threshold="100"))
    assert proc.returncode == 2
    assert "cannot be reached" in proc.stderr and "reachable maximum" in proc.stderr
    sol = json.loads((prep / "dual.json").read_text())
    assert sol["feasible"] is False
    assert not (prep / "pairs.jsonl").exists()
    mtimes = {f: f.stat().st_mtime_ns for f in prep.glob("scores/*.npy")}
    assert len(mtimes) == 6

    proc = run(prepare_cmd(tiny_model_dir, inputs, prep, threshold="0.0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {f: f.stat().st_mtime_ns for f in prep.glob("scores/*.npy")} == mtimes  # nothing re-sampled
    pairs = read_jsonl(prep / "pairs.jsonl")
    assert pairs and {"prompt", "chosen", "rejected", "chosen_reward", "chosen_safety"} <= set(pairs[0])
    lam = json.loads((prep / "dual.json").read_text())["lam"][0]
    for row in pairs:
        c = row["chosen_reward"] + lam * row["chosen_safety"][0]
        r = row["rejected_reward"] + lam * row["rejected_safety"][0]
        assert c >= r

    # Different sampling inputs into the same directory are refused, nothing overwritten.
    proc = run(prepare_cmd(tiny_model_dir, inputs, prep, "--rollout.temperature", "0.7"))
    assert proc.returncode == 2 and "temperature" in proc.stderr
    assert {f: f.stat().st_mtime_ns for f in prep.glob("scores/*.npy")} == mtimes


def test_missing_prompt_column_is_a_clear_error(tiny_model_dir, inputs, tmp_path):
    cmd = prepare_cmd(tiny_model_dir, inputs, tmp_path / "prep")
    cmd[cmd.index("question")] = "input"
    proc = run(cmd)
    assert proc.returncode == 2
    assert "no column 'input'" in proc.stderr and "question" in proc.stderr


@pytest.mark.slow
def test_non_finite_scores_name_the_source_and_keep_finished_shards(tiny_model_dir, inputs, tmp_path):
    prep = tmp_path / "prep"
    cmd = prepare_cmd(tiny_model_dir, inputs, prep)
    cmd[cmd.index(f"file:{inputs / 'safety.py'},sign=+1")] = f"file:{inputs / 'broken.py'},sign=+1"
    proc = run(cmd)
    assert proc.returncode == 2
    assert "broken.py" in proc.stderr and "non-finite" in proc.stderr
    # w7 first appears in prompt 6 (shard 3): shards 0-2 are finished and kept
    assert sorted(f.name for f in prep.glob("scores/*.npy")) == [f"shard-0000{i}.npy" for i in range(3)]


@pytest.mark.slow
def test_pairs_from_a_preference_dataset(tiny_model_dir, inputs, tmp_path):
    """PKU-SafeRLHF-style rows (prompt, response_0, response_1) become scored training pairs."""
    pku = tmp_path / "pku.jsonl"
    rows = [{"question": f"{WORDS[i]} {WORDS[i + 2]}", "response_0": "good good w1", "response_1": "bad w2"}
            for i in range(20)]  # fmt: skip
    pku.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prep = tmp_path / "prep"
    proc = run(prepare_cmd(tiny_model_dir, inputs, prep, "--dual.pairs_dataset", str(pku)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    pairs = read_jsonl(prep / "pairs.jsonl")
    assert len(pairs) == 20 and np.load(prep / "pair_scores.npy").shape == (20, 2, 2)
    for row in pairs:  # reward: #good - #bad; safety: #words - 2 (tests' reward files)
        assert (row["chosen"], row["chosen_reward"], row["chosen_safety"]) == ("good good w1", 2.0, [1.0])
        assert (row["rejected"], row["rejected_reward"], row["rejected_safety"]) == ("bad w2", -1.0, [0.0])
    assert pairs[0]["prompt"].startswith("user : w0 w2")


def test_bad_source_spec_fails_before_any_work(tiny_model_dir, inputs, tmp_path):
    cmd = prepare_cmd(tiny_model_dir, inputs, tmp_path / "prep")
    cmd[cmd.index(f"file:{inputs / 'safety.py'},sign=+1")] = f"file:{inputs / 'safety.py'}"
    proc = run(cmd)
    assert proc.returncode == 2 and "declare sign=+1" in proc.stderr
    assert not (tmp_path / "prep").exists()
