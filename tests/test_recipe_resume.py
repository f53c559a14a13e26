"""A rerun of a multi-run recipe resumes from the runs that finished and only those: a training run
or LoRA merge counts as finished once it exited 0 (the recipe then writes NAME.done beside its
output, with the settings it trained with), so one killed while it saved (config.json written,
weights not) is run again, and a finished run is never reused under other settings."""

from __future__ import annotations

import os
import subprocess

from recipe_commands import RECIPES, flag_values, recorded_commands


def runs(recipe, workdir) -> tuple[list[str], list[str], int]:
    """(training output dirs, LoRA merge outputs, evaluate calls) of one more run of the recipe."""
    n = len(list(workdir.glob("run-*")))
    cmds = recorded_commands(recipe, workdir / f"run-{n}")
    trained = [flag_values(c, "--ckpt.output_dir")[0] for c in cmds if "--ckpt.output_dir" in c]
    merged = [flag_values(c, "--output_path")[0] for c in cmds if "openrlhf.cli.lora_combiner" in c]
    return trained, merged, sum("openrlhf_dual.cli.evaluate" in c for c in cmds)


def test_lambda_sweep_reruns_what_did_not_finish_and_nothing_else(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setenv("LAMBDAS", "star 0.5")
    recipe = RECIPES / "lambda_sweep.sh"
    star, half = str(out / "lambda-star"), str(out / "lambda-0.5")
    assert runs(recipe, tmp_path) == ([star, half], [], 1)
    assert (out / "lambda-star.done").exists() and (out / "lambda-0.5.done").exists()
    # lambda 0.5 was killed while it saved; lambda* finished as a LoRA adapter, not merged yet
    (out / "lambda-0.5.done").unlink()
    (out / "lambda-0.5").mkdir()
    (out / "lambda-0.5" / "config.json").write_text("{}")
    (out / "lambda-star").mkdir()
    (out / "lambda-star" / "adapter_config.json").write_text("{}")
    assert runs(recipe, tmp_path) == ([half], [star + "-merged"], 1)
    assert runs(recipe, tmp_path) == ([], [], 1)  # everything finished: only the evaluation runs
    # other training settings: refused, nothing trained over the finished runs
    env = {**os.environ, "PATH": f"{tmp_path / 'run-0' / 'stub-bin'}{os.pathsep}{os.environ['PATH']}",
           "TRAIN_FLAGS": "--train.max_epochs 9"}  # fmt: skip
    proc = subprocess.run(["bash", str(recipe)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and f"{star} was trained with other settings" in proc.stderr, proc.stderr
    assert (out / "lambda-star.done").read_text().endswith("--data.max_len 1024\n")  # the default flags, kept


def test_calibrated_recipe_keeps_finished_rounds(tmp_path, monkeypatch):
    out = tmp_path / "cal"
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setenv("ROUNDS", "1")
    recipe = RECIPES / "calibrated.sh"
    rounds = [str(out / "round-0"), str(out / "round-1")]
    assert runs(recipe, tmp_path)[0] == rounds
    (out / "round-1.done").unlink()  # killed while it saved
    assert runs(recipe, tmp_path)[0] == rounds[1:]
