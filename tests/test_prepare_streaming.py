"""prepare after sampling reads the sample shards a prompt at a time: its peak memory does not grow
with the number of prompts (apart from the scores array), the pairs are those built from all
samples at once, and a torn prep directory is refused instead of silently paired short. The
finished shards are synthetic, as benchmarks/prepare_scale.py writes them."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from openrlhf_dual.artifacts import read_jsonl, write_npy
from openrlhf_dual.launch import cpu_env
from openrlhf_dual.pairs import pairs_from_samples
from openrlhf_dual.prep import PrepConfig, PrepError, run_prepare

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "prepare_scale.py"


def bench():
    spec = importlib.util.spec_from_file_location("prepare_scale", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def finished(tmp_path, tiny_model_dir) -> PrepConfig:
    """130 prompts (3 shards, the last partial) x 8 responses of 16 tokens, sampled and scored."""
    cfg = bench().write_prep(tmp_path, 130, 8, 16, tiny_model_dir)
    return PrepConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


def test_peak_memory_is_flat_in_the_number_of_prompts(tmp_path):
    """100 and 1000 prompts x 64 responses x 256 token ids, each in a fresh process: reading all
    samples at once grows by ~0.75 MB a prompt (~670 MB here); streaming by the scores only (1 MB)."""
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--sizes", "100", "1000", "--samples", "64", "--tokens", "256", "--dir", str(tmp_path)],
        env=cpu_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = {int(n): float(mb) for n, mb in re.findall(r"N=(\d+): .*peak RSS (\d+) MB", proc.stdout)}
    print(proc.stdout)
    assert peak[1000] - peak[100] < 60, peak
    assert not list(tmp_path.iterdir())  # the benchmark deletes what it writes


def test_streamed_pairs_and_records_equal_those_from_all_samples_at_once(finished):
    prep = Path(finished.prep_dir)
    sol = run_prepare(finished)
    prompts = read_jsonl(prep / "prompts.jsonl")
    samples = [r["responses"] for s in range(3) for r in read_jsonl(prep / "samples" / f"shard-{s:05d}.jsonl")]
    scores = np.concatenate([np.load(prep / "scores" / f"shard-{s:05d}.npy") for s in range(3)])
    want, dropped = pairs_from_samples(prompts, [[x["text"] for x in p] for p in samples], scores, np.asarray(sol["lam"]))
    assert read_jsonl(prep / "pairs.jsonl") == want
    manifest = json.loads((prep / "manifest.json").read_text())
    assert manifest["records"] == {
        "empty_responses": sum(x["text"] == "" for p in samples for x in p),
        "unfinished_responses": sum(not x["finished"] for p in samples for x in p),
        "identical_pairs_dropped": dropped,
    }
    assert manifest["stages"]["pairs"] == len(want) > 0


@pytest.mark.parametrize("tear", ["a sample line lost", "a scores shard of another K"])
def test_torn_prep_directory_is_refused(finished, tear):
    prep = Path(finished.prep_dir)
    if tear == "a sample line lost":
        path = prep / "samples" / "shard-00001.jsonl"
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
        match = "does not match prompts.jsonl"
    else:
        write_npy(prep / "scores" / "shard-00001.npy", np.zeros((64, 9, 2)))
        match = r"holds scores of shape \(64, 9, 2\), expected \(64, 8, 2\)"
    with pytest.raises(PrepError, match=match):
        run_prepare(finished)
    assert not (prep / "pairs.jsonl").exists()


def test_every_reader_of_a_prep_directory_refuses_a_missing_shard(finished, tmp_path, capsys):
    """load_scores, which prepare, evaluate and calibrate all read scores with: the scores in prompt
    order, and a missing shard named (it used to be skipped by a glob, shifting the prompts)."""
    from openrlhf_dual.cli.calibrate import main as calibrate_main
    from openrlhf_dual.prep import load_scores

    prep = Path(finished.prep_dir)
    run_prepare(finished)
    scores = load_scores(prep)
    assert scores.shape == (130, 8, 2)
    assert np.array_equal(scores[64:128], np.load(prep / "scores" / "shard-00001.npy"))
    (prep / "scores" / "shard-00001.npy").unlink()
    with pytest.raises(PrepError, match="shard-00001.npy not found: prepare has not finished"):
        load_scores(prep)
    assert calibrate_main(["--dual.prep_dir", str(prep), "--eval.report", str(tmp_path / "none.json"),
                           "--calibrate.out", str(tmp_path / "cal")]) == 2  # fmt: skip
    assert "shard-00001.npy not found" in capsys.readouterr().err
