"""`classifier:` and `judge:` sources on tiny random checkpoints built in-process, against a direct
transformers computation one text at a time, and through prepare (Ray actors) and the PPO reward."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import WORDS
from openrlhf_dual.launch import cpu_env
from openrlhf_dual.scoring import ScoreBatch, build_scorer, parse_source
from openrlhf_dual.tiny import build_tokenizer

BATCH = ScoreBatch(
    raw_prompts=["w1 w2", "w3 w4 w5", "w6", "w7 w8"],
    prompts=["user : w1 w2 assistant : ", "user : w3 w4 w5 assistant : ", "user : w6 assistant : ", "user : w7 w8 assistant : "],
    responses=["good fine kind", "bad harm", "w7 w8 w9 w10 good w11 w12 w13", ""],
)
LABELS = {0: "neutral", 1: "toxic", 2: "threat"}
JUDGE_TEMPLATE = (
    "{{ bos_token }}[INST] check the last turn {% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
    "{% endfor %}[/INST]"
)


def bert_classifier(out: Path, *, multi_label: bool = False) -> Path:
    """A tiny random BERT sequence classifier with three labels and a WordPiece vocabulary."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    out.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=False)
    tok.save_pretrained(out)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, initializer_range=0.5, id2label=LABELS,
                     label2id={v: k for k, v in LABELS.items()},
                     problem_type="multi_label_classification" if multi_label else None)  # fmt: skip
    torch.manual_seed(3)
    BertForSequenceClassification(cfg).save_pretrained(out)
    return out


