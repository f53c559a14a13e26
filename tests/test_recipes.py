"""Every recipe asks, stage by stage, for no more GPUs than it says it runs on.

Each recipe runs with its launchers (python, deepspeed, ray) replaced by recorders; the recorded
commands are parsed with our own parsers, and each stage's demand is computed by the same
functions prepare and evaluate place their actors with (sampler_stage, scorer_stage, stages_of).
OpenRLHF's train_ppo_ray placement follows its cli/train_ppo_ray.py (0.11.2).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from recipe_commands import check_exit

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.sh"))
RECORDER = '#!/usr/bin/env bash\n{ printf "%s\\037" "$(basename "$0")" "$@"; printf "\\036"; } >> "$RECORD"\n'

pytestmark = pytest.mark.vllm


def stated_gpus(recipe: str) -> int:
    """The GPUs a recipe says it runs on: its GPUS knob, or NODES x GPUS_PER_NODE (0 for the CPU demo)."""
    text = (ROOT / "recipes" / recipe).read_text()
    knob = lambda name: re.search(rf"^{name}=\$?{{?(?:{name}:-)?(\d+)", text, re.M)  # noqa: E731
    if knob("NODES"):
        return int(knob("NODES")[1]) * int(knob("GPUS_PER_NODE")[1])
    if knob("GPUS"):
        return int(knob("GPUS")[1])
    assert "cpu" in recipe, f"{recipe} does not say how many GPUs it needs (a GPUS or NODES/GPUS_PER_NODE knob)"
    return 0


def record(recipe: str, tmp_path: Path) -> list[list[str]]:
    """The commands the recipe runs (launcher name first), in order."""
    shim = tmp_path / "bin"
    shim.mkdir(parents=True)
    for name in ("python", "python3", "deepspeed", "ray", "torchrun"):
        (shim / name).write_text(RECORDER)
        (shim / name).chmod(0o755)
    log = tmp_path / "record"
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "RECORD": str(log), "OUT": str(tmp_path / "out"),
           "PREP": str(tmp_path / "prep"), "WORK": str(tmp_path / "work")}  # fmt: skip
    proc = subprocess.run(["bash", str(ROOT / "recipes" / recipe)], env=env, capture_output=True, text=True, cwd=tmp_path)
    check_exit(ROOT / "recipes" / recipe, proc)
    return [r.split("\x1f")[:-1] for r in log.read_text().split("\x1e") if r]


def module_args(cmd: list[str]) -> tuple[str, list[str]]:
    """(module, its arguments) of `python -m M ...`, `deepspeed [opts] --module M ...`, `ray job submit ... -- python3 -m M ...`."""
    if "--" in cmd:
        cmd = cmd[cmd.index("--") + 1 :]
    flag = "-m" if "-m" in cmd else "--module"
    i = cmd.index(flag)
    return cmd[i + 1], cmd[i + 2 :]


def ppo_gpus(argv: list[str]) -> int:
    """GPUs train_ppo_ray reserves (OpenRLHF 0.11.2): colocate_all shares the actor's GPUs with ref and
    vLLM; otherwise actor, ref (unless colocated with the actor), critic, reward model and engines add up."""
    p = argparse.ArgumentParser()
    for role in ("actor", "ref", "critic", "reward"):
        p.add_argument(f"--{role}.num_nodes", type=int, default=1)
        p.add_argument(f"--{role}.num_gpus_per_node", type=int, default=8)
    p.add_argument("--critic.model_name_or_path")
    p.add_argument("--reward.model_name_or_path")
    p.add_argument("--vllm.num_engines", type=int, default=0)
    p.add_argument("--vllm.tensor_parallel_size", type=int, default=1)
    p.add_argument("--train.colocate_all", action="store_true")
    p.add_argument("--train.colocate_actor_ref", action="store_true")
    a = vars(p.parse_known_args(argv)[0])
    n = lambda role: a[f"{role}.num_nodes"] * a[f"{role}.num_gpus_per_node"]  # noqa: E731
    if a["train.colocate_all"]:
        return n("actor")
    return (n("actor") + (0 if a["train.colocate_actor_ref"] else n("ref")) + a["vllm.num_engines"] * a["vllm.tensor_parallel_size"]
            + (n("critic") if a["critic.model_name_or_path"] else 0) + (n("reward") if a["reward.model_name_or_path"] else 0))  # fmt: skip


def stage_gpus(cmd: list[str], stated: int, prepared: dict, tmp_path: Path) -> dict[str, float]:
    """{stage: GPUs} of one recorded command. `prepared` carries the last prepare's config (evaluate inherits it)."""
    from openrlhf_dual.cli import evaluate, prepare
    from openrlhf_dual.sampling import sampler_stage
    from openrlhf_dual.score_actors import scorer_stage

    if cmd[0].startswith("python") and "-c" in cmd:  # an inline script (calibrated.sh reads the next lambda)
        return {"python -c": 0.0}
    if cmd[0] == "deepspeed":  # every GPU of each node in the run unless --num_gpus says otherwise
        ds = cmd[: cmd.index("--module")]
        return {"train": float(ds[ds.index("--num_gpus") + 1]) if "--num_gpus" in ds else stated}
    module, argv = module_args(cmd)
    if module == "openrlhf.cli.train_ppo_ray":
        return {"ppo": ppo_gpus(argv)}
    if module == "openrlhf_dual.cli.prepare":
        cfg = prepare.config_from_args(vars(prepare.build_parser().parse_args(argv)))
        prepared["cfg"] = cfg
        stages = [sampler_stage(cfg.backend, cfg.num_actors, cfg.num_gpus_per_actor, cfg.vllm),
                  scorer_stage(cfg.reward, cfg.safety, cfg.num_actors, cfg.num_gpus_per_actor)]  # fmt: skip
        return {f"prepare {s.name}": s.gpus for s in stages}
    if module == "openrlhf_dual.cli.evaluate":  # against the prep directory a GPU recipe's prepare writes
        a = vars(evaluate.build_parser().parse_args(argv))
        cfg = prepared.get("cfg") or load_mocan_prepare(tmp_path, prepared)
        prep_dir = tmp_path / "evaluated-prep"
        prep_dir.mkdir(exist_ok=True)
        # the manifest fields evaluate reads (prepare's inputs and placement); no source identities:
        # those resolve the recipes' hub names, which this offline machine cannot
        manifest = {"inputs": json.loads(json.dumps(cfg.fingerprint())),
                    "placement": {"num_actors": cfg.num_actors, "num_gpus_per_actor": cfg.num_gpus_per_actor, "vllm": cfg.vllm}}  # fmt: skip
        (prep_dir / "manifest.json").write_text(json.dumps(manifest))
        (prep_dir / "dual.json").write_text(json.dumps({"thresholds": list(cfg.thresholds), "beta": cfg.beta}))
        ecfg, _ = evaluate.prep_config(prep_dir, a)
        return {f"evaluate {s.name}": s.gpus for s in evaluate.stages_of(ecfg)}
    # CPU only: LoRA merging (OpenRLHF's lora_combiner loads on the CPU), data splitting, the CPU demo
    assert module in ("openrlhf.cli.lora_combiner", "openrlhf_dual.cli.split_preferences", "openrlhf_dual.cli.calibrate",
                      "openrlhf_dual.demo"), module  # fmt: skip
    return {module: 0.0}


