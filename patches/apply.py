"""Apply patches/*.patch to an OpenRLHF tree, idempotently.

    python patches/apply.py                 # the openrlhf package installed in this interpreter
    python patches/apply.py --target DIR    # DIR holds openrlhf/ (a checkout or site-packages)
    python patches/apply.py --check         # report the state, change nothing

Each patch is in one of three states: pristine (applies cleanly: it is applied), applied
(reverses cleanly: nothing to do), or neither (half-applied or another OpenRLHF version: a clear
error, nothing written). Stdlib only: it runs before this package is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

PATCH_DIR = Path(__file__).resolve().parent


class PatchError(RuntimeError):
    pass


def installed_root() -> Path:
    """The directory that contains the installed `openrlhf` package (found without importing it)."""
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        raise PatchError("openrlhf is not installed in this interpreter; install openrlhf==0.11.2 first")
    return Path(list(spec.submodule_search_locations)[0]).parent


def _git_apply(target: Path, patch: Path, *args: str) -> bool:
    # The ceiling stops git from treating an enclosing repository (a venv inside a checkout) as ours.
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(target.parent))
    proc = subprocess.run(
        ["git", "apply", "--whitespace=nowarn", *args, str(patch)],
        cwd=target,
        env=env,
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0


def state(target: Path, patch: Path) -> str:
    """'pristine', 'applied' or 'mismatch' for one patch against the tree at `target`."""
    if _git_apply(target, patch, "--check"):
        return "pristine"
    if _git_apply(target, patch, "--check", "--reverse"):
        return "applied"
    return "mismatch"


def apply_all(target: Path, check_only: bool = False) -> list[tuple[str, str]]:
    """Apply every patch in order; returns (patch name, what happened) pairs."""
    if not (target / "openrlhf").is_dir():
        raise PatchError(f"{target} has no openrlhf/ directory")
    done = []
    for patch in sorted(PATCH_DIR.glob("*.patch")):
        st = state(target, patch)
        if st == "mismatch":
            raise PatchError(
                f"{patch.name} neither applies nor reverses cleanly in {target}: the tree is half-patched "
                "or is not OpenRLHF 0.11.2. Reinstall openrlhf==0.11.2 (pip install --force-reinstall "
                "--no-deps openrlhf==0.11.2) and run this again."
            )
        if st == "pristine" and not check_only:
            if not _git_apply(target, patch):
                raise PatchError(f"{patch.name}: git apply failed after a clean --check in {target}")
            st = "applied now"
        elif st == "applied":
            st = "already applied"
        done.append((patch.name, st))
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=None, help="directory containing openrlhf/")
    parser.add_argument("--check", action="store_true", help="report each patch's state, change nothing")
    args = parser.parse_args(argv)
    try:
        target = (args.target or installed_root()).resolve()
        for name, what in apply_all(target, check_only=args.check):
            print(f"{name}: {what} ({target})")
    except PatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
