"""Evaluate trained policies against the reference and the constraint they were trained for:

    python -m openrlhf_dual.cli.evaluate --dual.prep_dir prep/ \
        --eval.policy mocan=ckpt/mocan lam0.3=ckpt/sweep-0.3:0.3 \
        --data.prompt_dataset heldout.jsonl --data.max_samples 200 --eval.out eval/

Samples K responses per held-out prompt from the reference (the prep directory's) and from every
policy, one model at a time, with prepare's backend, placement and --vllm.* engine settings (from
manifest.json, unless given here) and its prompt formatting; then scores them with the prep
directory's own sources; estimates KL(policy || reference) from sequence log-probs of both models on the
policy's samples. A policy is NAME=PATH[:LAMBDA[,LAMBDA...]]: the dual's prediction beside its
achieved values is for that lambda (default: the prep directory's lambda*). Writes report.json,
report.md and plane.png to --eval.out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from openrlhf_dual.artifacts import write_bytes_atomic, write_json
from openrlhf_dual.cli.prepare import add_vllm_flags, vllm_settings
from openrlhf_dual.evaluation import markdown, plot_plane, policy_report
from openrlhf_dual.prep import PrepConfig, PrepError, load_prompts, load_scores


def parse_policy(text: str) -> tuple[str, str, list[float] | None]:
    """NAME=PATH[:LAMBDA[,LAMBDA...]] -> (name, path, lambdas or None)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest or name == "reference":
        raise ValueError(f"--eval.policy {text!r}: expected NAME=PATH[:LAMBDA,...] (NAME other than 'reference')")
    path, _, lams = rest.partition(":")
    return name, path, [float(v) for v in lams.split(",")] if lams else None


def prep_config(prep_dir: Path, a: dict) -> tuple[PrepConfig, dict]:
    """Prepare's configuration of this prep directory with the held-out data and sampling flags
    swapped in, and its dual solution. Placement (actors, GPUs, --vllm.* engines) is prepare's
    unless a flag says otherwise."""
    for name in ("manifest.json", "dual.json"):
        if not (prep_dir / name).exists():
            raise PrepError(f"{prep_dir / name} not found: evaluate needs a finished prepare")
    manifest = json.loads((prep_dir / "manifest.json").read_text())
    inputs, placed = manifest["inputs"], manifest.get("placement", {})
    solution = json.loads((prep_dir / "dual.json").read_text())
    cfg = PrepConfig(**{**inputs, "safety": tuple(inputs["safety"]), "pairs_keys": tuple(inputs["pairs_keys"])},
                     prep_dir=str(prep_dir), thresholds=tuple(solution["thresholds"]), beta=solution["beta"])  # fmt: skip
    held_out = {
        "prompt_dataset": a["data.prompt_dataset"], "prompt_split": a["data.prompt_split"],
        "max_samples": a["data.max_samples"], "n_samples": a["rollout.n_samples_per_prompt"], "seed": a["train.seed"],
        "backend": a["dual.backend"], "num_actors": a["dual.num_actors"] or placed.get("num_actors"),
        "num_gpus_per_actor": placed.get("num_gpus_per_actor") if a["dual.num_gpus_per_actor"] is None
        else a["dual.num_gpus_per_actor"],
        "vllm": {**placed.get("vllm", {}), **vllm_settings(a)},
    }  # fmt: skip
    return dataclasses.replace(cfg, **{k: v for k, v in held_out.items() if v is not None}), solution


def sample(cfg: PrepConfig, model: str, prompts: list[dict], stages: list) -> list[list[dict]]:
    """K samples per prompt of `model`; its sampler's GPUs are free again on return."""
    from openrlhf_dual.sampling import ReferenceSampler, SamplingConfig

    sampling = SamplingConfig(n=cfg.n_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                              max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)  # fmt: skip
    with ReferenceSampler(cfg.backend, model, cfg.num_actors, sampling, num_gpus_per_actor=cfg.num_gpus_per_actor,
                          stages=stages, **cfg.vllm) as sampler:  # fmt: skip
        got = sampler.sample([p["prompt"] for p in prompts], indices=[p["id"] for p in prompts])
    return [[dataclasses.asdict(x) for x in per_prompt] for per_prompt in got]


def stages_of(cfg: PrepConfig) -> list:
    """What evaluate asks of the cluster: sampling (one model at a time), then scoring: the prep
    directory's scorers, the reference's log-prob actors and one policy's."""
    from openrlhf_dual.sampling import Stage, sampler_stage
    from openrlhf_dual.score_actors import scorer_stage

    score = scorer_stage(cfg.reward, cfg.safety, cfg.num_actors, cfg.num_gpus_per_actor)
    logprob = tuple({"GPU": cfg.num_gpus_per_actor} for _ in range(2 * max(1, cfg.num_actors)))
    return [sampler_stage(cfg.backend, cfg.num_actors, cfg.num_gpus_per_actor, cfg.vllm),
            Stage("score", score.bundles + logprob, f"{score.what}, and 2 log-prob models x {max(1, cfg.num_actors)} "
                  f"actors x {cfg.num_gpus_per_actor:g} GPU")]  # fmt: skip


def logprobs(group, tok, prompts: list[dict], samples: list[list[dict]]) -> np.ndarray:
    """log pi(y | x) [N, K] of the given samples (their exact token ids) under `group`'s model."""
    from openrlhf_dual.sampling import prompt_token_ids

    k = len(samples[0])
    prompt_ids = [prompt_token_ids(tok, p["prompt"]) for p in prompts for _ in range(k)]
    return group.collect(group.submit(prompt_ids, [s["token_ids"] for per in samples for s in per])).reshape(-1, k)


