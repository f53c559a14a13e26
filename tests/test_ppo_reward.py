"""One-shot constrained PPO: r + lambda*.g through OpenRLHF's own reward paths.

The reward file and the server are called by OpenRLHF's real `SingleTurnAgentExecutor`: `execute`
builds the query from generated token ids exactly as PPO does (here the generator is HF's, as vLLM
has no CPU build in this environment), and `_fetch_rewards_via_http` posts the JSON PPO posts.
"""

from __future__ import annotations

import asyncio
import json
import os
import runpy
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import WORDS
from openrlhf_dual.artifacts import read_jsonl
from openrlhf_dual.launch import cpu_env, free_port
from openrlhf_dual.scoring import ScoreBatch, build_scorer, parse_source

SAFETY = '''
def reward_func(queries, prompts, labels, **kwargs):
    return {"rewards": [float(len(q[len(p):].split())) - 2.0 for q, p in zip(queries, prompts)]}
'''
COST = '''
def reward_func(queries, prompts, labels, **kwargs):
    return {"rewards": [0.5 * q[len(p):].count("bad") + 0.1 * q[len(p):].count("w3") for q, p in zip(queries, prompts)]}
'''
LAM = [0.7, 0.3]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prep(tiny_model_dir, tmp_path_factory) -> Path:
    """A prep directory from the real prepare CLI: an OpenRLHF reward model (random head, saved by
    OpenRLHF's own class) as r, and m = 2 safety sources, one a cost (sign=-1)."""
    from openrlhf.models import get_llm_for_sequence_regression
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("ppo_prep")
    torch.manual_seed(0)
    rm = get_llm_for_sequence_regression(str(tiny_model_dir), "reward", init_value_head=True, attn_implementation="eager")
    rm.save_pretrained(root / "rm")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / "rm")
    (root / "safety.py").write_text(SAFETY)
    (root / "cost.py").write_text(COST)
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"question": f"{WORDS[i]} {WORDS[i + 2]}"}) + "\n")
    cmd = [
        sys.executable, "-m", "openrlhf_dual.cli.prepare",
        "--ref.model_name_or_path", str(tiny_model_dir), "--data.prompt_dataset", str(root / "prompts.jsonl"),
        "--data.input_key", "question", "--data.apply_chat_template", "--data.max_samples", "8",
        "--rollout.n_samples_per_prompt", "4", "--rollout.max_new_tokens", "5", "--train.seed", "3",
        "--dual.reward", f"rm:{root / 'rm'},normalize=false",
        "--dual.safety", f"file:{root / 'safety.py'},sign=+1", f"file:{root / 'cost.py'},sign=-1",
        "--dual.threshold", "-10", "-10", "--dual.beta", "0.5", "--dual.shard_size", "4",
        "--dual.prep_dir", str(root / "prep"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Thresholds that bind (lambda* > 0 for both), between pi_0's safety and the reachable maximum:
    # rerunning with new thresholds re-solves the dual only (no re-sampling).
    sol = json.loads((root / "prep" / "dual.json").read_text())
    b = [p + 0.3 * (r - p) for p, r in zip(sol["predicted"]["safety"], sol["reachable"])]
    cmd[cmd.index("--dual.threshold") + 1 : cmd.index("--dual.threshold") + 3] = [str(v) for v in b]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lam = json.loads((root / "prep" / "dual.json").read_text())["lam"]
    assert min(lam) > 0.05, lam  # so reading lambda = 0 instead of dual.json's would show
    return root / "prep"


def direct(prep: Path, raw: list[str], prompts: list[str], responses: list[str], lam) -> np.ndarray:
    """[n, 2 + m]: r + lam.g, r, g_1..g_m from each source's own scorer, as prepare calls them."""
    inputs = json.loads((prep / "manifest.json").read_text())["inputs"]
    batch = ScoreBatch(raw, prompts, responses)
    cols = [build_scorer(parse_source(inputs["reward"])).score(batch)]
    cols += [build_scorer(parse_source(s, "safety")).score(batch) for s in inputs["safety"]]
    cols = np.stack(cols, axis=1)
    return np.concatenate([(cols[:, 0] + cols[:, 1:] @ np.asarray(lam, dtype=float))[:, None], cols], axis=1)


class HFEngine:
    """What SingleTurnAgentExecutor needs of a vLLM engine (`generate` -> outputs[0].token_ids,
    finish_reason), answered by HF generate on CPU. EOS stays in token_ids, as vLLM keeps it."""

    def __init__(self, model_dir: Path, seed: int = 0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        torch.manual_seed(seed)

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        with torch.no_grad():
            out = self.model.generate(torch.tensor([prompt_token_ids]), do_sample=True, top_k=0,
                                      max_new_tokens=sampling_params.max_tokens, pad_token_id=self.tok.eos_token_id)  # fmt: skip
        ids = out[0, len(prompt_token_ids) :].tolist()
        eos = self.tok.eos_token_id
        ids = ids[: ids.index(eos) + 1] if eos in ids else ids
        reason = "stop" if eos in ids else "length"
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason=reason, logprobs=None)])


