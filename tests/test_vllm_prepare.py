"""prepare, train and evaluate through OpenRLHF's vLLM engines on a Ray cluster of 2 GPUs (logical
ones on a CPU machine), on the toy world (vLLM tier: `make test-vllm`).

The world's reference is the demo's, with hidden size 64 (vLLM's CPU attention needs head_dim >=
32). Its exact lambda* is the whole distribution's (demo.exact.ToyJudge: every response up to the
generation cap prepare samples with, as vLLM may sample any of them).
"""

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

from openrlhf_dual.artifacts import read_jsonl
from openrlhf_dual.demo import world as W
from openrlhf_dual.demo.exact import ToyJudge
from openrlhf_dual.demo.steps import DPO_BATCH, build_reference, dpo
from openrlhf_dual.launch import cpu_env, torchrun_launcher
from vllm_tier import cluster, gpus_free_again  # noqa: F401  (cluster: a fixture)

# a vLLM engine starts in 30 s to minutes on 2 shared cores; module fixtures start several
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD, BETA, N_PROMPTS = 0.5, 0.5, 32
# small KV cache (vLLM's CPU build: a fraction of RAM), no compilation (minutes on a CPU)
ENGINE_FLAGS = ["--vllm.gpu_memory_utilization", "0.1", "--vllm.enforce_eager"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import torch

    torch.set_num_threads(1)  # a shared 2-core machine: OpenMP threads spin-waiting on busy cores cost 10x
    out = tmp_path_factory.mktemp("world")
    ref_dir, prompts = build_reference(out, N_PROMPTS, seed=0, hidden_size=64)
    lam = ToyJudge(ref_dir, prompts, THRESHOLD, BETA).lam[0]
    return {"out": out, "ref": ref_dir, "prompts": prompts, "lam": lam}


def prepare_cmd(world: dict, prep: Path, *flags: str) -> list[str]:
    out = world["out"]
    return [
        sys.executable, "-m", "openrlhf_dual.cli.prepare", "--ref.model_name_or_path", str(world["ref"]),
        "--data.prompt_dataset", str(out / "data" / "prompts.jsonl"), "--data.apply_chat_template",
        "--data.max_samples", str(N_PROMPTS), "--rollout.max_new_tokens", str(W.RESPONSE_LEN + 1), "--train.seed", "0",
        "--dual.backend", "vllm", *ENGINE_FLAGS, "--dual.reward", f"file:{out / 'reward.py'}",
        "--dual.safety", f"file:{out / 'safety.py'},sign=+1", "--dual.threshold", str(THRESHOLD),
        "--dual.beta", str(BETA), "--dual.prep_dir", str(prep), *flags,
    ]  # fmt: skip


def run(cmd: list[str], timeout: float = 1800) -> tuple[subprocess.CompletedProcess, float]:
    """Run a CLI on the test's Ray cluster (RAY_ADDRESS); returns it and its wall seconds."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - t


def samples_of(prep: Path) -> list[list[dict]]:
    return [r["responses"] for f in sorted((prep / "samples").glob("shard-*.jsonl")) for r in read_jsonl(f)]


@pytest.fixture(scope="module")
def recipe_prep(cluster, world):
    """The recipes' shape on 2 GPUs: 2 vLLM engines x 1 GPU, then 2 scorers x 1 GPU (K = 128)."""
    prep = world["out"] / "prep"
    proc, seconds = run(prepare_cmd(world, prep, "--rollout.n_samples_per_prompt", "128", "--vllm.num_engines", "2",
                                    "--dual.num_gpus_per_actor", "1", "--dual.shard_size", "16"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    return prep, seconds


def test_recipe_shaped_prepare_completes_with_k_samples_per_prompt(recipe_prep):
    prep, _ = recipe_prep
    samples = samples_of(prep)
    assert len(samples) == N_PROMPTS and all(len(per) == 128 for per in samples)
    assert np.load(prep / "scores" / "shard-00000.npy").shape == (16, 128, 2)
    assert gpus_free_again()
    placed = json.loads((prep / "manifest.json").read_text())["placement"]
    assert placed["vllm"] == {"vllm_num_engines": 2, "vllm_tensor_parallel_size": 1, "vllm_gpu_memory_utilization": 0.1,
                              "vllm_enforce_eager": True, "vllm_enable_prefix_caching": False}  # fmt: skip


def test_evaluate_samples_with_prepares_engine_settings(recipe_prep, world, tmp_path):
    """Defect 5: evaluate sampled with one engine at 0.9 memory and compilation on, whatever prepare
    used. Read from the prep directory a real prepare wrote: evaluate's sampler gets prepare's
    --vllm.* settings, and a flag given to evaluate replaces only its own setting."""
    from openrlhf_dual.cli import evaluate
    from openrlhf_dual.sampling import sampler_stage

    prep, _ = recipe_prep
    placed = json.loads((prep / "manifest.json").read_text())["placement"]["vllm"]
    base = ["--dual.prep_dir", str(prep), "--eval.policy", f"ref={world['ref']}", "--eval.out", str(tmp_path),
            "--data.prompt_dataset", str(world["out"] / "data" / "prompts.jsonl")]  # fmt: skip
    inherited, _ = evaluate.prep_config(prep, vars(evaluate.build_parser().parse_args(base)))
    assert inherited.backend == "vllm" and inherited.vllm == placed, inherited.vllm
    assert evaluate.stages_of(inherited)[0] == sampler_stage("vllm", 0, 0.0, placed)  # 2 engines, as prepare
    one, _ = evaluate.prep_config(prep, vars(evaluate.build_parser().parse_args([*base, "--vllm.num_engines", "1"])))
    assert one.vllm == {**placed, "vllm_num_engines": 1}, one.vllm


def test_lambda_within_10_percent_of_the_exact_one(recipe_prep, world):
    lam = json.loads((recipe_prep[0] / "dual.json").read_text())["lam"][0]
    assert abs(lam - world["lam"]) <= 0.1 * world["lam"], (lam, world["lam"])


def test_gpus_that_cannot_be_had_fail_within_a_minute(cluster, world, tmp_path):
    """More engines than the cluster has GPUs: refused at once. GPUs held by another job: refused
    after the placement timeout. Either way the message says what each stage asks for."""
    import ray

    # a run that waits forever is stopped at 120 s, and fails the test
    proc, seconds = run(prepare_cmd(world, tmp_path / "a", "--vllm.num_engines", "3", "--dual.num_gpus_per_actor", "1"), 120)
    assert proc.returncode == 2 and seconds < 60, (seconds, proc.stderr[-3000:])
    assert "sample asks for 3 GPUs (vLLM: 3 engines x tensor parallel 1); score asks for 2 GPUs" in proc.stderr
    assert "the Ray cluster has 2 GPUs" in proc.stderr

    holder = ray.remote(num_gpus=1)(type("Holder", (), {"ping": lambda self: 1})).remote()
    ray.get(holder.ping.remote())
    try:
        proc, seconds = run(prepare_cmd(world, tmp_path / "b", "--vllm.num_engines", "2"), 120)
    finally:
        ray.kill(holder)
    assert proc.returncode == 2 and seconds < 60, (seconds, proc.stderr[-3000:])
    assert "sample could not get its GPUs within 30 s" in proc.stderr and "1 free now" in proc.stderr
    assert gpus_free_again()


@pytest.fixture(scope="module")
def resumed_prep(cluster, world):
    """A prepare killed (SIGKILL) once its first shard of samples is written, then rerun (K = 16)."""
    prep = world["out"] / "prep-resumed"
    cmd = prepare_cmd(world, prep, "--rollout.n_samples_per_prompt", "16", "--dual.shard_size", "4")
    first = prep / "samples" / "shard-00000.jsonl"
    proc = subprocess.Popen(cmd, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    end = time.time() + 600
    while not first.exists() and proc.poll() is None and time.time() < end:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (prep / "dual.json").exists(), "the kill came too late to test resuming"
    kept = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in (prep / "samples").glob("shard-*.jsonl")}
    proc, _ = run(cmd)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return prep, kept


def test_a_killed_prepare_resumes_from_its_finished_shards(resumed_prep, world):
    prep, kept = resumed_prep
    for name, (data, mtime) in kept.items():
        f = prep / "samples" / name
        assert f.read_bytes() == data and f.stat().st_mtime_ns == mtime, f"{name} was sampled again"
    samples = samples_of(prep)
    assert len(samples) == N_PROMPTS and all(len(per) == 16 for per in samples)
    assert len(list((prep / "scores").glob("shard-*.npy"))) == N_PROMPTS // 4
    assert (prep / "dual.json").exists() and gpus_free_again()


def test_demo_pipeline_through_vllm_and_four_policies_evaluated_in_a_row(recipe_prep, world, tmp_path):
    """prepare (vLLM) -> MoCAN (OpenRLHF's DPO trainer, torchrun) -> evaluate with the vllm backend,
    inheriting prepare's engine settings (one engine by flag): the reference and four policies
    sampled one after the other, then scored. Afterwards no GPU and no placement group is held."""
    prep, _ = recipe_prep
    out = world["out"]
    ckpt = dpo(out, "mocan", "openrlhf_dual.cli.train_dpo", world["ref"], BETA, 3,
               ["--dual.algo", "mocan", "--dual.prep_dir", str(prep)])  # fmt: skip
    policies = [f"mocan={ckpt}", f"mocan-again={ckpt}", f"reference-a={world['ref']}:0", f"reference-b={world['ref']}:0"]
    proc, _ = run([sys.executable, "-m", "openrlhf_dual.cli.evaluate", "--dual.prep_dir", str(prep),
                   "--eval.out", str(tmp_path / "eval"), "--eval.policy", *policies,
                   "--data.prompt_dataset", str(out / "data" / "prompts.jsonl"), "--rollout.n_samples_per_prompt", "16",
                   "--vllm.num_engines", "1", "--dual.num_gpus_per_actor", "0.5"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert gpus_free_again()
    report = json.loads((tmp_path / "eval" / "report.json").read_text())["policies"]
    # every policy evaluated (report.json is written with sorted keys, so its order says nothing)
    assert sorted(report) == ["mocan", "mocan-again", "reference", "reference-a", "reference-b"]
    # the world's truth: the reference violates b; the trained policy lands on it (E_opt[g] = b exactly)
    ref, mocan = report["reference"], report["mocan"]
    assert ref["safety"][0]["hi"] < THRESHOLD, ref["safety"]
    assert abs(mocan["safety"][0]["mean"] - THRESHOLD) < 0.15, mocan["safety"]
    assert mocan["reward"]["mean"] < ref["reward"]["mean"]  # safety is bought with helpfulness
    assert report["mocan-again"]["safety"] == mocan["safety"]  # same seeds, same samples
    assert abs(report["reference-a"]["safety"][0]["mean"] - ref["safety"][0]["mean"]) < 0.15


def test_lambda_sweep_with_lora_evaluates_merged_checkpoints(resumed_prep, world, tmp_path):
    """recipes/lambda_sweep.sh with LoRA: OpenRLHF saves adapters only, which vLLM cannot load; the
    recipe merges them (OpenRLHF's lora_combiner) and evaluates the merged model with vLLM."""
    prep, _ = resumed_prep
    out = world["out"]
    env = cpu_env(
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", REF=str(world["ref"]), PREP=str(prep),
        HELDOUT=str(out / "data" / "prompts.jsonl"), HELDOUT_SPLIT="train", N_HELDOUT="8", K_EVAL="4",
        OUT=str(tmp_path / "sweep"), BETA=str(BETA), LAMBDAS="star",
        LAUNCH=" ".join([*torchrun_launcher(2), "-m"]),
        TRAIN_FLAGS=f"--ds.zero_stage 2 --ds.attn_implementation eager --ds.param_dtype bf16 --ds.lora.rank 4 "
        f"--ds.lora.alpha 8 --train.micro_batch_size 16 --train.batch_size {DPO_BATCH} --train.max_epochs 1 "
        "--adam.lr 3e-3 --data.max_len 64",
        EVAL_FLAGS="--dual.backend vllm",
    )  # fmt: skip
    proc = subprocess.run(["bash", str(ROOT / "recipes" / "lambda_sweep.sh")], env=env, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert (tmp_path / "sweep" / "lambda-star" / "adapter_config.json").exists()  # LoRA: adapter only
    report = json.loads((tmp_path / "sweep" / "eval" / "report.json").read_text())["policies"]
    assert report["lambda-star"]["path"] == str(tmp_path / "sweep" / "lambda-star-merged")
    assert gpus_free_again()
