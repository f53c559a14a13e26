"""One-shot constrained PPO on the toy world: OpenRLHF's own `train_ppo_ray` on r + lambda*.g (vLLM
rollouts; on a machine without CUDA, vLLM's CPU build and Ray with logical GPUs), the trained policy
checked against the exact constrained optimum over its whole response distribution.

Steps: the tiny reference (head_dim 32: vLLM's CPU attention refuses 16); prepare (lambda* from
reference samples, `ppo_reward.py` in the prep directory); one train_ppo_ray run whose reward is
the prep directory's (`--dual.prep_dir`, or `serve_reward` with --ppo.reward_server); exact
evaluation by enumeration (demo.exact.ToyJudge). PPO's KL coefficient is the dual's beta and its
generation cap the world's (3 words and EOS), so pi_lambda* of the judge is the optimum of the
objective PPO is given. Advantages: RLOO (`rloo`, the mean of the prompt's OTHER samples as
baseline), unbiased for that sequence-level objective with k1 in the reward; `reinforce_baseline`'s
group mean includes the sample itself, which scales the reward's gradient by (n-1)/n and not the
KL's (effective beta x n/(n-1): measured 8.9-15% of the gap short). The learning rate decays to a
tenth (OpenRLHF's default cosine_with_min_lr): the last iterate wanders less around the optimum than
at a constant rate. See docs/ppo_landing.md for every setting measured.

Any further `--section.flag value` arguments go to train_ppo_ray as they are, after ours (so they
override them): e.g. `--algo.advantage.estimator gae` (PPO with a critic), `group_norm` (GRPO),
`--algo.kl.use_loss --algo.kl.estimator k3`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openrlhf_dual.demo import world as W
from openrlhf_dual.artifacts import write_json
from openrlhf_dual.demo.steps import build_reference, prepare
from openrlhf_dual.launch import cpu_env, free_port, ray_cluster, read_scalars

GPUS = 4  # actor, reference, critic (gae only), one vLLM engine: one GPU each
# head_dim 32 (2 heads): vLLM's CPU attention refuses the default 16; hidden 128 (head_dim 64) does
# not fit the world with fit_reference's settings (a quarter of its mass left on the 64 responses)
HIDDEN = 64


def ppo_args(a: argparse.Namespace, out: Path, ref_dir: Path, reward_flags: list[str], name: str = "ppo") -> list[str]:
    """train_ppo_ray's arguments: one GPU per role, KL coefficient = beta (fixed, k1 in the reward),
    RLOO advantages, cosine learning rate, the world's generation cap, every prompt in each
    rollout; `a.extra` last."""
    rollout = a.prompts * a.ppo_samples
    return [
        "--actor.model_name_or_path", str(ref_dir), "--ref.num_nodes", "1", "--ref.num_gpus_per_node", "1",
        "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1",
        "--critic.num_nodes", "1", "--critic.num_gpus_per_node", "1",
        "--vllm.num_engines", "1", "--vllm.tensor_parallel_size", "1", "--vllm.sync_backend", "gloo",
        "--vllm.gpu_memory_utilization", "0.05", "--vllm.enforce_eager",
        "--data.prompt_dataset", str(out / "data" / "prompts.jsonl"), "--data.input_key", "input",
        "--data.apply_chat_template", "--data.max_len", "64", "--rollout.max_new_tokens", str(W.RESPONSE_LEN + 1),
        "--rollout.batch_size", str(a.prompts), "--rollout.n_samples_per_prompt", str(a.ppo_samples),
        "--rollout.micro_batch_size", str(rollout), "--train.batch_size", str(rollout // a.ppo_minibatches),
        "--train.micro_batch_size", str(rollout // a.ppo_minibatches), "--train.max_epochs", "1",
        "--train.num_episodes", str(a.ppo_steps), "--train.seed", str(a.seed),
        "--algo.advantage.estimator", "rloo", "--algo.kl.init_coef", str(a.beta),
        "--algo.kl.estimator", "k1", "--actor.adam.lr", str(a.ppo_lr), "--critic.adam.lr", str(a.ppo_lr),
        "--actor.lr_scheduler", "cosine_with_min_lr", "--critic.lr_scheduler", "cosine_with_min_lr",
        "--actor.lr_warmup_ratio", "0",
        "--ds.zero_stage", "0", "--ds.attn_implementation", "eager",
        "--ckpt.output_dir", str(out / name), "--ckpt.save_steps", "-1",
        "--logger.logging_steps", "1", "--logger.tensorboard_dir", str(out / "tensorboard" / name),
        *reward_flags, *a.extra,
    ]  # fmt: skip


@contextmanager
def reward_server(prep: Path, log: Path, timeout: float = 300.0):
    """`openrlhf_dual.cli.serve_reward` on a free loopback port for the duration; yields its URL."""
    port = free_port()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "openrlhf_dual.cli.serve_reward", "--dual.prep_dir", str(prep),
                                 "--port", str(port), "--device", "cpu"], stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        end = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > end:
                    raise SystemExit(f"serve_reward did not come up (exit {proc.poll()}); see {log}")
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/get_reward"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def train_ppo(a: argparse.Namespace, out: Path, ref_dir: Path, name: str = "ppo") -> dict:
    """One train_ppo_ray run into out/name (Ray with GPUS GPUs of its own); returns its compute:
    wall seconds, PPO steps, generated samples and response tokens (as OpenRLHF logged them)."""
    prep, log, tb = out / "prep", out / f"{name}.log", out / "tensorboard" / name
    server = reward_server(prep, out / f"{name}_serve_reward.log") if a.ppo_reward_server else nullcontext()
    with ray_cluster(num_gpus=GPUS), server as url:
        flags = ["--reward.remote_url", url] if url else ["--dual.prep_dir", str(prep)]
        cmd = [sys.executable, "-m", "openrlhf.cli.train_ppo_ray", *ppo_args(a, out, ref_dir, flags, name)]
        t0 = time.time()
        with open(log, "w") as f:
            proc = subprocess.run(cmd, env=cpu_env(), stdout=f, stderr=subprocess.STDOUT)
        seconds = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"train_ppo_ray failed (exit {proc.returncode}); see {log}")
    lengths = [v for _, _, v in read_scalars(tb, "train/response_length")]
    rollout = a.prompts * a.ppo_samples
    return {"seconds": round(seconds, 1), "steps": len(lengths), "samples": len(lengths) * rollout,
            "response_tokens": round(float(np.sum(lengths)) * rollout), "tensorboard": str(tb),
            "reward_source": "serve_reward" if a.ppo_reward_server else "reward file", "train_ppo_ray_args": a.extra}  # fmt: skip


@dataclass
class World:
    """The toy world set up for PPO: reference, prompts, exact judge, prepare's solution."""

    ref_dir: Path
    prompts: list[str]
    judge: object  # demo.exact.ToyJudge
    solution: dict