def direct_classifier(path: Path, texts: list, label: int, multi_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """(log-odds, log-prob) of `label`, one text (or text pair) at a time. (Lists of one: a single
    call tok(prompt, "") would drop an empty response's segment, a batched one keeps it.)"""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    logodds, logprob = [], []
    for t in texts:
        with torch.no_grad():
            z = model(**tok(*[[x] for x in t], return_tensors="pt")).logits[0].double().numpy()
        p = 1 / (1 + np.exp(-z[label])) if multi_label else np.exp(z[label] - np.logaddexp.reduce(z))
        logodds.append(np.log(p / (1 - p)))
        logprob.append(np.log(p))
    return np.array(logodds), np.array(logprob)


@pytest.mark.parametrize("multi_label", [False, True])
def test_classifier_scores_the_named_label_like_a_direct_computation(tmp_path, multi_label):
    path = bert_classifier(tmp_path / "clf", multi_label=multi_label)
    responses = [(r,) for r in BATCH.responses]
    pairs = list(zip(BATCH.raw_prompts, BATCH.responses))
    logodds, logprob = direct_classifier(path, responses, 1, multi_label)
    cost = build_scorer(parse_source(f"classifier:{path},label=toxic,sign=-1", "safety"))
    assert np.allclose(cost.score(BATCH), -logodds, atol=1e-5)
    ours = build_scorer(parse_source(f"classifier:{path},label=toxic,output=logprob,batch_size=3")).score(BATCH)
    assert np.allclose(ours, logprob, atol=1e-5)
    pair_logodds, _ = direct_classifier(path, pairs, 1, multi_label)
    ours = build_scorer(parse_source(f"classifier:{path},label=toxic,text=pair")).score(BATCH)
    assert np.allclose(ours, pair_logodds, atol=1e-5)
    assert not np.allclose(pair_logodds, logodds, atol=1e-3)  # the prompt does reach the classifier
    with pytest.raises(ValueError, match=r"label=harmful is not one of this classifier's labels \['neutral', 'threat', 'toxic'\]"):
        build_scorer(parse_source(f"classifier:{path},label=harmful"))
    with pytest.raises(ValueError, match="classifier needs label="):
        parse_source(f"classifier:{path},sign=-1", "safety")


def tiny_judge(out: Path) -> Path:
    """A tiny random causal LM with a Llama-Guard-style chat template; "safe", "unsafe" are words of its vocabulary."""
    from openrlhf_dual.tiny import build_tiny_lm

    out.mkdir(parents=True)
    tok = build_tokenizer(out, [*WORDS, "safe", "unsafe", "[INST]", "[/INST]", "check", "the", "last", "turn"])
    tok.chat_template = JUDGE_TEMPLATE
    build_tiny_lm(out, tok, seed=5)
    return out


def direct_judge(path: Path, batch: ScoreBatch, safe: str = "safe", unsafe: str = "unsafe") -> np.ndarray:
    """log P(safe) - log P(unsafe) of the next token after the rendered conversation, one at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    out = []
    for p, r in zip(batch.raw_prompts, batch.responses):
        text = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                       add_generation_prompt=True, tokenize=False)  # fmt: skip
        assert text.endswith("[/INST]") and f"user : {p} assistant : {r}" in text
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits[0, -1].double(), -1)
        out.append((logp[tok.convert_tokens_to_ids(safe)] - logp[tok.convert_tokens_to_ids(unsafe)]).item())
    return np.array(out)


def test_judge_scores_the_first_verdict_token_in_one_forward_pass(tmp_path):
    path = tiny_judge(tmp_path / "judge")
    scorer = build_scorer(parse_source(f"judge:{path},sign=+1,batch_size=3", "safety"))
    model = scorer.inner.model
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    model.generate = lambda *a, **k: pytest.fail("the judge must not generate")
    ours = scorer.score(BATCH)
    assert len(calls) == 2  # 4 conversations in batches of 3: one forward each
    assert np.allclose(ours, direct_judge(path, BATCH), atol=1e-5)
    swapped = build_scorer(parse_source(f"judge:{path},sign=+1,safe=good,unsafe=bad", "safety")).score(BATCH)
    assert np.allclose(swapped, direct_judge(path, BATCH, "good", "bad"), atol=1e-5)
    with pytest.raises(ValueError, match="longer than the judge's max_len 12"):
        build_scorer(parse_source(f"judge:{path},sign=+1,max_len=12", "safety")).score(BATCH)


def test_judge_refuses_verdict_words_of_several_tokens(tmp_path):
    from safe_rlhf_reference import build_one

    path = build_one(tmp_path, "v1")  # a sentencepiece vocabulary where "unsafe" is several pieces
    (path / "chat_template.jinja").write_text(JUDGE_TEMPLATE)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match=r"'unsafe' is \d tokens .* pass the verdict's first token as safe=/unsafe="):
        build_scorer(parse_source(f"judge:{path},sign=+1", "safety"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_classifier_and_judge_on_cuda_agree_with_cpu(tmp_path):
    judge, clf = tiny_judge(tmp_path / "judge"), bert_classifier(tmp_path / "clf")
    for spec in [f"judge:{judge},sign=+1", f"classifier:{clf},label=toxic,sign=-1,text=pair"]:
        cpu = build_scorer(parse_source(spec, "safety")).score(BATCH)
        assert np.allclose(build_scorer(parse_source(spec, "safety"), device="cuda").score(BATCH), cpu, atol=1e-4)


@pytest.mark.slow
def test_prepare_and_the_ppo_reward_score_with_classifier_and_judge(tiny_model_dir, tmp_path):
    """prepare end to end (Ray actors) with a judge and a classifier as the two safety sources;
    its score columns and the PPO reward's equal direct computations on the same texts."""
    from openrlhf_dual.artifacts import read_jsonl
    from openrlhf_dual.ppo_reward import CombinedReward

    judge, clf = tiny_judge(tmp_path / "judge"), bert_classifier(tmp_path / "clf")
    (tmp_path / "len.py").write_text("def reward_func(queries, prompts, labels):\n"
                                     "    return {'rewards': [float(len(q) - len(p)) for q, p in zip(queries, prompts)]}\n")  # fmt: skip
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"input": f"w{i} w{i + 3}"}) + "\n" for i in range(3)))
    prep = tmp_path / "prep"
    proc = subprocess.run(
        [sys.executable, "-m", "openrlhf_dual.cli.prepare", "--ref.model_name_or_path", str(tiny_model_dir),
         "--data.prompt_dataset", str(tmp_path / "prompts.jsonl"), "--data.apply_chat_template",
         "--rollout.n_samples_per_prompt", "4", "--rollout.max_new_tokens", "5", "--dual.prep_dir", str(prep),
         "--dual.reward", f"file:{tmp_path / 'len.py'}",
         "--dual.safety", f"judge:{judge},sign=+1", f"classifier:{clf},label=toxic,sign=-1",
         "--dual.threshold", "-1000", "-1000", "--dual.beta", "1.0"],
        env=cpu_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = np.load(prep / "scores" / "shard-00000.npy")
    prompts = read_jsonl(prep / "prompts.jsonl")
    texts = [x["text"] for r in read_jsonl(prep / "samples" / "shard-00000.jsonl") for x in r["responses"]]
    batch = ScoreBatch([p["raw"] for p in prompts for _ in range(4)], [p["prompt"] for p in prompts for _ in range(4)], texts)
    assert np.allclose(scores[..., 1].ravel(), direct_judge(judge, batch), atol=1e-5)
    logodds, _ = direct_classifier(clf, [(t,) for t in texts], 1, False)
    assert np.allclose(scores[..., 2].ravel(), -logodds, atol=1e-5)

    reward = CombinedReward(prep)
    got = reward.score([p + t for p, t in zip(batch.prompts, texts)], batch.prompts)
    assert np.allclose(got[:, 2], scores[..., 1].ravel(), atol=1e-5) and np.allclose(got[:, 3], scores[..., 2].ravel(), atol=1e-5)
