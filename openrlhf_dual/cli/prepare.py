"""The dual-preprocessing step, OpenRLHF-style flags:

    python -m openrlhf_dual.cli.prepare \
        --ref.model_name_or_path PKU-Alignment/alpaca-7b-reproduced \
        --data.prompt_dataset PKU-Alignment/PKU-SafeRLHF-30K --data.input_key prompt --data.max_samples 1000 \
        --rollout.n_samples_per_prompt 128 --rollout.max_new_tokens 512 \
        --dual.reward safe_rlhf:PKU-Alignment/beaver-7b-v1.0-reward \
        --dual.safety safe_rlhf:PKU-Alignment/beaver-7b-v1.0-cost,sign=-1 \
        --dual.threshold 0.5 --dual.beta 0.1 --dual.prep_dir prep/

Flags shared with `openrlhf.cli.train_ppo_ray` keep its names and meanings.
"""

from __future__ import annotations

import argparse
import json
import sys

from openrlhf_dual.prep import PrepConfig, PrepError, run_prepare


VLLM_DEFAULTS = {"num_engines": 1, "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "enforce_eager": False,
                 "enable_prefix_caching": False}  # fmt: skip


def add_vllm_flags(p: argparse.ArgumentParser, inherit: bool = False) -> None:
    """OpenRLHF's --vllm.* engine flags. inherit: no defaults (None: what the prep directory used)."""
    d = dict.fromkeys(VLLM_DEFAULTS) if inherit else VLLM_DEFAULTS
    p.add_argument("--vllm.num_engines", type=int, default=d["num_engines"])
    p.add_argument("--vllm.tensor_parallel_size", type=int, default=d["tensor_parallel_size"])
    p.add_argument("--vllm.gpu_memory_utilization", type=float, default=d["gpu_memory_utilization"],
                   help="on vLLM's CPU build: the fraction of RAM it takes (KV cache included)")  # fmt: skip
    p.add_argument("--vllm.enforce_eager", action="store_true", default=d["enforce_eager"])
    p.add_argument("--vllm.enable_prefix_caching", action="store_true", default=d["enable_prefix_caching"])


def vllm_settings(a: dict) -> dict:
    """The ReferenceSampler keyword arguments of the --vllm.* flags that were given (not None)."""
    return {f"vllm_{k}": a[f"vllm.{k}"] for k in VLLM_DEFAULTS if a[f"vllm.{k}"] is not None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="CAN dual-preprocessing: sample, score, solve, label")
    p.add_argument("--ref.model_name_or_path", required=True, help="the reference policy pi_ref (HF path)")
    p.add_argument("--data.prompt_dataset", required=True, help="HF dataset name or path (json/jsonl/dir)")
    p.add_argument("--data.prompt_split", default="train")
    p.add_argument("--data.input_key", default="input", help="prompt column")
    p.add_argument("--data.input_template", default=None, help="e.g. 'User: {}\\nAssistant: '")
    p.add_argument("--data.apply_chat_template", action="store_true", help="use the tokenizer's chat template")
    p.add_argument("--data.max_samples", type=int, default=1000, help="N prompts for the dual estimate")
    p.add_argument("--rollout.n_samples_per_prompt", type=int, default=16, help="K responses per prompt")
    p.add_argument("--rollout.temperature", type=float, default=1.0)
    p.add_argument("--rollout.top_p", type=float, default=1.0)
    p.add_argument("--rollout.max_new_tokens", type=int, default=256)
    p.add_argument("--train.seed", type=int, default=42)
    add_vllm_flags(p)
    p.add_argument("--dual.prep_dir", required=True)
    p.add_argument("--dual.algo", choices=("mocan", "pecan"), default="mocan",
                   help="pecan: sources are pre-aligned policies (policy:PATH), thresholds are margins over pi_ref")
    p.add_argument("--dual.backend", choices=("hf", "vllm"), default="hf", help="vllm: OpenRLHF's vLLM engines (GPU, or vLLM's CPU build)")
    p.add_argument("--dual.num_actors", type=int, default=1, help="hf generation actors; PeCAN: log-prob actors per model")
    p.add_argument("--dual.num_gpus_per_actor", type=float, default=0.0, help="per sampler/scorer actor")
    p.add_argument("--dual.shard_size", type=int, default=64, help="prompts per resumable shard")
    p.add_argument("--dual.reward", required=True, help="KIND:LOCATION[,opts] with KIND rm|safe_rlhf|classifier|judge|remote|file|policy")
    p.add_argument("--dual.safety", nargs="+", required=True, help="one spec per constraint; sign=+1|-1 required")
    p.add_argument("--dual.threshold", type=float, nargs="+", required=True, help="b_j: E[g_j] >= b_j")
    p.add_argument("--dual.beta", type=float, default=0.1, help="KL coefficient (use the same in training)")
    p.add_argument("--dual.bootstrap", type=int, default=0, help="bootstrap resamples for lambda's error")
    p.add_argument("--dual.pairs_dataset", default=None, help="train on this dataset's response pairs (else on samples)")
    p.add_argument("--dual.pairs_keys", nargs=2, default=["response_0", "response_1"], help="its two response columns")
    p.add_argument("--dual.rescore", action="store_true",
                   help="drop a prep directory's scores and score its samples again, after a source changed (file, "
                        "checkpoint, server, or --dual.reward/--dual.safety); give it once, a rerun without it "
                        "resumes. Without it a changed source is refused")
    return p


def config_from_args(a: dict) -> PrepConfig:
    vllm = vllm_settings(a) if a["dual.backend"] == "vllm" else {}
    return PrepConfig(
        prep_dir=a["dual.prep_dir"],
        ref_model=a["ref.model_name_or_path"],
        prompt_dataset=a["data.prompt_dataset"],
        prompt_split=a["data.prompt_split"],
        input_key=a["data.input_key"],
        input_template=a["data.input_template"],
        apply_chat_template=a["data.apply_chat_template"],
        max_samples=a["data.max_samples"],
        n_samples=a["rollout.n_samples_per_prompt"],
        temperature=a["rollout.temperature"],
        top_p=a["rollout.top_p"],
        max_new_tokens=a["rollout.max_new_tokens"],
        seed=a["train.seed"],
        backend=a["dual.backend"],
        num_actors=a["dual.num_actors"],
        num_gpus_per_actor=a["dual.num_gpus_per_actor"],
        shard_size=a["dual.shard_size"],
        reward=a["dual.reward"],
        safety=tuple(a["dual.safety"]),
        thresholds=tuple(a["dual.threshold"]),
        beta=a["dual.beta"],
        algo=a["dual.algo"],
        bootstrap=a["dual.bootstrap"],
        pairs_dataset=a["dual.pairs_dataset"],
        pairs_keys=tuple(a["dual.pairs_keys"]),
        vllm=vllm,
        rescore=a["dual.rescore"],
    )


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(vars(build_parser().parse_args(argv)))
    try:
        solution = run_prepare(cfg)
    except PrepError as err:
        print(f"prepare: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: solution[k] for k in ("lam", "feasible", "predicted", "stderr")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
