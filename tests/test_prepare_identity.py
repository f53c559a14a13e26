"""A prep directory remembers what its sources pointed at, not only their specs: a changed reward
file, another checkpoint at the same path, a server now serving something else or a new reference
model is refused on resume with what changed; --dual.rescore scores the kept samples again."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from conftest import WORDS
from openrlhf_dual.artifacts import read_jsonl
from openrlhf_dual.launch import cpu_env
from openrlhf_dual.prep import PrepConfig, PrepError, open_manifest
from openrlhf_dual.scoring.identity import SLICE_BYTES, SLICES, model_identity, source_identity
from openrlhf_dual.tiny import build_tiny_lm, build_tokenizer

REWARD = '''
def reward_func(queries, prompts, labels, **kwargs):
    return {"rewards": [float(q[len(p):].count("w1")) for q, p in zip(queries, prompts)]}
'''
SAFETY = '''
def reward_func(queries, prompts, labels, **kwargs):
    return {"rewards": [float(len(q[len(p):].split())) for q, p in zip(queries, prompts)]}
'''
SAFETY_EDITED = '''
def reward_func(queries, prompts, labels, **kwargs):
    return {"rewards": [float(len(q[len(p):])) for q, p in zip(queries, prompts)]}  # characters, not words
'''


def config(prep: Path, ref: Path, reward: str, safety: str, **kw) -> PrepConfig:
    return PrepConfig(prep_dir=str(prep), ref_model=str(ref), prompt_dataset="unused.jsonl", reward=reward,
                      safety=(safety,), thresholds=(0.0,), **kw)  # fmt: skip


def with_scores(prep: Path) -> None:
    """What a half-finished prepare leaves: samples and one scored shard."""
    (prep / "samples").mkdir(exist_ok=True)
    (prep / "samples" / "shard-00000.jsonl").write_text('{"id": 0, "responses": []}\n')
    (prep / "scores").mkdir(exist_ok=True)
    np.save(prep / "scores" / "shard-00000.npy", np.zeros((1, 2, 2)))


def refused(cfg: PrepConfig, *expect: str) -> str:
    with pytest.raises(PrepError) as err:
        open_manifest(cfg)
    for text in expect:
        assert text in str(err.value), str(err.value)
    return str(err.value)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A tiny checkpoint directory (config, tokenizer, safetensors weights)."""
    tok = build_tokenizer(tmp_path / "ckpt", WORDS)
    build_tiny_lm(tmp_path / "ckpt", tok, seed=0)
    return tmp_path / "ckpt"


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path]:
    (tmp_path / "reward.py").write_text(REWARD)
    (tmp_path / "safety.py").write_text(SAFETY)
    return tmp_path / "reward.py", tmp_path / "safety.py"


def test_file_source_edited_is_refused_and_rescore_keeps_samples(checkpoint, files, tmp_path):
    reward, safety = files
    cfg = config(tmp_path / "prep", checkpoint, f"file:{reward}", f"file:{safety},sign=+1")
    open_manifest(cfg)
    with_scores(tmp_path / "prep")
    open_manifest(cfg)  # unchanged: resumes
    safety.write_text(SAFETY_EDITED)
    refused(cfg, f"source file:{safety},sign=+1 changed since it scored (sha256: ", "--dual.rescore")
    assert (tmp_path / "prep" / "scores" / "shard-00000.npy").exists()  # a refusal touches nothing
    open_manifest(config(tmp_path / "prep", checkpoint, f"file:{reward}", f"file:{safety},sign=+1", rescore=True))
    assert not list((tmp_path / "prep" / "scores").glob("*.npy"))
    assert (tmp_path / "prep" / "samples" / "shard-00000.jsonl").exists()
    open_manifest(cfg)  # the new identity is recorded: no refusal now


def test_another_spec_needs_rescore_and_keeps_samples(checkpoint, files, tmp_path):
    reward, safety = files
    cfg = config(tmp_path / "prep", checkpoint, f"file:{reward}", f"file:{safety},sign=+1")
    open_manifest(cfg)
    with_scores(tmp_path / "prep")
    other = config(tmp_path / "prep", checkpoint, f"file:{reward}", f"file:{safety},sign=-1")
    refused(other, "--dual.safety differs", "--dual.rescore")
    open_manifest(config(tmp_path / "prep", checkpoint, f"file:{reward}", f"file:{safety},sign=-1", rescore=True))
    assert not list((tmp_path / "prep" / "scores").glob("*.npy"))
    # inputs that decide the samples themselves: never, not even with --dual.rescore
    refused(config(tmp_path / "prep", checkpoint, f"file:{reward}", f"file:{safety},sign=-1", rescore=True, seed=1),
            "seed differ", "new --dual.prep_dir")  # fmt: skip


