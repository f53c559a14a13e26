"""patches/ applies to pristine OpenRLHF 0.11.2, is idempotent, and refuses a half-patched tree."""

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


def touched_files(patch: Path) -> list[str]:
    return [line.split(" b/", 1)[1] for line in patch.read_text().splitlines() if line.startswith("diff --git ")]


def record_hashes() -> dict[str, str]:
    """sha256 (wheel RECORD encoding) of every file of the installed openrlhf 0.11.2 wheel."""
    dist = importlib.metadata.distribution("openrlhf")
    assert dist.version == "0.11.2"
    return {str(f): f.hash.value for f in dist.files if f.hash is not None}


def wheel_hash(path: Path) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()


def tree_hashes(root: Path, files: list[str]) -> dict[str, str]:
    return {f: wheel_hash(root / f) for f in files}


@pytest.fixture()
def pristine_tree(tmp_path) -> Path:
    """A copy of the installed (patched) openrlhf with every patch reversed, checked byte for byte
    against the wheel's RECORD: i.e. pristine OpenRLHF 0.11.2 files."""
    shutil.copytree(patcher.installed_root() / "openrlhf", tmp_path / "openrlhf")
    for patch in reversed(PATCHES):
        assert patcher.state(tmp_path, patch) == "applied"
        subprocess.run(["git", "apply", "--reverse", str(patch)], cwd=tmp_path, check=True,
                       env={"GIT_CEILING_DIRECTORIES": str(tmp_path.parent), "PATH": "/usr/bin:/bin"})
    record = record_hashes()
    for patch in PATCHES:
        for f in touched_files(patch):
            assert wheel_hash(tmp_path / f) == record[f], f"{f} is not the 0.11.2 wheel's file"
    return tmp_path


def test_patches_exist_and_are_format_patch():
    assert PATCHES, "no patches/*.patch"
    for patch in PATCHES:
        text = patch.read_text()
        assert text.startswith("From "), f"{patch.name} is not git format-patch output"
        assert "Subject: [PATCH]" in text


def test_patch_applies_to_pristine_0_11_2(pristine_tree):
    files = [f for p in PATCHES for f in touched_files(p)]
    assert [s for _, s in patcher.apply_all(pristine_tree)] == ["applied now"] * len(PATCHES)
    installed = patcher.installed_root()
    assert tree_hashes(pristine_tree, files) == tree_hashes(installed, files)
    # A second run changes nothing.
    assert [s for _, s in patcher.apply_all(pristine_tree)] == ["already applied"] * len(PATCHES)
    assert tree_hashes(pristine_tree, files) == tree_hashes(installed, files)


def test_half_patched_tree_is_a_clear_error_and_untouched(pristine_tree):
    patch = PATCHES[0]
    patcher.apply_all(pristine_tree)
    files = touched_files(patch)
    # Undo the patch in one file only: half-patched.
    subprocess.run(["git", "apply", "--reverse", "--include", files[0], str(patch)], cwd=pristine_tree, check=True,
                   env={"GIT_CEILING_DIRECTORIES": str(pristine_tree.parent), "PATH": "/usr/bin:/bin"})
    before = tree_hashes(pristine_tree, files)
    with pytest.raises(patcher.PatchError, match="half-patched or is not OpenRLHF 0.11.2"):
        patcher.apply_all(pristine_tree)
    assert tree_hashes(pristine_tree, files) == before
    proc = subprocess.run([sys.executable, str(ROOT / "patches" / "apply.py"), "--target", str(pristine_tree)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "error:" in proc.stderr


def test_make_install_again_is_a_no_op():
    """With the environment already set up, `make install` only confirms the patches."""
    site = patcher.installed_root()
    files = [f for p in PATCHES for f in touched_files(p)]
    before = {f: (site / f).stat().st_mtime_ns for f in files}
    proc = subprocess.run(["make", "-s", "install"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("already applied") == len(PATCHES), proc.stdout
    assert "pip" not in proc.stdout + proc.stderr, "a second make install reinstalled packages"
    assert {f: (site / f).stat().st_mtime_ns for f in files} == before
