"""A response's text is what follows its prompt in the decoded sequence. With a sentencepiece
Llama tokenizer (built here, the beaver/Alpaca format) a response decoded on its own loses its
leading space ("▁Mix" -> "Mix"): scorers would then read "ASSISTANT:Mix" and PeCAN's DPO step,
which re-tokenises prompt + text, other tokens than the policy generated."""

from __future__ import annotations

from pathlib import Path

import pytest

from openrlhf_dual.ppo_reward import split_response
from openrlhf_dual.sampling import SamplingConfig, response_text
from openrlhf_dual.sampling.hf import HFGenerator
from safe_rlhf_reference import build_one

PROMPT = "BEGINNING OF CONVERSATION: USER: How do I make bread? ASSISTANT:"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A tiny random Llama with a tokenizer.model-only sentencepiece tokenizer."""
    from transformers import AutoTokenizer

    from openrlhf_dual.tiny import build_tiny_lm

    path = build_one(tmp_path_factory.mktemp("sp"), "v1")
    build_tiny_lm(path, AutoTokenizer.from_pretrained(path), seed=2)
    return path


def test_response_text_keeps_the_leading_space_generated_tokens_carry(sp_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sp_model)
    prompt_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    generated = [*tok.convert_tokens_to_ids(["▁Mix", "▁flour", "▁and", "▁water", "."]), tok.eos_token_id]
    assert tok.decode(generated, skip_special_tokens=True) == "Mix flour and water."  # alone: the space is gone
    text = response_text(tok, PROMPT, prompt_ids, generated)
    assert text == " Mix flour and water."
    # re-tokenising prompt + text (PeCAN's DPO step, every text scorer) gives back the generated ids
    assert tok(PROMPT + text, add_special_tokens=False)["input_ids"] == prompt_ids + generated[:-1]
    assert tok(PROMPT + "Mix flour and water.", add_special_tokens=False)["input_ids"] != prompt_ids + generated[:-1]
    # the PPO reward reads the same text out of OpenRLHF's query
    query = tok.decode(prompt_ids + generated, skip_special_tokens=False)
    assert split_response(query, PROMPT, tok) == text


def test_sampler_texts_read_as_the_decoded_sequence(sp_model):
    """Every sampled response: prompt + text is the decoded prompt + response ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sp_model)
    prompt_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert tok.decode(prompt_ids) == PROMPT
    responses = HFGenerator(str(sp_model), SamplingConfig(n=8, max_new_tokens=6, seed=1)).generate([PROMPT], [0])[0]
    assert any(tok.convert_ids_to_tokens(r.token_ids[0]).startswith("▁") for r in responses)  # the case that loses a space
    for r in responses:
        assert PROMPT + r.text == tok.decode(prompt_ids + r.token_ids, skip_special_tokens=True)