@pytest.mark.parametrize("kind", ["rm", "safe_rlhf", "policy"])
def test_another_checkpoint_at_the_same_path_is_refused(kind, checkpoint, files, tmp_path):
    """Retrained at the same shapes (same config, same safetensors header): the sampled bytes tell."""
    import torch
    from transformers import AutoModelForCausalLM

    reward, _ = files
    spec = f"{kind}:{checkpoint},sign=-1"
    cfg = config(tmp_path / "prep", tmp_path / "ref", spec, spec) if kind == "policy" else \
        config(tmp_path / "prep", tmp_path / "ref", f"file:{reward}", spec)  # fmt: skip
    build_tiny_lm(tmp_path / "ref", build_tokenizer(tmp_path / "ref", WORDS), seed=5)
    open_manifest(cfg)
    before = source_identity(spec, "safety")
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(checkpoint)
    after = source_identity(spec, "safety")
    assert before["config.json"] == after["config.json"]
    assert before["model.safetensors"].split(", sampled")[0] == after["model.safetensors"].split(", sampled")[0]
    refused(cfg, f"source {spec} changed since it scored (model.safetensors: ", "sampled")


def test_checkpoint_identity_sees_config_tokenizer_and_tensor_changes(checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    before = model_identity(str(checkpoint))
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    (checkpoint / "tokenizer_config.json").write_text((checkpoint / "tokenizer_config.json").read_text() + " ")
    tensors = load_file(checkpoint / "model.safetensors")
    save_file({**tensors, "extra.weight": torch.zeros(3)}, checkpoint / "model.safetensors")
    after = model_identity(str(checkpoint))
    assert {k for k in before if before[k] != after.get(k)} >= {"config.json", "tokenizer_config.json", "model.safetensors"}
    assert before["model.safetensors"].split(", header ")[1][:16] != after["model.safetensors"].split(", header ")[1][:16]


def test_large_weight_file_is_read_in_slices_and_any_slice_change_is_seen(tmp_path):
    big = tmp_path / "ckpt"
    big.mkdir()
    data = bytearray(np.random.default_rng(0).bytes(SLICES * SLICE_BYTES * 4))
    (big / "pytorch_model.bin").write_bytes(data)
    first = model_identity(str(big))["pytorch_model.bin"]
    data[-1] ^= 1  # the last slice always ends at the file's end
    (big / "pytorch_model.bin").write_bytes(data)
    assert model_identity(str(big))["pytorch_model.bin"] != first


def test_reference_model_replaced_is_refused_even_with_rescore(checkpoint, files, tmp_path):
    reward, safety = files
    cfg = config(tmp_path / "prep", checkpoint, f"file:{reward}", f"file:{safety},sign=+1", rescore=True)
    open_manifest(cfg)
    build_tiny_lm(checkpoint, build_tokenizer(checkpoint, WORDS), seed=1)
    refused(cfg, f"the reference model {checkpoint} changed since it drew the samples", "new --dual.prep_dir")


class _Identity(BaseHTTPRequestHandler):
    stated: dict | None = {"model": "a"}

    def do_GET(self):
        if self.path != "/identity" or self.stated is None:
            self.send_error(404)
            return
        body = json.dumps(self.stated).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_remote_source_identity_is_what_the_server_states(checkpoint, files, tmp_path, capfd):
    reward, _ = files
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Identity)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    spec = f"remote:http://127.0.0.1:{server.server_port}/get_reward,sign=+1"
    try:
        cfg = config(tmp_path / "prep", checkpoint, f"file:{reward}", spec)
        open_manifest(cfg)
        _Identity.stated = {"model": "b"}
        refused(cfg, f"source {spec} changed since it scored (stated.model: \"a\" -> \"b\")")
        _Identity.stated = None  # a server without /identity (OpenRLHF's serve_rm): said so, not refused silently
        cfg = config(tmp_path / "prep2", checkpoint, f"file:{reward}", spec)
        open_manifest(cfg)
        assert "states no identity" in capfd.readouterr().err
    finally:
        server.shutdown()
        server.server_close()
    refused(cfg, "does not answer", "cannot check what it serves")


