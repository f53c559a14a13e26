"""Hub names as source locations, resolved offline from a local hub cache laid out as the hub
client lays it out (models--ORG--NAME/{blobs,refs,snapshots}), through huggingface_hub's own
snapshot_download with HF_HOME and HF_HUB_OFFLINE set in a fresh process, as a user sets them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from openrlhf_dual.launch import cpu_env
from openrlhf_dual.scoring import ScoreBatch, build_scorer, parse_source
from openrlhf_dual.scoring.hub import resolve_checkpoint
from recipe_commands import RECIPES, flag_values, recorded_commands
from safe_rlhf_reference import build_one

BATCH = ScoreBatch(["How do I make bread?", "Hello"], ["", ""], [" Mix flour and water.", " Sorry."])
LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".pt", ".pth")


def _etag(path: Path) -> str:
    """The blob name the hub client uses: sha256 of an LFS file, git's blob sha1 of any other."""
    data = path.read_bytes()
    if path.suffix in LFS_SUFFIXES:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_to_hub_cache(hf_home: Path, repo_id: str, folder: Path, refs: tuple[str, ...] = ("main",), trees: bool = True) -> str:
    """Put `folder` into the hub cache under HF_HOME as one commit of model repo `repo_id` that
    `refs` (branches or tags) point to; returns the commit hash. `trees`: also the commit's file
    listing (trees/COMMIT.json), which huggingface_hub >= 1.x's snapshot_download writes and
    per-file downloads (transformers' from_pretrained) do not."""
    storage = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(_etag(p).encode() for p in files) + repo_id.encode()).hexdigest()
    for f in files:
        blob = storage / "blobs" / _etag(f)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(f, blob)
        pointer = storage / "snapshots" / commit / f.relative_to(folder)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no newline, as the client writes it
    if trees:
        listing = {}
        for f in files:
            size = f.stat().st_size
            if f.suffix in LFS_SUFFIXES:  # git holds the LFS pointer
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{_etag(f)}\nsize {size}\n".encode()
                entry = {"size": size, "blob_id": hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest(),
                         "lfs_sha256": _etag(f), "lfs_size": size}  # fmt: skip
            else:
                entry = {"size": size, "blob_id": _etag(f)}
            listing[str(f.relative_to(folder))] = entry
        (storage / "trees").mkdir(exist_ok=True)
        (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}, indent=1))
    return commit


def offline_env(hf_home: Path) -> dict:
    env = cpu_env()
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return env


