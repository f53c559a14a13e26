"""The commands a recipe runs, recorded by running it under bash with the launchers (python,
deepspeed, torchrun, ray) replaced by stubs that write their argv to a log and exit 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
LAUNCHERS = ("python", "python3", "deepspeed", "torchrun", "ray")
# recipes whose end under recorded launchers is not exit 0 by design, and what they print then (so a
# crash with the same status does not pass): calibrated.sh exits 1 when no round is certified, and
# recorded calibrate runs write no certificate
EXIT_STATUS = {"calibrated.sh": (1, "not certified after")}


def check_exit(recipe: Path, proc: subprocess.CompletedProcess) -> None:
    """The recipe ended as it should under recorded launchers (EXIT_STATUS; else exit 0)."""
    status, says = EXIT_STATUS.get(recipe.name, (0, ""))
    assert proc.returncode == status and says in proc.stdout, f"{recipe.name} exited {proc.returncode}:\n" + (
        proc.stdout[-2000:] + proc.stderr[-2000:])


def recorded_commands(recipe: Path, workdir: Path) -> list[list[str]]:
    """[launcher, *argv] of every launcher call the recipe makes, in order."""
    stubs, log = workdir / "stub-bin", workdir / f"{recipe.stem}.commands.jsonl"
    stubs.mkdir(parents=True, exist_ok=True)
    record = "import json, sys; open(sys.argv[1], 'a').write(json.dumps(sys.argv[2:]) + '\\n')"
    for name in LAUNCHERS:
        stub = stubs / name
        stub.write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" -c "{record}" "{log}" "{name}" "$@"\n')
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}
    check_exit(recipe, subprocess.run(["bash", str(recipe)], cwd=workdir, env=env, capture_output=True, text=True, timeout=120))
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def flag_values(argv: list[str], flag: str) -> list[str]:
    """The values following `flag` in argv, up to the next --flag."""
    if flag not in argv:
        return []
    rest = argv[argv.index(flag) + 1 :]
    end = next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))
    return rest[:end]