def test_old_manifest_without_identity_is_recorded_not_refused(checkpoint, files, tmp_path, capfd):
    reward, safety = files
    cfg = config(tmp_path / "prep", checkpoint, f"file:{reward}", f"file:{safety},sign=+1")
    manifest = open_manifest(cfg)
    del manifest["identity"]
    (tmp_path / "prep" / "manifest.json").write_text(json.dumps(manifest))
    open_manifest(cfg)
    assert "records no source identities" in capfd.readouterr().err
    assert "identity" in json.loads((tmp_path / "prep" / "manifest.json").read_text())


def prepare(model: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "openrlhf_dual.cli.prepare",
        "--ref.model_name_or_path", str(model), "--data.prompt_dataset", str(root / "prompts.jsonl"),
        "--data.input_key", "question", "--data.apply_chat_template", "--data.max_samples", "4",
        "--rollout.n_samples_per_prompt", "4", "--rollout.max_new_tokens", "4", "--train.seed", "7",
        "--dual.reward", f"file:{root / 'reward.py'}", "--dual.safety", f"file:{root / 'safety.py'},sign=+1",
        "--dual.threshold", "0.0", "--dual.beta", "0.5", "--dual.shard_size", "2", "--dual.prep_dir", str(root / "prep"),
        *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_prepare_cli_refuses_an_edited_reward_file_on_resume_and_rescores(tiny_model_dir, files, tmp_path):
    """End to end: a half-finished prep directory (shard 1 unscored), the safety file edited, rerun:
    refused with the source and what changed, nothing written; --dual.rescore: every shard scored
    by the edited file, samples byte-identical."""
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"question": f"{WORDS[i]} {WORDS[i + 1]}"}) + "\n")
    first = prepare(tiny_model_dir, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    prep = tmp_path / "prep"
    (prep / "scores" / "shard-00001.npy").unlink()  # interrupted before shard 1 was scored
    samples = {p.name: p.read_bytes() for p in (prep / "samples").iterdir()}
    (tmp_path / "safety.py").write_text(SAFETY_EDITED)
    second = prepare(tiny_model_dir, tmp_path)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"source file:{tmp_path / 'safety.py'},sign=+1 changed since it scored (sha256: " in second.stderr
    assert not (prep / "scores" / "shard-00001.npy").exists()
    third = prepare(tiny_model_dir, tmp_path, "--dual.rescore")
    assert third.returncode == 0, third.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in (prep / "samples").iterdir()} == samples
    texts = [x["text"] for s in (0, 1) for r in read_jsonl(prep / "samples" / f"shard-{s:05d}.jsonl") for x in r["responses"]]
    scores = np.concatenate([np.load(prep / "scores" / f"shard-{s:05d}.npy") for s in (0, 1)])
    np.testing.assert_array_equal(scores[..., 1].reshape(-1), [float(len(t)) for t in texts])
    assert any(len(t) != len(t.split()) for t in texts)  # the edit shows in the scores


def test_ppo_reward_refuses_a_source_changed_since_prepare(checkpoint, files, tmp_path):
    """The PPO reward (reward file, server, train_ppo_ray's --dual.prep_dir) checks the same
    identities at start-up: r + lambda*.g with a changed source is not what lambda* was solved for."""
    from openrlhf_dual.artifacts import write_json
    from openrlhf_dual.ppo_reward import CombinedReward

    reward, safety = files
    cfg = config(tmp_path / "prep", checkpoint, f"file:{reward}", f"file:{safety},sign=+1")
    open_manifest(cfg)
    write_json(tmp_path / "prep" / "dual.json", {"form": "model", "lam": [0.5]})
    inputs, lam = CombinedReward.check_prep_dir(tmp_path / "prep")
    assert lam.tolist() == [0.5] and inputs["safety"] == [f"file:{safety},sign=+1"]
    safety.write_text(SAFETY_EDITED)
    with pytest.raises(ValueError, match=r"source file:.*safety.py,sign=\+1 changed since prepare scored with it \(sha256: "):
        CombinedReward.check_prep_dir(tmp_path / "prep")
    safety.write_text(SAFETY)  # restored: accepted again
    assert CombinedReward.check_prep_dir(tmp_path / "prep")[1].tolist() == [0.5]