def rollouts(executor, engine: HFEngine, prompts: list[str]) -> list[dict]:
    """OpenRLHF's single-turn rollout for each prompt, all in flight at once."""
    params = SimpleNamespace(max_tokens=6, logprobs=None)

    async def go():
        return await asyncio.gather(
            *(executor.execute(p, "", params, 64, engine.tok, engine) for p in prompts)
        )

    return asyncio.run(go())


def chat(tok, raw: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": raw}], tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
@pytest.mark.parametrize("lam", [None, LAM, [0.0, 0.0]], ids=["dual_json", "lam_0.7_0.3", "lam_0"])
def test_reward_file_through_openrlhf_executor_matches_direct_scores(prep, tiny_model_dir, lam):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    from openrlhf_dual.ppo_reward import write_reward_file

    path = write_reward_file(prep, lam)
    expected_lam = json.loads((prep / "dual.json").read_text())["lam"] if lam is None else lam
    engine = HFEngine(tiny_model_dir, seed=1)
    raw = [f"{WORDS[i]} {WORDS[i + 5]}" for i in range(12)]  # prompts prepare never saw
    prompts = [chat(engine.tok, r) for r in raw]
    out = rollouts(SingleTurnAgentExecutor([str(path)]), engine, prompts)

    responses = [engine.tok.decode(o["observation_tokens"][o["action_ranges"][0][0] :], skip_special_tokens=True)
                 for o in out]  # fmt: skip
    assert any(o["observation_tokens"][-1] == engine.tok.eos_token_id for o in out)  # EOS reached the query
    want = direct(prep, raw, prompts, responses, expected_lam)
    got_total = np.array([float(o["reward"][0]) for o in out])
    np.testing.assert_allclose(got_total, want[:, 0], atol=1e-5)
    np.testing.assert_allclose([float(o["scores"][0]) for o in out], want[:, 0], atol=1e-5)
    np.testing.assert_allclose([o["extra_logs"]["dual_reward"].item() for o in out], want[:, 1], atol=1e-5)
    for j in range(2):
        np.testing.assert_allclose([o["extra_logs"][f"dual_safety_{j}"].item() for o in out], want[:, 2 + j], atol=1e-5)
    assert np.ptp(want[:, 1]) > 0 and np.ptp(want[:, 2]) > 0  # the scores vary, so the check could fail


@pytest.mark.slow
def test_reward_file_reproduces_the_scores_lambda_was_solved_on(prep, tiny_model_dir):
    """PPO-style queries (decode(prompt_ids + response_ids), special tokens kept) of prepare's own
    samples get back the scores in scores/*.npy."""
    from openrlhf.utils.agent import SingleTurnAgentExecutor
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    executor = SingleTurnAgentExecutor([str(prep / "ppo_reward.py")])
    prompts = read_jsonl(prep / "prompts.jsonl")
    samples = [r["responses"] for f in sorted(prep.glob("samples/*.jsonl")) for r in read_jsonl(f)]
    scores = np.concatenate([np.load(f) for f in sorted(prep.glob("scores/*.npy"))])
    queries, ps = [], []
    for p, per_prompt in zip(prompts, samples):
        ids = tok(p["prompt"], add_special_tokens=False)["input_ids"]
        for s in per_prompt:
            queries.append(tok.decode(ids + s["token_ids"], skip_special_tokens=False))
            ps.append(p["prompt"])
    assert any(q.endswith(tok.eos_token) for q in queries)

    async def go():
        return await asyncio.gather(*(executor._fetch_rewards_via_func([q], [p], [""]) for q, p in zip(queries, ps)))

    got = [r[0] for r in asyncio.run(go())]
    flat = scores.reshape(-1, scores.shape[-1])
    lam = json.loads((prep / "dual.json").read_text())["lam"]
    total = flat[:, 0] + flat[:, 1] * lam[0] + flat[:, 2] * lam[1]
    np.testing.assert_allclose([g["rewards"].item() for g in got], total, atol=1e-5)
    np.testing.assert_allclose([g["scores"].item() for g in got], total, atol=1e-5)
    np.testing.assert_allclose([g["extra_logs"]["dual_reward"].item() for g in got], flat[:, 0], atol=1e-5)
    for j in range(2):
        np.testing.assert_allclose([g["extra_logs"][f"dual_safety_{j}"].item() for g in got], flat[:, 1 + j], atol=1e-5)
    assert np.ptp(flat[:, 1]) > 0 and np.ptp(flat[:, 2]) > 0


@pytest.fixture(scope="module")
def server(prep):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "openrlhf_dual.cli.serve_reward", "--dual.prep_dir", str(prep),
         "--dual.lambda", *map(str, LAM), "--port", str(port), "--batch_size", "16"],
        env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                assert json.loads(r.read())["lambda"] == LAM
                break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None:
                pytest.fail(f"serve_reward exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("serve_reward did not start in 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_server_answers_a_burst_of_64_concurrent_ppo_requests_without_mixups(server, prep, tiny_model_dir):
    from openrlhf.utils.agent import SingleTurnAgentExecutor
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    executor = SingleTurnAgentExecutor([server + "/get_reward"])
    rng = np.random.default_rng(0)
    raw = [f"{WORDS[i % 30]} {WORDS[(i * 7) % 30]}" for i in range(64)]
    prompts = [chat(tok, r) for r in raw]
    responses = [" ".join(rng.choice(["good", "bad", "w3", "kind", "w9"], size=rng.integers(1, 6))) for _ in raw]
    queries = [p + r + " " + tok.eos_token for p, r in zip(prompts, responses)]

    async def go():
        return await asyncio.gather(
            *(executor._fetch_rewards_via_http([q], [p], [""]) for q, p in zip(queries, prompts))
        )

    got = [r[0] for r in asyncio.run(go())]
    want = direct(prep, raw, prompts, responses, LAM)
    np.testing.assert_allclose([g["rewards"][0] for g in got], want[:, 0], atol=1e-5)
    np.testing.assert_allclose([g["scores"][0] for g in got], want[:, 0], atol=1e-5)
    np.testing.assert_allclose([g["extra_logs"]["dual_reward"][0] for g in got], want[:, 1], atol=1e-5)
    for j in range(2):
        np.testing.assert_allclose([g["extra_logs"][f"dual_safety_{j}"][0] for g in got], want[:, 2 + j], atol=1e-5)
    assert len(set(np.round(want[:, 0], 6))) > 10  # distinct answers: a mix-up would show


@pytest.mark.slow
@pytest.mark.parametrize(
    "body, status, reason",
    [
        (b"not json", 400, "Expecting value"),
        (json.dumps({"query": ["a"]}).encode(), 400, "'prompts' must be a list of strings"),
        (json.dumps({"query": ["a", "b"], "prompts": ["a"]}).encode(), 400, "2 queries but 1 prompts"),
        (json.dumps({"query": "user : w1", "prompts": ["user"]}).encode(), 400, "'query' must be a list"),
        (json.dumps({"query": ["other text"], "prompts": ["user : w1"]}).encode(), 422, "does not start with its prompt"),
    ],
)
def test_server_rejects_malformed_requests_with_a_reason(server, body, status, reason):
    request = urllib.request.Request(server + "/get_reward", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == status
    assert reason in json.loads(err.value.read())["error"]


def stand_in_vllm(monkeypatch) -> None:
    """train_ppo_ray imports vLLM at module level; vLLM has no build for this CPU. These names are
    only imported, never called, before train() starts."""
    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = object
    inputs, utils = types.ModuleType("vllm.inputs"), types.ModuleType("vllm.utils")
    inputs.TokensPrompt, utils.random_uuid = object, lambda: "0"
    for name, module in (("vllm", vllm), ("vllm.inputs", inputs), ("vllm.utils", utils)):
        monkeypatch.setitem(sys.modules, name, module)


class _Stop(Exception):
    pass


def parse_ppo(argv: list[str], monkeypatch) -> SimpleNamespace:
    """Run `python -m openrlhf.cli.train_ppo_ray ARGV` (patched OpenRLHF: its parser, its checks,
    our plugin's hook) up to the first line of train(), and return the args it would train with."""
    import ray

    stand_in_vllm(monkeypatch)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(_Stop()))
    monkeypatch.setattr(sys, "argv", ["train_ppo_ray", *argv])
    with pytest.raises(_Stop) as stop:
        runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__")
    tb = stop.value.__traceback__
    while tb.tb_frame.f_code.co_name != "train":
        tb = tb.tb_next
    return tb.tb_frame.f_locals["args"]


PPO_ARGS = ["--actor.model_name_or_path", "m", "--data.prompt_dataset", "d", "--algo.advantage.estimator", "gae"]


def test_train_ppo_ray_flag_points_the_reward_at_the_prep_dir(prep, monkeypatch):
    args = parse_ppo([*PPO_ARGS, "--dual.prep_dir", str(prep)], monkeypatch)
    assert args.reward.remote_url == [str(prep / "ppo_reward.py")]
    assert args.critic.model_name_or_path == "m"  # OpenRLHF's own rule for a remote reward with GAE

    args = parse_ppo([*PPO_ARGS, "--dual.prep_dir", str(prep), "--dual.lambda", "0.7", "0.3"], monkeypatch)
    (path,) = args.reward.remote_url
    assert Path(path).name == "ppo_reward_lambda_0.7_0.3.py" and Path(path).exists()

    with pytest.raises(SystemExit):
        parse_ppo([*PPO_ARGS, "--dual.prep_dir", str(prep), "--reward.remote_url", "http://x/get_reward"], monkeypatch)
    with pytest.raises(ValueError, match="one per safety source"):
        parse_ppo([*PPO_ARGS, "--dual.prep_dir", str(prep), "--dual.lambda", "0.7"], monkeypatch)


def test_ppo_recipe_parses_through_openrlhf(prep, tmp_path, monkeypatch):
    """recipes/ppo_one_shot.sh with `ray` replaced by a recorder: its train_ppo_ray arguments go
    through OpenRLHF's parser and checks, and the reward is the prep directory's."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "ray").write_text(f'#!/bin/sh\n{sys.executable} -c "import json,sys; print(json.dumps(sys.argv[1:]))" "$@"\n')
    (shim / "ray").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "PREP": str(prep), "SKIP_PREPARE": "1"}
    proc = subprocess.run(["bash", str(ROOT / "recipes" / "ppo_one_shot.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout.strip().splitlines()[-1])
    argv = argv[argv.index("openrlhf.cli.train_ppo_ray") + 1 :]
    args = parse_ppo(argv, monkeypatch)
    assert args.reward.remote_url == [str(prep / "ppo_reward.py")]
    assert args.actor.model_name_or_path == "PKU-Alignment/alpaca-7b-reproduced"


def test_check_prep_dir_refuses_pecan_dirs_and_missing_lambdas(tmp_path):
    """What the reward file, the server and train_ppo_ray's --dual.prep_dir check before loading
    any model: a MoCAN directory with a finite lambda per safety source."""
    from openrlhf_dual.ppo_reward import CombinedReward

    def prep_dir(name, solution, safety=("file:s.py,sign=+1", "file:c.py,sign=-1")):
        root = tmp_path / name
        root.mkdir()
        (root / "manifest.json").write_text(json.dumps({"inputs": {"reward": "file:r.py", "safety": list(safety)}}))
        (root / "dual.json").write_text(json.dumps(solution))
        return root

    good = prep_dir("good", {"lam": [0.5, 1.5], "form": "model"})
    inputs, lam = CombinedReward.check_prep_dir(good)
    assert inputs["reward"] == "file:r.py" and lam.tolist() == [0.5, 1.5]
    assert CombinedReward.check_prep_dir(good, [0.0, 2.0])[1].tolist() == [0.0, 2.0]  # an override wins
    with pytest.raises(ValueError, match="is a PeCAN prep directory"):
        CombinedReward.check_prep_dir(prep_dir("pecan", {"lam": [0.5, 1.5], "form": "margin"}))
    infeasible = prep_dir("infeasible", {"lam": [None, None], "form": "model", "feasible": False})
    with pytest.raises(ValueError, match="has no finite lambda.*pass --dual.lambda"):
        CombinedReward.check_prep_dir(infeasible)
    assert CombinedReward.check_prep_dir(infeasible, [1.0, 1.0])[1].tolist() == [1.0, 1.0]
    for bad in ([1.0], [1.0, -0.5], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="must be finite, >= 0, one per safety source"):
            CombinedReward.check_prep_dir(good, bad)
    (good / "dual.json").unlink()
    with pytest.raises(FileNotFoundError, match="dual.json not found"):
        CombinedReward.check_prep_dir(good)
