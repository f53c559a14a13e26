"""Sampling K responses per prompt from pi_ref through Ray actors (hf backend on CPU; vllm on GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openrlhf_dual.sampling import ReferenceSampler, SamplingConfig, vllm_sampling_kwargs

PROMPTS = [f"user : w{i} w{i + 1} assistant : " for i in range(6)]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def sample(model, prompts, indices, actors=2, **cfg):
    config = SamplingConfig(**{"n": 4, "max_new_tokens": 6, "seed": 3, **cfg})
    with ReferenceSampler("hf", str(model), actors, config) as sampler:
        return sampler.sample(prompts, indices)


def test_hf_actors_return_k_responses_in_order(ray_local, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = sample(tiny_model_dir, PROMPTS, list(range(6)))
    assert len(out) == 6 and all(len(per) == 4 for per in out)
    for per in out:
        for r in per:
            assert 1 <= len(r.token_ids) <= 6
            assert r.finished == (r.token_ids[-1] == tok.eos_token_id)
            assert tok.eos_token_id not in r.token_ids[:-1]
            assert r.text == tok.decode(r.token_ids, skip_special_tokens=True)


def test_samples_do_not_depend_on_sharding_or_actor_count(ray_local, tiny_model_dir):
    whole = sample(tiny_model_dir, PROMPTS, list(range(6)))
    parts = sample(tiny_model_dir, PROMPTS[:3], [0, 1, 2]) + sample(tiny_model_dir, PROMPTS[3:], [3, 4, 5], actors=1)
    ids = lambda rows: [[r.token_ids for r in per] for per in rows]  # noqa: E731
    assert ids(whole) == ids(parts)
    other_seed = sample(tiny_model_dir, PROMPTS, list(range(6)), seed=4)
    assert ids(other_seed) != ids(whole)


def test_first_token_frequencies_follow_the_model(ray_local, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = tok(PROMPTS[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[0, -1].double(), -1).numpy()
    n = 1200
    out = sample(tiny_model_dir, PROMPTS[:1], [0], actors=1, n=n, max_new_tokens=1)[0]
    freq = np.bincount([r.token_ids[0] for r in out], minlength=len(probs)) / n
    sd = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq - probs) <= 5 * sd + 1e-3), np.max(np.abs(freq - probs) / (sd + 1e-12))


def test_bad_arguments_are_clear_errors(ray_local, tiny_model_dir):
    with pytest.raises(ValueError, match="n >= 1"):
        SamplingConfig(n=0, max_new_tokens=4)
    with pytest.raises(ValueError, match="unknown sampling backend"):
        ReferenceSampler("tgi", str(tiny_model_dir), 1, SamplingConfig(n=1, max_new_tokens=1))


def test_vllm_arguments_and_missing_vllm(tiny_model_dir):
    cfg = SamplingConfig(n=8, max_new_tokens=16, temperature=0.7, top_p=0.9, seed=5)
    kw = vllm_sampling_kwargs(cfg, 11)
    assert kw == dict(n=8, temperature=0.7, top_p=0.9, top_k=0, max_tokens=16, seed=cfg.prompt_seed(11) * 8,
                      include_stop_str_in_output=True)  # fmt: skip
    # vLLM seeds sample k with seed + k: neighbouring prompts' K seeds must not overlap
    assert vllm_sampling_kwargs(cfg, 12)["seed"] - kw["seed"] >= cfg.n
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="openrlhf-dual\\[vllm\\]"):
            ReferenceSampler("vllm", str(tiny_model_dir), 1, cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the vllm backend needs CUDA and vLLM")
def test_vllm_engines_sample_k_responses(ray_local, tiny_model_dir):
    pytest.importorskip("vllm", reason="vLLM is not installed")
    out = ReferenceSampler("vllm", str(tiny_model_dir), 1, SamplingConfig(n=4, max_new_tokens=6, seed=3),
                           vllm_gpu_memory_utilization=0.2, vllm_enforce_eager=True).sample(PROMPTS, list(range(6)))  # fmt: skip
    assert [len(per) for per in out] == [4] * 6
