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
    subprocess.run(["bash", str(recipe)], cwd=workdir, env=env, check=True, capture_output=True, timeout=120)
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def flag_values(argv: list[str], flag: str) -> list[str]:
    """The values following `flag` in argv, up to the next --flag."""
    if flag not in argv:
        return []
    rest = argv[argv.index(flag) + 1 :]
    end = next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))
    return rest[:end]
