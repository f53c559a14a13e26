"""`make mutation` runs the tests named in pyproject.toml's [tool.mutmut]: each must still exist
(a renamed test stopped the whole mutation run before it tested one mutant)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_mutmut_selects_is_collected():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    selection = cfg["pytest_add_cli_args_test_selection"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *cfg["pytest_add_cli_args"], *selection],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = proc.stdout
    for item in selection:
        assert item.split("::")[0] in collected, item
    assert sum(line.startswith("tests/") for line in collected.splitlines()) >= 50
