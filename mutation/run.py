"""Mutation testing of the pure layers (what `make mutation` runs; not part of `make test` or CI):

    python mutation/run.py [--max-children 2] [--summary-only]

mutmut (configured in pyproject.toml's [tool.mutmut]: the fast tests of those layers, `-m "not
slow"`) mutates every function in SCOPE, runs the tests that reach each mutant, and keeps its
results in mutants/ (removed first: every run starts fresh, so test changes are seen). Every mutant
that survives must be listed, with the reason it cannot change behaviour, in mutation/EQUIVALENT.md;
the score is killed / (mutants - equivalent) per module. Writes mutation/summary.json (read by benchmarks/evidence.py
for README's "Does it work?") and exits 1 below TARGET or with an unexplained survivor.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import date
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
TARGET = 0.90
# module file -> functions left out (pictures: only cosmetic arguments; the tests check each
# picture's size, threshold line and markers), or the only functions in scope.
SCOPE = {
    "openrlhf_dual/dual/objective.py": {},
    "openrlhf_dual/dual/solver.py": {},
    "openrlhf_dual/dual/uncertainty.py": {},
    "openrlhf_dual/dual/frontier.py": {"skip": ["plot_frontier"]},
    "openrlhf_dual/labels.py": {},
    "openrlhf_dual/pairs.py": {},
    "openrlhf_dual/evaluation.py": {"skip": ["plot_plane"]},
    "openrlhf_dual/scoring/safe_rlhf.py": {"only": ["normaliser"]},
}
KILLED = {1, 3, 36, 24, -24, 152, 255}  # a failing test, or a mutant that hangs (timeout)


def mangled(path: str) -> list[str]:
    """mutmut's name prefix of every function in scope of one module: `pkg.mod.x_fn` for
    functions, `pkg.mod.xǁClassǁmethod` for methods."""
    module = path[: -len(".py")].replace("/", ".")
    rule = SCOPE[path]
    names = []
    for node in ast.parse((ROOT / path).read_text()).body:
        if isinstance(node, ast.FunctionDef):
            names.append((node.name, f"{module}.x_{node.name}"))
        elif isinstance(node, ast.ClassDef):
            names += [(f.name, f"{module}.xǁ{node.name}ǁ{f.name}") for f in node.body if isinstance(f, ast.FunctionDef)]
    return [m for name, m in names if name not in rule.get("skip", []) and ("only" not in rule or name in rule["only"])]


def equivalent() -> dict[str, str]:
    """Mutant name -> the reason it is equivalent, from EQUIVALENT.md's `- \\`name\\`: reason` lines."""
    text = (HERE / "EQUIVALENT.md").read_text()
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^- `([^`]+)`:?(.*)$", text, flags=re.M)}


def not_killed() -> list[str]:
    """In-scope mutants of the last run that no test has killed yet (survived or not yet tested)."""
    out = []
    for path in SCOPE:
        meta = ROOT / "mutants" / (path + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        prefixes = tuple(p + "__mutmut_" for p in mangled(path))
        out += [k for k, v in codes.items() if k.startswith(prefixes) and v not in KILLED]
    return out


def summarise() -> dict:
    equiv = equivalent()
    modules, unexplained, stale = {}, [], []
    for path in SCOPE:
        meta = ROOT / "mutants" / (path + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        prefixes = tuple(p + "__mutmut_" for p in mangled(path))
        codes = {k: v for k, v in codes.items() if k.startswith(prefixes)}
        killed = sum(v in KILLED for v in codes.values())
        eq = [k for k, v in codes.items() if k in equiv and v not in KILLED]
        stale += [k for k, v in codes.items() if k in equiv and v in KILLED]
        survivors = sorted(k for k, v in codes.items() if v not in KILLED and k not in equiv)
        unexplained += survivors
        modules[path] = {"mutants": len(codes), "killed": killed, "equivalent": len(eq), "survived": len(survivors),
                         "score": killed / max(1, len(codes) - len(eq))}  # fmt: skip
    total = {k: sum(m[k] for m in modules.values()) for k in ("mutants", "killed", "equivalent", "survived")}
    total["score"] = total["killed"] / max(1, total["mutants"] - total["equivalent"])
    return {"date": date.today().isoformat(), "tool": f"mutmut {version('mutmut')}", "command": "make mutation",
            "target": TARGET, "total": total, "modules": modules, "unexplained": unexplained, "stale_equivalent": stale}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-children", type=int, default=2, help="mutants tested at once")
    p.add_argument("--summary-only", action="store_true", help="score the last run without running mutmut")
    p.add_argument("--resume", action="store_true",
                   help="keep the last run's kills; re-collect which tests reach what and test only the rest")  # fmt: skip
    a = p.parse_args()
    if not a.summary_only:
        globs = [m + "__mutmut_*" for path in SCOPE for m in mangled(path)]
        mutmut = Path(sys.executable).parent / "mutmut"
        if a.resume:
            (ROOT / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
            globs = not_killed()
        else:
            shutil.rmtree(ROOT / "mutants", ignore_errors=True)
            (ROOT / "mutants").mkdir()
        # mutmut forks each mutant's test run from a process that has run torch: with torch's thread
        # pools alive the children deadlock (futex waits) and time out, which would count as kills
        single = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(ROOT / "mutants" / "run.log", "w") as log:  # mutmut's own progress output
            proc = subprocess.run([str(mutmut), "run", "--max-children", str(a.max_children), *globs], cwd=ROOT,
                                  env={**os.environ, **single}, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        if proc.returncode != 0:
            print(f"mutmut run exited {proc.returncode}: see mutants/run.log", file=sys.stderr)
            return proc.returncode
    s = summarise()
    (HERE / "summary.json").write_text(json.dumps(s, indent=1) + "\n")
    print(f"{'module':40s} {'mutants':>8s} {'killed':>7s} {'equiv':>6s} {'survived':>9s} {'score':>7s}")
    for path, m in [*s["modules"].items(), ("total", s["total"])]:
        print(f"{path:40s} {m['mutants']:8d} {m['killed']:7d} {m['equivalent']:6d} {m['survived']:9d} {m['score']:7.1%}")
    for name in s["unexplained"]:
        print(f"survived, not in EQUIVALENT.md: {name}   (see: {mutmut_cmd()} show {name})")
    for name in s["stale_equivalent"]:
        print(f"listed as equivalent but killed now (drop it from EQUIVALENT.md): {name}")
    print(f"wrote {HERE / 'summary.json'}")
    return 0 if s["total"]["score"] >= TARGET and not s["unexplained"] else 1


def mutmut_cmd() -> str:
    return str(Path(sys.executable).parent.relative_to(ROOT) / "mutmut") if ROOT in Path(sys.executable).parents else "mutmut"


if __name__ == "__main__":
    sys.exit(main())