def load_mocan_prepare(tmp_path: Path, prepared: dict):
    """The prepare of recipes/mocan_beaver_7b.sh (lambda_sweep.sh evaluates its prep directory)."""
    cmds = record("mocan_beaver_7b.sh", tmp_path / "mocan")
    for cmd in cmds:
        if cmd[0].startswith("python") and module_args(cmd)[0] == "openrlhf_dual.cli.prepare":
            stage_gpus(cmd, 8, prepared, tmp_path)
    return prepared["cfg"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_fits_the_gpus_it_states(recipe, tmp_path):
    stated = stated_gpus(recipe)
    prepared: dict = {}
    demand = {}
    for cmd in record(recipe, tmp_path):
        for stage, gpus in stage_gpus(cmd, stated, prepared, tmp_path).items():
            demand[stage] = max(demand.get(stage, 0.0), gpus)
    assert demand, f"{recipe} ran nothing"
    if recipe == "calibrated.sh":  # never certified under the recorders: every round runs
        assert demand["openrlhf_dual.cli.calibrate"] == 0.0 and demand["train"] == stated
    too_big = {s: g for s, g in demand.items() if g > stated}
    assert not too_big, f"{recipe} states {stated} GPUs but asks for {too_big} (all stages: {demand})"
    if stated:  # a GPU recipe uses what it states somewhere (else its knob is stale)
        assert max(demand.values()) == stated, f"{recipe} states {stated} GPUs, uses at most {max(demand.values())}: {demand}"


def test_calibrated_recipe_retrains_at_calibrates_lambda_and_stops_when_certified(tmp_path):
    """recipes/calibrated.sh's loop, with a stand-in calibrate that certifies the second round:
    round 1 trains and evaluates at the lambda calibrate wrote, and nothing runs after the
    certificate (exit 0)."""
    shim = tmp_path / "bin"
    shim.mkdir()
    # records like RECORDER; runs inline scripts; calibrate writes lambda [0.25 x reports] and certifies at 2 reports
    fake = RECORDER + """if [ "$1" = -c ]; then exec %s "$@"; fi
if [ "$2" = openrlhf_dual.cli.calibrate ]; then
  n=0; out=""; prev=""
  for a in "$@"; do case "$a" in *report.json) n=$((n + 1));; esac; [ "$prev" = --calibrate.out ] && out="$a"; prev="$a"; done
  mkdir -p "$out"
  certified=false; [ "$n" -ge 2 ] && certified=true
  printf '{\\n  "certified": %%s,\\n  "lambda": [\\n    %%s,\\n    0.5\\n  ]\\n}\\n' "$certified" "0.$((25 * n))" > "$out/calibration.json"
fi
""" % sys.executable
    for name in ("python", "python3", "deepspeed"):
        (shim / name).write_text(fake if name == "python" else RECORDER)
        (shim / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "RECORD": str(tmp_path / "record"),
           "OUT": str(tmp_path / "out"), "PREP": str(tmp_path / "prep"), "ROUNDS": "3", "THRESHOLD": "0.5 1.0"}  # fmt: skip
    proc = subprocess.run(["bash", str(ROOT / "recipes" / "calibrated.sh")], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "round-1 is certified" in proc.stdout
    cmds = [r.split("\x1f")[:-1] for r in (tmp_path / "record").read_text().split("\x1e") if r]
    runs = [(c[0], *module_args(c)) for c in cmds if "-c" not in c]
    assert [m for _, m, _ in runs] == ["openrlhf_dual.cli.prepare"] + ["openrlhf_dual.cli.train_sft", "openrlhf_dual.cli.evaluate",
                                                                       "openrlhf_dual.cli.calibrate"] * 2  # fmt: skip
    train0, train1, eval1, calib1 = runs[1][2], runs[4][2], runs[5][2], runs[6][2]
    assert "--dual.lambda" not in train0  # one shot: the prep directory's lambda*
    assert train1[train1.index("--dual.lambda") + 1 :][:2] == ["0.25", "0.5"]
    assert eval1[eval1.index("--eval.policy") + 1] == f"round-1={tmp_path / 'out' / 'round-1'}:0.25,0.5"
    assert calib1[calib1.index("--eval.report") + 1 :][:2] == [str(tmp_path / "out" / f"round-{k}-eval" / "report.json") for k in (0, 1)]