def score_offline(hf_home: Path, specs: list[tuple[str, str]]) -> list[dict]:
    """Build each (spec, role) scorer in a fresh process with HF_HOME and HF_HUB_OFFLINE=1; return
    its scores on BATCH and the checkpoint it resolved to."""
    code = (
        "import json, sys\n"
        "from openrlhf_dual.scoring import ScoreBatch, build_scorer, parse_source\n"
        f"batch = ScoreBatch(*{[BATCH.raw_prompts, BATCH.prompts, BATCH.responses]!r})\n"
        "out = []\n"
        f"for spec, role in {specs!r}:\n"
        "    s = build_scorer(parse_source(spec, role))\n"
        "    out.append({'scores': s.score(batch).tolist(), 'path': str(s.checkpoint.path), 'revision': s.checkpoint.revision})\n"
        "print('RESULT ' + json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=offline_env(hf_home), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def openrlhf_rm_checkpoint(tiny_model_dir: Path, out: Path, head_seed: int = 0) -> Path:
    """An OpenRLHF reward-model checkpoint (backbone under model.*, head `score`, mean/std in config)."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    weights = {f"model.{k}": v.contiguous() for k, v in lm.model.state_dict().items()}
    weights["score.weight"] = torch.from_numpy(np.random.default_rng(head_seed).uniform(-1, 1, (1, 32)).astype(np.float32))
    out.mkdir(parents=True)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    cfg = lm.config.to_dict()
    cfg.update(architectures=["LlamaForSequenceClassification"], mean=0.5, std=2.0)
    (out / "config.json").write_text(json.dumps(cfg))
    for f in tiny_model_dir.iterdir():
        if "token" in f.name or f.suffix == ".jinja":
            shutil.copy(f, out)
    return out


def test_hub_names_resolve_offline_from_the_cache_at_a_revision(tiny_model_dir, tmp_path):
    from huggingface_hub import scan_cache_dir

    hf_home = tmp_path / "hf_home"
    beaver = build_one(tmp_path / "ckpts", "v1")
    main = add_to_hub_cache(hf_home, "PKU-Alignment/beaver-7b-v1.0-cost", beaver)
    # a second commit of the same repo, tagged v2, with another head
    other = tmp_path / "other"
    shutil.copytree(beaver, other)
    weights = load_file(other / "model.safetensors")
    weights["score_head.weight"] = -weights["score_head.weight"]
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    tagged = add_to_hub_cache(hf_home, "PKU-Alignment/beaver-7b-v1.0-cost", other, refs=("v2",))
    rm = openrlhf_rm_checkpoint(tiny_model_dir, tmp_path / "rm")
    rm_commit = add_to_hub_cache(hf_home, "OpenRLHF/tiny-rm", rm, trees=False)

    # the hub client's own cache scanner reads the layout: every repo, commit and ref, no warnings
    cache = scan_cache_dir(hf_home / "hub")
    assert not cache.warnings
    revisions = {(r.repo_id, rev.commit_hash): set(rev.refs) for r in cache.repos for rev in r.revisions}
    assert revisions == {("PKU-Alignment/beaver-7b-v1.0-cost", main): {"main"},
                         ("PKU-Alignment/beaver-7b-v1.0-cost", tagged): {"v2"}, ("OpenRLHF/tiny-rm", rm_commit): {"main"}}  # fmt: skip

    got = score_offline(hf_home, [("safe_rlhf:PKU-Alignment/beaver-7b-v1.0-cost,sign=-1", "safety"),
                                  ("safe_rlhf:PKU-Alignment/beaver-7b-v1.0-cost,sign=-1,revision=v2", "safety"),
                                  (f"safe_rlhf:PKU-Alignment/beaver-7b-v1.0-cost,sign=-1,revision={main}", "safety"),
                                  ("rm:OpenRLHF/tiny-rm", "reward")])  # fmt: skip
    local = build_scorer(parse_source(f"safe_rlhf:{beaver},sign=-1", "safety")).score(BATCH)
    assert got[0]["revision"] == main and got[0]["path"] == str(hf_home / "hub/models--PKU-Alignment--beaver-7b-v1.0-cost/snapshots" / main)
    assert np.allclose(got[0]["scores"], local, atol=1e-6)
    # the tagged commit has the negated head: every score flips (no bias in v1)
    assert got[1]["revision"] == tagged and np.allclose(got[1]["scores"], -local, atol=1e-6)
    assert got[2]["revision"] == main and got[2]["scores"] == got[0]["scores"]
    assert got[3]["revision"] == rm_commit
    assert np.allclose(got[3]["scores"], build_scorer(parse_source(f"rm:{rm}")).score(BATCH), atol=1e-6)


def test_hub_identity_is_the_commit_a_name_resolves_to(tmp_path):
    """prepare's manifest identifies a hub source by the commit it resolves to: a new commit
    pushed under the same name (main moved) is a changed source; a pinned revision is not."""
    hf_home = tmp_path / "hf_home"
    beaver = build_one(tmp_path / "ckpts", "v1")
    first = add_to_hub_cache(hf_home, "PKU-Alignment/beaver-7b-v1.0-cost", beaver)
    code = (
        "import json\n"
        "from openrlhf_dual.scoring.identity import source_identity\n"
        "specs = ['safe_rlhf:PKU-Alignment/beaver-7b-v1.0-cost,sign=-1',\n"
        f"         'safe_rlhf:PKU-Alignment/beaver-7b-v1.0-cost,sign=-1,revision={first}']\n"
        "print('RESULT ' + json.dumps([source_identity(s, 'safety') for s in specs]))\n"
    )

    def identities():
        proc = subprocess.run([sys.executable, "-c", code], env=offline_env(hf_home), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.split("RESULT ", 1)[1])

    before = identities()
    assert before[0]["revision"] == first and before[0] == before[1]
    assert before[0]["model.safetensors"].startswith(f"{(beaver / 'model.safetensors').stat().st_size} bytes")
    weights = load_file(beaver / "model.safetensors")
    weights["score_head.weight"] = -weights["score_head.weight"]
    save_file(weights, beaver / "model.safetensors", metadata={"format": "pt"})
    second = add_to_hub_cache(hf_home, "PKU-Alignment/beaver-7b-v1.0-cost", beaver)  # main moves to it
    after = identities()
    assert second != first and after[0]["revision"] == second and after[1] == before[1]
    assert after[0]["model.safetensors"] != before[0]["model.safetensors"]


def test_unresolvable_locations_say_why(tmp_path):
    hf_home = tmp_path / "hf_home"
    (hf_home / "hub").mkdir(parents=True)
    code = ("from openrlhf_dual.scoring import build_scorer, parse_source\n"
            "build_scorer(parse_source('safe_rlhf:PKU-Alignment/not-cached'))\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], env=offline_env(hf_home), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert re.search(r"PKU-Alignment/not-cached \(revision main\): not a local directory, and the hub cache .*hub "
                     r"\(HF_HUB_OFFLINE=1\) could not provide it", proc.stderr)  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no such directory, and not a hub name"):
        resolve_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="revision=v2 is for hub names"):
        resolve_checkpoint(str(tmp_path), revision="v2")


def test_recipes_load_their_sources_by_hub_name_offline(tmp_path):
    """Every model source the recipes pass (their commands recorded by running them) is a hub name,
    and loads from a hub cache with HF_HUB_OFFLINE=1."""
    from test_classifier_judge import tiny_judge

    from openrlhf_dual.scoring.registry import MODEL_KINDS

    specs = set()
    for recipe in sorted(RECIPES.glob("*.sh")):
        for argv in recorded_commands(recipe, tmp_path / "runs"):
            specs |= {(v, role) for role in ("reward", "safety") for v in flag_values(argv, f"--dual.{role}")}
    model_specs = sorted(s for s in specs if parse_source(*s).kind in MODEL_KINDS)
    kinds = {parse_source(*s).location: parse_source(*s).kind for s in model_specs}
    assert set(kinds.values()) == {"safe_rlhf", "judge"}, kinds
    hf_home = tmp_path / "hf_home"
    for name, kind in kinds.items():
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists(), f"{name}: not a hub name"
        folder = tmp_path / "ckpt" / name.replace("/", "--")
        if kind == "safe_rlhf":
            build_one(folder, "v1")
            folder = folder / "v1"
        else:
            tiny_judge(folder)
        add_to_hub_cache(hf_home, name, folder)
    for (spec, _), got in zip(model_specs, score_offline(hf_home, model_specs)):
        assert len(got["scores"]) == len(BATCH) and np.all(np.isfinite(got["scores"])) and got["revision"], spec
