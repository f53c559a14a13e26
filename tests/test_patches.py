"""patches/ applies to pristine OpenRLHF 0.11.2 as a series, is idempotent, refuses a half-patched
tree, and keeps each patch's upstream tests out of the package."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "patches"))
import apply as patcher  # noqa: E402  (patches/apply.py: stdlib-only, not part of the package)

PATCHES = sorted((ROOT / "patches").glob("*.patch"))
GIT_ENV = {"PATH": "/usr/bin:/bin"}


def package_files(patch: Path) -> list[str]:
    return [f for f in patcher.touched_files(patch) if f.startswith("openrlhf/")]


def upstream_test_files(patch: Path) -> list[str]:
    return [f for f in patcher.touched_files(patch) if f.startswith("tests/")]


def record_hashes() -> dict[str, str]:
    """sha256 (wheel RECORD encoding) of every file of the installed openrlhf 0.11.2 wheel."""
    dist = importlib.metadata.distribution("openrlhf")
    assert dist.version == "0.11.2"
    return {str(f): f.hash.value for f in dist.files if f.hash is not None}


def wheel_hash(path: Path) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()


def tree_hashes(root: Path, files: list[str]) -> dict[str, str]:
    return {f: wheel_hash(root / f) for f in files}


def git_apply(root: Path, patch: Path, *args: str, include: str = "openrlhf/*") -> None:
    subprocess.run(["git", "apply", f"--include={include}", *args, str(patch)], cwd=root, check=True,
                   env={**GIT_ENV, "GIT_CEILING_DIRECTORIES": str(root.parent)})  # fmt: skip


@pytest.fixture()
def pristine_tree(tmp_path) -> Path:
    """A copy of the installed (patched) openrlhf with every patch reversed, last first, checked
    byte for byte against the wheel's RECORD: i.e. pristine OpenRLHF 0.11.2 files."""
    tree = tmp_path / "site"
    shutil.copytree(patcher.installed_root() / "openrlhf", tree / "openrlhf")
    for patch in reversed(PATCHES):
        git_apply(tree, patch, "--reverse")
    record = record_hashes()
    for patch in PATCHES:
        for f in package_files(patch):
            assert wheel_hash(tree / f) == record[f], f"{f} is not the 0.11.2 wheel's file"
    return tree


def test_patches_exist_and_are_format_patch():
    assert PATCHES, "no patches/*.patch"
    for patch in PATCHES:
        text = patch.read_text()
        assert text.startswith("From "), f"{patch.name} is not git format-patch output"
        assert "Subject: [PATCH]" in text
        assert patcher.parts_of(patch)[0] == "openrlhf"


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name[:4])
def test_every_patch_carries_its_upstream_tests(patch):
    """Each patch adds unit tests in OpenRLHF's tests/ layout, as new files: apply.py writes them
    into a directory of their own (--tests), which holds none of OpenRLHF's own test files to edit."""
    files = upstream_test_files(patch)
    assert files and all(f.startswith("tests/test_") and f.endswith(".py") for f in files), files
    text = patch.read_text()
    for f in files:
        assert f"diff --git a/{f} b/{f}\nnew file mode" in text, f"{f} must be a new file"


def test_series_applies_to_pristine_0_11_2(pristine_tree, tmp_path):
    files = [f for p in PATCHES for f in package_files(p)]
    tests = tmp_path / "upstream"
    done = patcher.apply_all(pristine_tree, tests=tests)
    assert [s for _, s in done] == ["applied now"] * len(done)
    installed = patcher.installed_root()
    assert tree_hashes(pristine_tree, files) == tree_hashes(installed, files)
    # The tests/ parts went to the tests directory only, never next to the package.
    assert not (pristine_tree / "tests").exists()
    written = sorted(str(p.relative_to(tests)) for p in tests.rglob("*.py"))
    assert written == sorted(f for p in PATCHES for f in upstream_test_files(p))
    # A second run changes nothing.
    assert {s for _, s in patcher.apply_all(pristine_tree, tests=tests)} == {"already applied"}
    assert tree_hashes(pristine_tree, files) == tree_hashes(installed, files)


def test_partly_patched_tree_gets_the_rest(pristine_tree):
    """A tree with the first patches applied (an older openrlhf-dual's install) gets the rest, even
    where a later patch edits lines next to an earlier one's."""
    git_apply(pristine_tree, PATCHES[0])
    done = patcher.apply_all(pristine_tree)
    assert [s for _, s in done] == ["already applied"] + ["applied now"] * (len(PATCHES) - 1)
    files = [f for p in PATCHES for f in package_files(p)]
    assert tree_hashes(pristine_tree, files) == tree_hashes(patcher.installed_root(), files)


def test_half_patched_tree_is_a_clear_error_and_untouched(pristine_tree):
    patcher.apply_all(pristine_tree)
    later = {f for p in PATCHES[1:] for f in package_files(p)}
    only_first = [f for f in package_files(PATCHES[0]) if f not in later]
    # Undo the first patch in one file only: half-patched.
    git_apply(pristine_tree, PATCHES[0], "--reverse", include=only_first[0])
    files = [f for p in PATCHES for f in package_files(p)]
    before = tree_hashes(pristine_tree, files)
    with pytest.raises(patcher.PatchError, match="half-patched"):
        patcher.apply_all(pristine_tree)
    assert tree_hashes(pristine_tree, files) == before
    proc = subprocess.run([sys.executable, str(ROOT / "patches" / "apply.py"), "--target", str(pristine_tree)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 1 and "error:" in proc.stderr


def test_stale_upstream_tests_are_a_clear_error(pristine_tree, tmp_path):
    tests = tmp_path / "upstream"
    patcher.apply_all(pristine_tree, tests=tests)
    stale = tests / upstream_test_files(PATCHES[0])[0]
    stale.write_text(stale.read_text() + "\n# edited\n")
    with pytest.raises(patcher.PatchError, match="stale"):
        patcher.apply_all(pristine_tree, tests=tests)


def test_make_install_again_is_a_no_op():
    """With the environment already set up, `make install` only confirms the patches."""
    site = patcher.installed_root()
    files = [f for p in PATCHES for f in package_files(p)]
    before = {f: (site / f).stat().st_mtime_ns for f in files}
    proc = subprocess.run(["make", "-s", "install"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("already applied") == len(PATCHES), proc.stdout
    assert "pip" not in proc.stdout + proc.stderr, "a second make install reinstalled packages"
    assert {f: (site / f).stat().st_mtime_ns for f in files} == before
