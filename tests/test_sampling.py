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


def test_hf_actors_return_k_responses_in_order(ray_local, peaked_model_dir):
    """out[j] holds prompt j's own K responses: each prompt sampled alone (one prompt per call: no
    order to get wrong) gives exactly the responses the batched call put at j, and the prompt's
    text matters (the same index with another prompt gives other responses; with the nearly
    uniform tiny_model_dir it would not, hence the peaked model)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(peaked_model_dir)
    config = SamplingConfig(n=4, max_new_tokens=6, seed=3)
    with ReferenceSampler("hf", str(peaked_model_dir), 2, config) as sampler:
        out = sampler.sample(PROMPTS, list(range(6)))
        alone = [sampler.sample([p], [j])[0] for j, p in enumerate(PROMPTS)]
        swapped = sampler.sample([PROMPTS[1]], [0])[0]
    assert len(out) == 6 and all(len(per) == 4 for per in out)
    ids = lambda per: [r.token_ids for r in per]  # noqa: E731
    assert [ids(per) for per in out] == [ids(per) for per in alone]
    assert ids(swapped) != ids(out[0]) and len({str(ids(per)) for per in out}) == 6
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


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory):
    """A tiny LM over 300 words whose first-token distribution is far from uniform (its output
    weights scaled by 12): the most likely token has about 5%, the top 50 about two thirds."""
    from conftest import WORDS
    from openrlhf_dual.tiny import build_tiny_lm, build_tokenizer

    out = tmp_path_factory.mktemp("peaked_lm")
    model = build_tiny_lm(out, build_tokenizer(out, WORDS + [f"x{i}" for i in range(250)]), seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    model.save_pretrained(str(out))
    return out


def test_first_token_frequencies_follow_the_model(ray_local, peaked_model_dir):
    """Chi-square of 1200 first tokens against the model's own softmax (bins with fewer than 5
    expected pooled). Simulated at this size, sampling uniformly, with HF's default top_k = 50, or
    at temperature 0.5 or 2 is rejected every time at p < 1e-3."""
    from scipy.stats import chisquare
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(peaked_model_dir)
    model = AutoModelForCausalLM.from_pretrained(peaked_model_dir).eval()
    ids = tok(PROMPTS[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[0, -1].double(), -1).numpy()
    assert len(probs) > 250 and 0.03 < probs.max() < 0.2 and np.sort(probs)[-50:].sum() < 0.8  # peaked, with a tail
    n = 1200
    out = sample(peaked_model_dir, PROMPTS[:1], [0], actors=1, n=n, max_new_tokens=1)[0]
    counts = np.bincount([r.token_ids[0] for r in out], minlength=len(probs))
    expected = n * probs
    big = expected >= 5
    observed, expected = np.r_[counts[big], counts[~big].sum()], np.r_[expected[big], expected[~big].sum()]
    assert big.sum() > 40
    assert chisquare(observed, expected).pvalue > 1e-3, (observed, expected)


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
