"""Run OpenRLHF's own unit tests on pristine OpenRLHF and after each patch of the series: a patch
must not change their result.

    python patches/own_tests.py     # in the environment whose openrlhf is patched (make install)

OpenRLHF's wheel ships its tests/ (a top-level package next to openrlhf/ in site-packages), so no
checkout is needed: its files are taken from the installed wheel and checked against its RECORD.
Each tree gets its own copy of openrlhf/ (the installed one with the later patches undone, checked
byte for byte against the wheel when all are undone) with tests/ beside it, as in a checkout, and
pytest runs there with that tree first on the path. Prints passed/failed/error/skipped per test
file and tree, and exits 1 if any test's outcome differs from the pristine tree's.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import apply as patcher  # patches/apply.py, beside this file

OUTCOMES = ("passed", "failed", "error", "skipped")


def wheel_files(prefix: str) -> dict[str, str]:
    """Files of the installed openrlhf wheel under `prefix`, with their RECORD sha256."""
    dist = importlib.metadata.distribution("openrlhf")
    return {str(f): f.hash.value for f in dist.files if str(f).startswith(prefix) and f.hash is not None}


def record_hash(path: Path) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()


def copy_checked(site: Path, files: dict[str, str], dest: Path) -> None:
    """Copy wheel files from `site` to `dest`; any that differs from the wheel's RECORD is an error."""
    for name, digest in files.items():
        if record_hash(site / name) != digest:
            raise patcher.PatchError(f"{site / name} is not the wheel's file")
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(site / name, dest / name)


def make_tree(site: Path, patches: list[Path], k: int, dest: Path) -> None:
    """`dest`/openrlhf: the installed package with all patches after the first k undone."""
    shutil.copytree(site / "openrlhf", dest / "openrlhf", ignore=shutil.ignore_patterns("__pycache__"))
    for patch in reversed(patches[k:]):
        if not patcher._git_apply(dest, patch, "openrlhf", "--reverse"):
            raise patcher.PatchError(f"cannot undo {patch.name} in a copy of {site / 'openrlhf'}")
    if k == 0:  # the patches undone: must be the wheel's files, byte for byte
        for name, digest in wheel_files("openrlhf/").items():
            if (dest / name).is_file() and record_hash(dest / name) != digest:
                raise patcher.PatchError(f"{name}: undoing the patches did not give the wheel's file")


def run_tests(tree: Path) -> dict[str, str]:
    """pytest on tree/tests with tree first on the path: {test id: outcome}."""
    junit = tree / "junit.xml"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "--rootdir", str(tree), f"--junitxml={junit}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 1) or not junit.is_file():  # 2-5: interrupted, internal error, usage, no tests
        raise RuntimeError(f"pytest exited {proc.returncode} in {tree}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    outcomes = {}
    for case in ET.parse(junit).iter("testcase"):
        tags = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tags[0]] if tags else "passed"
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = outcome
    if not outcomes:
        raise RuntimeError(f"no test ran in {tree}")
    return outcomes


def per_file(outcomes: dict[str, str]) -> dict[str, collections.Counter]:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for test_id, outcome in outcomes.items():
        module = test_id.split("::")[0]
        counts[module.split(".")[1] if module.startswith("tests.") else module][outcome] += 1
    return counts


def main() -> int:
    site = patcher.installed_root()
    patches = sorted(patcher.PATCH_DIR.glob("*.patch"))
    if patcher.applied_count(site, patches) != len(patches):
        print(f"error: {site / 'openrlhf'} does not have all of patches/ applied: run `make install`", file=sys.stderr)
        return 1
    tests = wheel_files("tests/")
    if not tests:
        print("error: the installed openrlhf wheel ships no tests/", file=sys.stderr)
        return 1
    names = ["pristine"] + [f"+{p.name[:4]}" for p in patches]
    results = {}
    with tempfile.TemporaryDirectory(prefix="openrlhf-own-tests-") as tmp:
        for k, name in enumerate(names):
            tree = Path(tmp) / f"tree{k}"
            make_tree(site, patches, k, tree)
            copy_checked(site, tests, tree)
            results[name] = run_tests(tree)
            total = collections.Counter(results[name].values())
            print(f"{name:>9}: " + ", ".join(f"{total[o]} {o}" for o in OUTCOMES), flush=True)
    counts = {name: per_file(r) for name, r in results.items()}
    files = sorted({f for c in counts.values() for f in c})
    print("\npassed/failed/error/skipped per file: " + " | ".join(names))
    for f in files:
        cells = ["/".join(str(counts[n][f][o]) for o in OUTCOMES) for n in names]
        print(f"{f:<40} " + " | ".join(cells))
    changed = {
        name: sorted(t for t in set(r) | set(results["pristine"]) if r.get(t) != results["pristine"].get(t))
        for name, r in results.items()
    }
    for name, diff in changed.items():
        for t in diff:
            print(f"{name}: {t}: {results['pristine'].get(t)} -> {results[name].get(t)}")
    if any(changed.values()):
        return 1
    print(f"\nsame outcome for all {len(results['pristine'])} tests at every step of the series")
    return 0


if __name__ == "__main__":
    sys.exit(main())