def setup(a: argparse.Namespace, out: Path) -> World:
    """Reference (hidden HIDDEN), exact judge, prepare."""
    from openrlhf_dual.demo.exact import ToyJudge

    for key, value in cpu_env().items():  # Ray's workers inherit the environment of its first process
        os.environ.setdefault(key, value)
    print(f"[1/4] reference: tiny Llama (hidden {HIDDEN}) fitted to the toy world ({a.prompts} prompts)")
    ref_dir, prompts = build_reference(out, a.prompts, a.seed, hidden_size=HIDDEN)
    judge = ToyJudge(ref_dir, prompts, a.threshold, a.beta)
    print(f"[2/4] prepare: {a.samples} samples per prompt, scored, dual solved, the PPO reward file written")
    solution = prepare(out, ref_dir, f"file:{out / 'reward.py'}", f"file:{out / 'safety.py'},sign=+1", a.threshold,
                       a.beta, a.prompts, a.samples, a.seed)  # fmt: skip
    return World(ref_dir, prompts, judge, solution)


def evaluate(a: argparse.Namespace, world: World, ckpt: Path, compute: dict) -> dict:
    """The report (the MoCAN demo's keys) of a trained checkpoint: whole-distribution intervals
    [lo, hi] by exact enumeration; the renormalised view beside them."""
    views = world.judge.evaluate_dir(ckpt)
    whole = views["whole"]
    _, safety = W.score_table(world.prompts)
    return {
        "algo": "ppo",
        "estimator": _flag(a.extra, "--algo.advantage.estimator", "rloo"),
        "threshold": a.threshold,
        "beta": a.beta,
        "lambda": world.solution["lam"],
        "reference": whole["reference"],
        "reachable_safety": [float(np.mean(safety.max(axis=1)))],
        "predicted": {k: world.solution["predicted"][k] for k in ("reward", "safety", "kl")},
        "optimum": whole["optimum"],
        "achieved": whole["achieved"],
        "kl_to_optimum": whole["kl_to_optimum"],
        "kl_ref_to_optimum": whole["kl_ref_to_optimum"],
        "whole": whole,
        "renormalised": views["renormalised"],
        "ppo": compute,
    }


def run(a: argparse.Namespace, out: Path) -> dict:
    t0 = time.time()
    world = setup(a, out)
    print(f"[3/4] train_ppo_ray on r + lambda*.g, lambda = {world.solution['lam'][0]:.4f}, {a.ppo_steps} steps")
    compute = train_ppo(a, out, world.ref_dir)
    print("[4/4] exact evaluation of the trained policy over its whole response distribution")
    report = evaluate(a, world, out / "ppo", compute)
    report["seconds"] = round(time.time() - t0, 1)
    write_json(out / "report.json", report)
    print(summary(report) + f"\nwrote {out / 'report.json'} in {report['seconds']} s")
    return report


def summary(r: dict) -> str:
    """The report in words: whole-distribution intervals [lo, hi] against the exact optimum."""
    iv = lambda x: f"[{x[0]:+.3f}, {x[1]:+.3f}]"  # noqa: E731
    return (
        f"\nthreshold {r['threshold']:+.3f}: reference safety {iv(r['reference']['safety'][0])} -> achieved "
        f"{iv(r['achieved']['safety'][0])} (exact optimum {iv(r['optimum']['safety'][0])})\n"
        f"lambda from samples {r['lambda'][0]:.4f} vs exact {r['optimum']['lambda'][0]:.4f}; reward "
        f"{iv(r['reference']['reward'])} -> {iv(r['achieved']['reward'])} (optimum {iv(r['optimum']['reward'])})\n"
        f"KL(trained || optimum) = {iv(r['kl_to_optimum'])} vs KL(reference || optimum) = {iv(r['kl_ref_to_optimum'])}"
        f"\nPPO ({r['estimator']}): {r['ppo']['steps']} steps, {r['ppo']['samples']} samples, {r['ppo']['seconds']} s"
    )


def _flag(args: list[str], name: str, default: str) -> str:
    """The last value given to `name` in a train_ppo_ray argument list."""
    values = [args[i + 1] for i, x in enumerate(args[:-1]) if x == name]
    return values[-1] if values else default
