"""Score sources against direct model calls, and the loader traps of SCORING.md."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import torchrun
from openrlhf_dual.launch import cpu_env, free_port
from openrlhf_dual.scoring import ScoreBatch, build_scorer, parse_source
from openrlhf_dual.scoring.safe_rlhf import normaliser

BATCH = ScoreBatch(
    raw_prompts=["w1 w2", "w3 w4 w5", "w6"],
    prompts=["user : w1 w2 assistant : ", "user : w3 w4 w5 assistant : ", "user : w6 assistant : "],
    responses=["good fine kind", "bad harm", "w7 w8 w9 w10 good"],
)


@pytest.fixture(scope="module")
def trained_rm(tiny_model_dir, dpo_dataset_dir, tmp_path_factory) -> Path:
    """A reward model trained by the real `openrlhf.cli.train_rm` (a few steps; its evaluation
    writes mean/std into config.json)."""
    out = tmp_path_factory.mktemp("rm")
    torchrun(
        "openrlhf.cli.train_rm",
        ["--model.model_name_or_path", str(tiny_model_dir), "--data.dataset", str(dpo_dataset_dir),
         "--eval.dataset", str(dpo_dataset_dir), "--data.prompt_key", "prompt", "--data.max_len", "64",
         "--ds.attn_implementation", "eager", "--ds.zero_stage", "0", "--train.micro_batch_size", "8",
         "--train.batch_size", "16", "--train.max_epochs", "1", "--adam.lr", "1e-3", "--ckpt.output_dir", str(out)],
        nproc=1, cwd=out,
    )  # fmt: skip
    return out


def direct_rm_scores(path: Path, queries: list[str], normalize: bool, fp32: bool = False) -> np.ndarray:
    """OpenRLHF's own loader (bf16, the dtype train_rm saves) and forward, fed like serve_rm, with
    mean/std set from config.json; `fp32`: the bf16 weights computed in float32."""
    from openrlhf.models import get_llm_for_sequence_regression
    from transformers import AutoTokenizer

    model = get_llm_for_sequence_regression(str(path), "reward", normalize_reward=normalize,
                                            attn_implementation="eager").eval()  # fmt: skip
    model = model.float() if fp32 else model
    cfg = json.loads((path / "config.json").read_text())
    model.mean.fill_(cfg["mean"])
    model.std.fill_(cfg["std"])
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    enc = tok(queries, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(enc["input_ids"], enc["attention_mask"]).double().numpy()


@pytest.mark.slow
def test_openrlhf_rm_checkpoint_matches_direct_calls_and_restores_normalisation(trained_rm):
    cfg = json.loads((trained_rm / "config.json").read_text())
    assert "mean" in cfg and "std" in cfg and cfg["std"] > 0
    assert load_file(trained_rm / "model.safetensors")["score.weight"].dtype == torch.bfloat16
    ours = build_scorer(parse_source(f"rm:{trained_rm}")).score(BATCH)  # the checkpoint's dtype: bf16
    assert build_scorer(parse_source(f"rm:{trained_rm}")).inner.model.dtype == torch.bfloat16
    assert np.allclose(ours, direct_rm_scores(trained_rm, BATCH.queries, True), atol=1e-5)
    fp32 = build_scorer(parse_source(f"rm:{trained_rm},dtype=float32")).score(BATCH)
    assert np.allclose(fp32, direct_rm_scores(trained_rm, BATCH.queries, True, fp32=True), atol=1e-5)
    raw = build_scorer(parse_source(f"rm:{trained_rm},normalize=false,dtype=float32")).score(BATCH)
    assert np.allclose(fp32, (raw - cfg["mean"]) / cfg["std"], atol=1e-5)

    # The trap exists: OpenRLHF's loader alone leaves the buffers at something other than config.json's.
    from openrlhf.models import get_llm_for_sequence_regression

    plain = get_llm_for_sequence_regression(str(trained_rm), "reward", normalize_reward=True, attn_implementation="eager")
    assert not (plain.mean.item() == pytest.approx(cfg["mean"]) and plain.std.item() == pytest.approx(cfg["std"]))


@pytest.mark.slow
def test_rm_with_a_renamed_head_fails_loudly(trained_rm, tmp_path):
    broken = tmp_path / "renamed"
    shutil.copytree(trained_rm, broken)
    weights = load_file(broken / "model.safetensors")
    weights["value_head.weight"] = weights.pop("score.weight")
    save_file(weights, broken / "model.safetensors")
    with pytest.raises(ValueError, match="no reward head 'score.weight'.*value_head"):
        build_scorer(parse_source(f"rm:{broken}"))


@pytest.fixture(scope="module")
def serve_rm_url(trained_rm, tmp_path_factory):
    """The real `openrlhf.cli.serve_rm` on loopback serving the trained RM (bf16, raw scores:
    --reward.normalize_enable would use the uninitialised buffers of the loader trap)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    port, log_path = free_port(), tmp_path_factory.mktemp("serve_rm") / "serve_rm.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "openrlhf.cli.serve_rm", "--reward.model_name_or_path", str(trained_rm),
             "--ds.attn_implementation", "eager", "--ds.param_dtype", "bf16",
             "--host", "127.0.0.1", "--port", str(port), "--data.max_len", "128"],
            env=cpu_env(), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/get_reward"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(url, data=b'{"query": ["w1"]}'), timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail("serve_rm did not start:\n" + log_path.read_text()[-3000:])
                time.sleep(0.5)
        yield url
    finally:
        server.kill()
        server.wait()