def predictions(prep_dir: Path, cfg: PrepConfig, lam: list[float], margin: bool) -> dict:
    """The dual's prediction at lam from the prep directory's scores, in the units of the report."""
    from openrlhf_dual.dual import predict
    from openrlhf_dual.dual.solver import check_inputs

    scores = load_scores(prep_dir)
    reward, safety, _ = check_inputs(scores[..., 0], scores[..., 1:], np.zeros(scores.shape[-1] - 1), cfg.beta,
                                     "margin" if margin else "model")  # fmt: skip
    pred = predict(reward, safety, lam, cfg.beta)
    return {"lambda": list(lam), "reward": pred["reward"], "safety": pred["safety"].tolist(), "kl": pred["kl"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dual.prep_dir", required=True, help="the prep directory the policies were trained from")
    p.add_argument("--eval.policy", nargs="+", required=True, help="NAME=PATH[:LAMBDA,...] per trained policy")
    p.add_argument("--eval.out", required=True, help="output directory")
    p.add_argument("--data.prompt_dataset", required=True, help="held-out prompts (same columns as prepare's)")
    p.add_argument("--data.prompt_split", default=None)
    p.add_argument("--data.max_samples", type=int, default=None, help="N held-out prompts")
    p.add_argument("--rollout.n_samples_per_prompt", type=int, default=4, help="K samples per prompt and policy")
    p.add_argument("--train.seed", type=int, default=1234, help="sampling seed (other than prepare's)")
    p.add_argument("--dual.backend", choices=("hf", "vllm"), default=None, help="default: prepare's")
    p.add_argument("--dual.num_actors", type=int, default=None)
    p.add_argument("--dual.num_gpus_per_actor", type=float, default=None)
    add_vllm_flags(p, inherit=True)  # default: what prepare used (manifest.json's "placement")
    return p


def evaluate(a: dict) -> dict:
    """Sample the reference and every policy (one sampler at a time), then score them all."""
    import ray
    from transformers import AutoTokenizer

    from openrlhf_dual.sampling import PlacementError, SamplingError
    from openrlhf_dual.sampling.placement import await_gpus, check_stages
    from openrlhf_dual.score_actors import LogProbGroup, SampleScorer, ScoringError

    prep_dir, out = Path(a["dual.prep_dir"]), Path(a["eval.out"])
    cfg, solution = prep_config(prep_dir, a)
    policies = [parse_policy(t) for t in a["eval.policy"]]
    margin = solution["form"] == "margin"
    scale = cfg.beta if margin else 1.0  # PeCAN: implicit rewards in beta x log-ratio units, as the thresholds
    prompts = load_prompts(cfg, cfg.prompt_dataset, cfg.max_samples)
    thresholds = np.asarray(solution["thresholds"])
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init()
    try:
        stages = stages_of(cfg)
        check_stages(stages)
        ref_samples = sample(cfg, cfg.ref_model, prompts, stages)
        policy_samples = [sample(cfg, path, prompts, stages) for _, path, _ in policies]
        await_gpus(stages[1], stages)
        scorer = SampleScorer(cfg.reward, cfg.safety, ref_model=cfg.ref_model, num_actors=cfg.num_actors,
                              num_gpus_per_actor=cfg.num_gpus_per_actor)  # fmt: skip
        tok = AutoTokenizer.from_pretrained(cfg.ref_model, trust_remote_code=False)
        ref_logprob = LogProbGroup(cfg.ref_model, cfg.num_actors, cfg.num_gpus_per_actor)
        try:
            ref_scores = scale * scorer(prompts, ref_samples)
            results = {"reference": {**policy_report(ref_scores, ref_scores, thresholds, margin=margin, logratio=None,
                                                     predicted=None), "path": cfg.ref_model}}  # fmt: skip
            for (name, path, lam), samples in zip(policies, policy_samples):
                group = LogProbGroup(path, cfg.num_actors, cfg.num_gpus_per_actor)
                logratio = logprobs(group, tok, prompts, samples) - logprobs(ref_logprob, tok, prompts, samples)
                group.close()
                lam = lam if lam is not None else solution["lam"]
                pred = predictions(prep_dir, cfg, lam, margin) if None not in lam else None
                results[name] = {**policy_report(scale * scorer(prompts, samples), ref_scores, thresholds, margin=margin,
                                                 logratio=logratio, predicted=pred), "path": path}  # fmt: skip
        finally:
            ref_logprob.close()
            scorer.close()
    except (ScoringError, PlacementError, SamplingError) as err:
        raise PrepError(str(err)) from err
    finally:
        if owns_ray:
            ray.shutdown()
    report = {"prep_dir": str(prep_dir), "thresholds": solution["thresholds"], "beta": cfg.beta, "margin": margin,
              "n_prompts": len(prompts), "n_samples": cfg.n_samples, "policies": results}  # fmt: skip
    frontier = prep_dir / "frontier.json"
    write_json(out / "report.json", report)
    write_bytes_atomic(out / "report.md", markdown(report).encode())
    plot_plane(report, out / "plane.png", json.loads(frontier.read_text()) if frontier.exists() else None)
    return report


def main(argv: list[str] | None = None) -> int:
    a = vars(build_parser().parse_args(argv))
    try:
        report = evaluate(a)
    except (PrepError, ValueError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
