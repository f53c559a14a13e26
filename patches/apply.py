"""Apply patches/*.patch to an OpenRLHF tree, idempotently.

    python patches/apply.py                 # the openrlhf package installed in this interpreter
    python patches/apply.py --target DIR    # DIR holds openrlhf/ (a checkout or site-packages)
    python patches/apply.py --tests DIR     # also write the patches' upstream tests into DIR/tests
    python patches/apply.py --check         # report the state, change nothing

Each patch has two parts, applied separately: its `openrlhf/` part (the change) goes to the target,
its `tests/` part (the unit tests it is sent upstream with, new files in OpenRLHF's tests/ layout)
goes only where --tests says, never into the target unless --tests names it (an installed package
must not grow a top-level tests/ in site-packages). Run them with `pytest DIR/tests`: they import
the installed, patched `openrlhf`.

The patches are a series: the tree must be pristine OpenRLHF 0.11.2 with the first k of them
applied, for some k (checked on a copy, each judged with the later ones undone, since a later patch
may edit lines next to an earlier one's); the rest are then applied in order. Anything else
(half-applied, another OpenRLHF version, stale tests) is a clear error and nothing is written.
Stdlib only: it runs before this package is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PATCH_DIR = Path(__file__).resolve().parent
PARTS = ("openrlhf", "tests")  # top-level directories a patch may touch


class PatchError(RuntimeError):
    pass


def installed_root() -> Path:
    """The directory that contains the installed `openrlhf` package (found without importing it)."""
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        raise PatchError("openrlhf is not installed in this interpreter; install openrlhf==0.11.2 first")
    return Path(list(spec.submodule_search_locations)[0]).parent


def touched_files(patch: Path) -> list[str]:
    """Paths (relative to the OpenRLHF root) that `patch` changes or creates."""
    return [line.split(" b/", 1)[1] for line in patch.read_text().splitlines() if line.startswith("diff --git ")]


def parts_of(patch: Path) -> list[str]:
    """The top-level directories `patch` touches, in PARTS order; anything else is an error."""
    tops = {f.split("/", 1)[0] for f in touched_files(patch)}
    if not tops <= set(PARTS) or "openrlhf" not in tops:
        raise PatchError(f"{patch.name} must change openrlhf/ and may add tests/, nothing else: it touches {sorted(tops)}")
    return [p for p in PARTS if p in tops]


def _git_apply(root: Path, patch: Path, part: str, *args: str) -> bool:
    # The ceiling stops git from treating an enclosing repository (a venv inside a checkout) as ours.
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(root.parent))
    proc = subprocess.run(
        ["git", "apply", "--whitespace=nowarn", f"--include={part}/*", *args, str(patch)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0


def _copy_files(src: Path, dst: Path, files: list[str]) -> None:
    for f in files:
        if (src / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / f, dst / f)


def _series_fits(root: Path, patches: list[Path], part: str, files: list[str], k: int) -> bool:
    """Whether the tree at `root` is the pristine one with exactly the first k patches applied: on a
    copy, the first k reverse (last first) and the rest apply, one after another."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "tree"
        copy.mkdir()
        _copy_files(root, copy, files)
        for patch in reversed(patches[:k]):
            if not _git_apply(copy, patch, part, "--reverse"):
                return False
        _copy_files(root, copy, files)  # back to the tree as it is, then forward with the rest
        return all(_git_apply(copy, patch, part) for patch in patches[k:])


def applied_count(root: Path, patches: list[Path], part: str = "openrlhf") -> int | None:
    """How many of `patches` (a series, in order) the tree at `root` has applied, or None when it is
    no prefix of the series (half-patched, another OpenRLHF version, stale tests). Later patches may
    edit lines next to earlier ones, so each is judged with the ones after it undone."""
    patches = [p for p in patches if part in parts_of(p)]
    files = sorted({f for p in patches for f in touched_files(p) if f.startswith(part + "/")})
    for k in range(len(patches), -1, -1):
        if _series_fits(root, patches, part, files, k):
            return k
    return None


MISMATCH = {
    "openrlhf": "it is not OpenRLHF 0.11.2 with some of them applied in order (half-patched, or another version). "
    "Reinstall openrlhf==0.11.2 (pip install --force-reinstall --no-deps openrlhf==0.11.2) and run this again.",
    "tests": "its test files differ from the patches' (stale from older patches?). Remove that tests/ directory "
    "and run this again.",
}


def apply_all(target: Path, check_only: bool = False, tests: Path | None = None) -> list[tuple[str, str]]:
    """Apply the patches in order: their openrlhf/ parts to `target`, their tests/ parts to `tests`
    when given. Returns (patch name, what happened) pairs, a tests/ part's named 'NAME [tests]'.
    Checks before writing: a tree that is no prefix of the series is an error, nothing written."""
    if not (target / "openrlhf").is_dir():
        raise PatchError(f"{target} has no openrlhf/ directory")
    patches = sorted(PATCH_DIR.glob("*.patch"))
    done = []
    for part, root in (("openrlhf", target), ("tests", tests)):
        if root is None:
            continue
        series = [p for p in patches if part in parts_of(p)]
        if part == "tests" and not check_only:
            root.mkdir(parents=True, exist_ok=True)
        k = applied_count(root, series, part) if root.is_dir() else 0
        if k is None:
            raise PatchError(f"patches/ do not fit {root}: {MISMATCH[part]}")
        for i, patch in enumerate(series):
            name = patch.name if part == "openrlhf" else f"{patch.name} [tests]"
            if i < k:
                what = "already applied"
            elif check_only:
                what = "pristine"
            elif _git_apply(root, patch, part):
                what = "applied now"
            else:
                raise PatchError(f"{name}: git apply failed after a clean check in {root}")
            done.append((name, what))
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=None, help="directory containing openrlhf/")
    parser.add_argument("--tests", type=Path, default=None, help="write the patches' upstream tests into DIR/tests")
    parser.add_argument("--check", action="store_true", help="report each patch's state, change nothing")
    args = parser.parse_args(argv)
    try:
        target = (args.target or installed_root()).resolve()
        tests = args.tests.resolve() if args.tests is not None else None
        for name, what in apply_all(target, check_only=args.check, tests=tests):
            print(f"{name}: {what} ({tests if name.endswith('[tests]') else target})")
    except PatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