def direct_bf16_rm(path: Path, batches: list[list[str]]) -> list[float]:
    """What serve_rm computes: OpenRLHF's loader in bf16, no normalisation, one forward per request."""
    from openrlhf.models import get_llm_for_sequence_regression
    from transformers import AutoTokenizer

    model = get_llm_for_sequence_regression(str(path), "reward", attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    out = []
    for queries in batches:
        enc = tok(queries, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            out += model(enc["input_ids"], enc["attention_mask"]).float().tolist()
    return out


@pytest.mark.slow
def test_remote_serve_rm_matches_direct_calls(trained_rm, serve_rm_url):
    ours = build_scorer(parse_source(f"remote:{serve_rm_url},batch_size=2")).score(BATCH)
    assert np.allclose(ours, direct_bf16_rm(trained_rm, [BATCH.queries[:2], BATCH.queries[2:]]), atol=1e-5)


@pytest.mark.slow
def test_prepare_scores_every_source_kind_like_direct_calls(tiny_model_dir, trained_rm, serve_rm_url, tmp_path):
    """prepare end to end (hf sampling on a local Ray): reward from the train_rm checkpoint; safety
    from the serve_rm server, a reward file and a Safe-RLHF cost model; every score column equals
    a direct call of the same model on the same text."""
    from openrlhf_dual.artifacts import read_jsonl

    reward_file = tmp_path / "len.py"
    reward_file.write_text("def reward_func(queries, prompts, labels):\n    return {'rewards': [len(q) - len(p) for q, p in zip(queries, prompts)]}\n")
    cost, parts = safe_rlhf_checkpoint(tiny_model_dir, tmp_path / "cost", bias=True, v2=False)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"input": f"w{i} w{i + 3}"}) + "\n" for i in range(4)))
    prep = tmp_path / "prep"
    proc = subprocess.run(
        [sys.executable, "-m", "openrlhf_dual.cli.prepare", "--ref.model_name_or_path", str(tiny_model_dir),
         "--data.prompt_dataset", str(tmp_path / "prompts.jsonl"), "--data.apply_chat_template",
         "--rollout.n_samples_per_prompt", "4", "--rollout.max_new_tokens", "5", "--dual.prep_dir", str(prep),
         "--dual.reward", f"rm:{trained_rm}",
         "--dual.safety", f"remote:{serve_rm_url},sign=+1,batch_size=16", f"file:{reward_file},sign=+1",
         f"safe_rlhf:{cost},sign=-1",
         "--dual.threshold", "-1000000", "-1000000", "-1000000", "--dual.beta", "1.0"],
        env=cpu_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = np.load(prep / "scores" / "shard-00000.npy")
    assert scores.shape == (4, 4, 4)
    prompts = read_jsonl(prep / "prompts.jsonl")
    texts = [x["text"] for r in read_jsonl(prep / "samples" / "shard-00000.jsonl") for x in r["responses"]]
    batch = ScoreBatch([p["raw"] for p in prompts for _ in range(4)], [p["prompt"] for p in prompts for _ in range(4)], texts)
    assert np.allclose(scores[..., 0].ravel(), direct_rm_scores(trained_rm, batch.queries, True), atol=1e-5)
    assert np.allclose(scores[..., 1].ravel(), direct_bf16_rm(trained_rm, [batch.queries]), atol=1e-5)
    assert np.allclose(scores[..., 2].ravel(), [len(t) for t in texts], atol=1e-12)
    from transformers import AutoTokenizer

    assert np.allclose(scores[..., 3].ravel(), -direct_safe_rlhf(parts, AutoTokenizer.from_pretrained(cost), batch), atol=1e-5)
    sol = json.loads((prep / "dual.json").read_text())
    assert sol["feasible"] and sol["lam"] == [0.0, 0.0, 0.0]  # thresholds far below: all slack


def test_reward_file_equals_its_reward_func(tmp_path):
    path = tmp_path / "reward.py"
    path.write_text(
        "import torch\n"
        "def reward_func(queries, prompts, labels, **kw):\n"
        "    assert len(queries) == len(prompts) == len(labels)\n"
        "    return {'rewards': [torch.tensor([float(len(q) - len(p))]) for q, p in zip(queries, prompts)]}\n"
    )
    ours = build_scorer(parse_source(f"file:{path},batch_size=2")).score(BATCH)
    assert ours.tolist() == [float(len(r)) for r in BATCH.responses]
    cost = build_scorer(parse_source(f"file:{path},sign=-1", role="safety")).score(BATCH)
    assert np.array_equal(cost, -ours)


def test_non_finite_scores_name_the_source(tmp_path):
    path = tmp_path / "nan.py"
    path.write_text("def reward_func(queries, prompts, labels):\n    return {'rewards': [float('nan')] * len(queries)}\n")
    with pytest.raises(ValueError, match="nan.py: 3 non-finite scores"):
        build_scorer(parse_source(f"file:{path}")).score(BATCH)


@pytest.mark.parametrize(
    "text, role, match",
    [
        ("safe_rlhf:/x", "safety", "declare sign=\\+1"),
        ("hub:/x", "reward", "KIND one of rm, safe_rlhf, classifier, judge, remote, file, policy"),
        ("rm:/x,label=toxic", "reward", "unknown option .label=toxic. for rm"),
        ("rm:/x,colour=red", "reward", "unknown option"),
        ("rm:/x,sign=2", "reward", "sign must be"),
    ],
)
def test_source_spec_errors(text, role, match):
    with pytest.raises(ValueError, match=match):
        parse_source(text, role=role)


def safe_rlhf_checkpoint(tiny_model_dir: Path, out: Path, *, bias: bool, v2: bool, score_type: str = "reward") -> tuple[Path, dict]:
    """A Safe-RLHF score model in the beaver format: LlamaModel under model.*, score_head. v1:
    LlamaModelForScore with `bias`; v2: LlamaForScore with `score_bias`, a normaliser of mean 0.4,
    var 2.25 (std 1.5) and `score_type`."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    head = torch.nn.Linear(lm.config.hidden_size, 1, bias=bias)
    if bias:
        head.bias.data.fill_(0.75)
    weights = {f"model.{k}": v.contiguous() for k, v in lm.model.state_dict().items()}
    weights.update({f"score_head.{k}": v.contiguous() for k, v in head.state_dict().items()})
    out.mkdir(parents=True)
    save_file(weights, out / "model.safetensors")
    cfg = lm.config.to_dict()
    cfg.update(architectures=["LlamaForScore" if v2 else "LlamaModelForScore"], score_dim=1)
    if v2:
        cfg.update(score_bias=bias, score_type=score_type, do_normalize=True, normalizer_type="ExponentialMovingAverage",
                   mean=[0.4], var=[2.25])  # fmt: skip
    else:
        cfg.update(bias=bias)
    (out / "config.json").write_text(json.dumps(cfg))
    for f in tiny_model_dir.glob("*token*"):
        shutil.copy(f, out)
    shutil.copy(tiny_model_dir / "chat_template.jinja", out)
    return out, {"model": lm.model.eval(), "head": head.eval()}


def direct_safe_rlhf(parts: dict, tok, batch: ScoreBatch, max_len: int = 512) -> np.ndarray:
    """Safe-RLHF's text and end score: its tokenizer call on conversation + response + EOS (special
    tokens added, right truncation at max_len), one text at a time. (tests/test_safe_rlhf_reference.py
    checks this convention against Safe-RLHF's own code.)"""
    out = []
    for raw, resp in zip(batch.raw_prompts, batch.responses):
        text = f"BEGINNING OF CONVERSATION: USER: {raw} ASSISTANT:{resp}{tok.eos_token}"
        ids = tok(text, add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"]
        with torch.no_grad():
            hidden = parts["model"](torch.tensor([ids])).last_hidden_state[0, -1]
            out.append(parts["head"](hidden).item())
    return np.array(out)


# Safe-RLHF's Normalizer by score_type: reward (x - mean) / std, cost x / std, critic x (mean 0.4, std 1.5)
NORMALISED = {None: lambda x: x, "reward": lambda x: (x - 0.4) / 1.5, "cost": lambda x: x / 1.5, "critic": lambda x: x}


@pytest.mark.parametrize("score_type", [None, "reward", "cost", "critic"])
def test_safe_rlhf_checkpoint_scores_keep_bias_and_normalise_by_score_type(tiny_model_dir, tmp_path, score_type):
    from transformers import AutoTokenizer

    v2 = score_type is not None
    path, parts = safe_rlhf_checkpoint(tiny_model_dir, tmp_path / "ckpt", bias=True, v2=v2, score_type=score_type or "reward")
    tok = AutoTokenizer.from_pretrained(path)
    ours = build_scorer(parse_source(f"safe_rlhf:{path},sign=-1", role="safety")).score(BATCH)
    direct = direct_safe_rlhf(parts, tok, BATCH)
    assert np.allclose(ours, -NORMALISED[score_type](direct), atol=1e-5)
    raw = build_scorer(parse_source(f"safe_rlhf:{path},normalize=false")).score(BATCH)
    assert np.allclose(raw, direct, atol=1e-5)
    # Without the bias every score moves by exactly the bias (through the normaliser in v2)
    weights = load_file(path / "model.safetensors")
    del weights["score_head.bias"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ValueError, match="config says the score head has a bias but the weights lack"):
        build_scorer(parse_source(f"safe_rlhf:{path}"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["score_bias" if v2 else "bias"] = False
    (path / "config.json").write_text(json.dumps(cfg))
    no_bias = build_scorer(parse_source(f"safe_rlhf:{path},sign=-1", role="safety")).score(BATCH)
    assert np.allclose(no_bias - ours, NORMALISED[score_type](0.75) - NORMALISED[score_type](0.0), atol=1e-5)


V1_CONFIG = {"architectures": ["LlamaModelForScore"], "bias": False}
V2_CONFIG = {"architectures": ["LlamaForScore"], "normalizer_type": "ExponentialMovingAverage", "momentum": 0.9,
             "mean": [0.4], "var": [2.25]}  # fmt: skip


def test_safe_rlhf_normaliser_follows_the_config_like_safe_rlhf():
    """(shift, var) as Safe-RLHF's score model reads its config: do_normalize defaults to false
    (the `normalize` option overrides it), score_type to reward; reward (x - mean), cost x (no
    mean), critic unchanged; absent mean / var are its Normalizer's initial 0 / 1. A v1.0 config
    has no normaliser and a config it cannot read is refused, each with a message that says why."""
    assert normaliser(V2_CONFIG)[1] is None  # do_normalize absent: raw scores
    assert normaliser({**V2_CONFIG, "do_normalize": True, "score_type": "reward"}, normalize=False)[1] is None
    assert normaliser({**V2_CONFIG, "do_normalize": True}) == (0.4, 2.25)  # score_type absent: reward
    assert normaliser(V2_CONFIG, normalize=True) == (0.4, 2.25)
    assert normaliser({**V2_CONFIG, "score_type": "reward"}, normalize=True) == (0.4, 2.25)
    assert normaliser({**V2_CONFIG, "score_type": "cost"}, normalize=True) == (0.0, 2.25)
    assert normaliser({**V2_CONFIG, "score_type": "critic"}, normalize=True)[1] is None
    bare = {"architectures": ["LlamaForScore"], "do_normalize": True}
    assert normaliser(bare) == (0.0, 1.0)
    assert normaliser({**bare, "score_type": "cost"}) == (0.0, 1.0)
    assert normaliser(V1_CONFIG)[1] is None
    v1_refused = r"^\['LlamaModelForScore'\] \(Safe-RLHF v1\.0\) has no normaliser; drop normalize=true$"
    with pytest.raises(ValueError, match=v1_refused):
        normaliser(V1_CONFIG, normalize=True)
    with pytest.raises(ValueError, match=r"^score_type 'bogus': expected one of reward, cost, critic$"):
        normaliser({**V2_CONFIG, "score_type": "bogus"}, normalize=True)
    with pytest.raises(ValueError, match=r"^score_dim 2: only one score per text is supported$"):
        normaliser({**V2_CONFIG, "mean": [0.4, 0.1]}, normalize=True)


def test_safe_rlhf_truncation_and_dtype_options(tiny_model_dir, tmp_path):
    """Right truncation at max_len drops the EOS (Safe-RLHF's convention); dtype overrides the
    checkpoint's (fp32 here)."""
    from transformers import AutoTokenizer

    path, parts = safe_rlhf_checkpoint(tiny_model_dir, tmp_path / "ckpt", bias=False, v2=False)
    tok = AutoTokenizer.from_pretrained(path)
    default = build_scorer(parse_source(f"safe_rlhf:{path}")).inner
    assert default.backbone.dtype == torch.float32 and default.max_len == 512
    assert default.input_ids(*BATCH.raw_prompts[:1], *BATCH.responses[:1])[-1] == tok.eos_token_id
    short = build_scorer(parse_source(f"safe_rlhf:{path},max_len=9"))
    ids = short.inner.input_ids("w1 w2", "w3 w4 w5 w6 w7")
    assert len(ids) == 9 and tok.eos_token_id not in ids
    assert np.allclose(short.score(BATCH), direct_safe_rlhf(parts, tok, BATCH, max_len=9), atol=1e-5)
    half = build_scorer(parse_source(f"safe_rlhf:{path},dtype=bfloat16")).inner
    assert half.backbone.dtype == torch.bfloat16
    assert np.allclose(half.score(BATCH), direct_safe_rlhf(parts, tok, BATCH), atol=0.1)
    with pytest.raises(ValueError, match="dtype=fp8: expected one of auto, float32"):
        build_scorer(parse_source(f"safe_rlhf:{path},dtype=fp8"))


def test_safe_rlhf_missing_head_fails_loudly(tiny_model_dir, tmp_path):
    path, _ = safe_rlhf_checkpoint(tiny_model_dir, tmp_path / "ckpt", bias=False, v2=False)
    weights = load_file(path / "model.safetensors")
    weights["reward_head.weight"] = weights.pop("score_head.weight")
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ValueError, match="no score_head.weight"):
        build_scorer(parse_source(f"safe_rlhf:{path}"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling.Model"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="trust_remote_code=true"):
        build_scorer(parse_source(f"safe_rlhf:{path}"))
