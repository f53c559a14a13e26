"""Safe-RLHF score models, scored by Safe-RLHF's OWN code, recorded as numbers.

This file (ours) does two things:

1. `build(out_dir)`: tiny score-model checkpoints of every config variant Safe-RLHF writes, built
   deterministically (weights from a seeded numpy bit stream, a sentencepiece model assembled
   piece by piece, no training, no torch init), so the bytes are the same on any machine. The
   tokenizer ships as `tokenizer.model` only, with `<pad>` added at the end of the vocabulary
   (the beaver-7b-v1.0 layout). Kinds:
     v1              LlamaModelForScore (beaver v1.0), "bias": false
     v1_bias         LlamaModelForScore, "bias": true
     v1_bf16         LlamaModelForScore, weights and torch_dtype bfloat16
     v2_score_bias   LlamaForScore, "score_bias": true, no normaliser
     v2_reward       LlamaForScore, score_bias left to its default, do_normalize, score_type reward
     v2_cost         as v2_reward with score_type cost
     v2_critic       as v2_reward with score_type critic

2. `python tests/safe_rlhf_reference.py score OUT.json --v1 SRC_V1 --v2 SRC_V2`: scores CASES with
   Safe-RLHF's own `load_pretrained_models` + `AutoModelForScore` (`end_scores`), its own
   `format_prompt`, `TokenizedDataset.tokenize` and `right_padding`, exactly as its evaluation
   scripts feed a score model (model_max_length 512, right padding), and writes the token ids and
   scores of each kind to OUT.json (tests/fixtures/safe_rlhf_reference.json). Their code is never
   part of this repository; regenerate the fixture like this (outside the repository):

     git clone https://github.com/PKU-Alignment/safe-rlhf    # or the fork dbtmddn41/safe-completion
     git -C safe-rlhf archive 507b060 --prefix=v1/ | tar -x -C /tmp/src   # Aug 2023: LlamaModelForScore
     git -C safe-rlhf archive e8cca16 --prefix=v2/ | tar -x -C /tmp/src   # Jun 2024: LlamaForScore
     python -m venv /tmp/srl && /tmp/srl/bin/pip install torch==2.13.0 transformers==4.44.2 \
         sentencepiece protobuf safetensors numpy accelerate optree && DS_BUILD_OPS=0 /tmp/srl/bin/pip install \
         --no-build-isolation deepspeed==0.14.4
     /tmp/srl/bin/python tests/safe_rlhf_reference.py score tests/fixtures/safe_rlhf_reference.json \
         --v1 /tmp/src/v1 --v2 /tmp/src/v2

   Only `safe_rlhf.models` and `safe_rlhf.datasets.{base,utils}` are imported (their parent
   packages' __init__ files, which pull in trainers and dataset downloads, are skipped); the
   modules themselves run unmodified. Each kind is scored in its own process, with the era's code.
   tests/test_safe_rlhf_reference.py rebuilds the checkpoints, checks their bytes against the
   recorded hashes, and compares our scorer with the recorded token ids and scores.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

SEED = 20240613
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, POSITIONS = 32, 2, 4, 2, 64, 1024
MAX_LENGTH = 512  # Safe-RLHF's load_pretrained_models and evaluation default
PROMPT_WORDS = ["BEGINNING", "OF", "CONVERSATION", "USER", "ASSISTANT"]
WORDS = [
    "the", "a", "and", "to", "of", "is", "how", "do", "I", "you", "can", "make", "bread", "water", "flour",
    "help", "with", "that", "hurt", "someone", "not", "sorry", "safe", "kind", "word", "line", "one", "two",
    "tell", "me", "joke", "why", "did", "chicken", "cross", "road", "Hello", "How", "Tell", "Why", "Mix",
]  # fmt: skip
CHARS = [chr(c) for c in range(33, 127)]

KINDS = {
    "v1": {"architectures": ["LlamaModelForScore"], "bias": False},
    "v1_bias": {"architectures": ["LlamaModelForScore"], "bias": True},
    "v1_bf16": {"architectures": ["LlamaModelForScore"], "bias": False, "torch_dtype": "bfloat16"},
    "v2_score_bias": {"architectures": ["LlamaForScore"], "score_bias": True, "score_type": "reward"},
    **{
        f"v2_{t}": {"architectures": ["LlamaForScore"], "score_type": t, "do_normalize": True,
                    "normalizer_type": "ExponentialMovingAverage", "momentum": 0.9, "mean": [0.4], "var": [2.25]}
        for t in ("reward", "cost", "critic")
    },
}  # fmt: skip

LONG = " ".join(["the word"] * 300)
CASES = [
    ("How do I make bread?", " Mix flour and water."),
    ("", ""),
    ("Hello", ""),
    ("Tell me a joke.", "Why did the chicken cross the road?"),
    ("caf\u00e9 na\u00efve \u6771\u4eac", "\u00c7a va? \u00dcn\u00efc\u00f6d\u00e9 \u2713 \U0001f642"),
    ("tabs\tand\tnewlines\n", "line one\nline two\n\tindented\r\n"),
    ("  leading spaces", "trailing spaces   "),
    ("How can I hurt someone?", "Sorry, I can not help with that."),
    ("numbers 12345", "3.14159 and 2,718"),
    ("Tell me", LONG),  # past 512 tokens: right truncation drops the EOS
    (LONG[:40], "kind " * 3),
]


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Uniform(-scale, scale) from the generator's raw doubles (stable across numpy versions)."""
    return ((rng.random(shape) * 2.0 - 1.0) * scale).astype(np.float32)


def sentencepiece_model() -> bytes:
    """A Llama-style BPE sentencepiece model (byte fallback, dummy prefix, identity normaliser)
    assembled from fixed pieces: <unk> <s> </s>, 256 byte pieces, characters, '▁' + words."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    t = m.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.byte_fallback, t.unk_id, t.bos_id, t.eos_id, t.pad_id = True, 0, 1, 2, -1
    n = m.normalizer_spec
    n.name, n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces = "identity", True, False, True
    for piece, kind in (("<unk>", pb.ModelProto.SentencePiece.UNKNOWN), ("<s>", pb.ModelProto.SentencePiece.CONTROL),
                        ("</s>", pb.ModelProto.SentencePiece.CONTROL)):  # fmt: skip
        m.pieces.add(piece=piece, score=0.0, type=kind)
    for b in range(256):
        m.pieces.add(piece=f"<0x{b:02X}>", score=0.0, type=pb.ModelProto.SentencePiece.BYTE)
    pieces = ["\u2581", *CHARS]
    for word in PROMPT_WORDS + WORDS:  # every prefix of '▁word', so BPE merges can reach it
        pieces += ["\u2581" + word[:i] for i in range(1, len(word) + 1)]
    for i, piece in enumerate(dict.fromkeys(pieces)):
        m.pieces.add(piece=piece, score=-float(i), type=pb.ModelProto.SentencePiece.NORMAL)
    t.vocab_size = len(m.pieces)
    return m.SerializeToString()


def _llama_config(vocab: int, kind: dict) -> dict:
    cfg = {
        "model_type": "llama", "vocab_size": vocab, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": POSITIONS, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": None, "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
        "tie_word_embeddings": False, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": vocab - 1, "score_dim": 1, "torch_dtype": "float32",
    }  # fmt: skip
    cfg.update(kind)
    return cfg


def _weights(cfg: dict, head_bias: bool, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.Generator(np.random.PCG64(seed))
    h, kv = HIDDEN, HIDDEN // HEADS * KV_HEADS
    w = {"model.embed_tokens.weight": _uniform(rng, (cfg["vocab_size"], h), 1.0)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name, shape in [("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (INTERMEDIATE, h)),
                            ("mlp.up_proj", (INTERMEDIATE, h)), ("mlp.down_proj", (h, INTERMEDIATE))]:  # fmt: skip
            w[p + name + ".weight"] = _uniform(rng, shape, 0.3)
        w[p + "input_layernorm.weight"] = 1.0 + _uniform(rng, (h,), 0.2)
        w[p + "post_attention_layernorm.weight"] = 1.0 + _uniform(rng, (h,), 0.2)
    w["model.norm.weight"] = 1.0 + _uniform(rng, (h,), 0.2)
    w["score_head.weight"] = _uniform(rng, (1, h), 0.5)
    if head_bias:
        w["score_head.bias"] = np.array([0.75], dtype=np.float32)
    return w


def head_has_bias(cfg: dict) -> bool:
    """Safe-RLHF's rule: v1 reads config.bias (default False), v2 config.score_bias (default True)."""
    if "LlamaModelForScore" in cfg["architectures"]:
        return bool(cfg.get("bias", False))
    return bool(cfg.get("score_bias", True))


def build_one(out: Path, name: str) -> Path:
    """One checkpoint of KINDS[name] in out/name; returns its directory."""
    import torch
    from safetensors.torch import save_file

    path = Path(out) / name
    path.mkdir(parents=True, exist_ok=True)
    spm = sentencepiece_model()
    (path / "tokenizer.model").write_bytes(spm)
    from sentencepiece import sentencepiece_model_pb2 as pb

    vocab = len(pb.ModelProto.FromString(spm).pieces) + 1  # + <pad>
    cfg = _llama_config(vocab, KINDS[name])
    dtype = torch.bfloat16 if cfg["torch_dtype"] == "bfloat16" else torch.float32
    seed = SEED + sorted(KINDS).index(name)
    tensors = {k: torch.from_numpy(v).to(dtype) for k, v in _weights(cfg, head_has_bias(cfg), seed).items()}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (path / "added_tokens.json").write_text(json.dumps({"<pad>": vocab - 1}))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {**special, "tokenizer_class": "LlamaTokenizer", "model_max_length": MAX_LENGTH, "padding_side": "right",
         "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False}, indent=2))  # fmt: skip
    return path


def build(out: str | Path) -> dict[str, Path]:
    return {name: build_one(Path(out), name) for name in KINDS}


def file_hashes(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(path).iterdir())}


# ---- Safe-RLHF's own code (run in a throwaway venv with transformers 4.44; see the module docstring) ----


def _import_theirs(src: Path):
    """Safe-RLHF's modules from a source checkout, skipping the package __init__ files above them."""
    import importlib
    import types

    sys.path.insert(0, str(src))
    for pkg in ("safe_rlhf", "safe_rlhf.datasets"):
        module = types.ModuleType(pkg)
        module.__path__ = [str(src / pkg.replace(".", "/"))]
        sys.modules[pkg] = module
    models = importlib.import_module("safe_rlhf.models")
    base = importlib.import_module("safe_rlhf.datasets.base")
    utils = importlib.import_module("safe_rlhf.datasets.utils")
    return models, base, utils


def score_with_their_code(path: Path, src: Path, dtype: str | None) -> dict:
    """Token ids and end_scores of CASES, from Safe-RLHF's code at `src`."""
    import types

    import torch

    models, base, utils = _import_theirs(src)
    kwargs = {} if dtype is None else {"dtype": getattr(torch, dtype)}
    model, tokenizer = models.load_pretrained_models(str(path), model_max_length=MAX_LENGTH, padding_side="right",
                                                     auto_model_type=models.AutoModelForScore, **kwargs)  # fmt: skip
    model.eval()
    holder = types.SimpleNamespace(tokenizer=tokenizer)
    ids = [base.TokenizedDataset.tokenize(holder, utils.format_prompt(input=p, eos_token=tokenizer.eos_token)
                                          + r + tokenizer.eos_token) for p, r in CASES]  # fmt: skip
    scores = []
    with torch.no_grad():
        for i in range(0, len(ids), 4):  # batches of mixed lengths, right padded as their collators do
            chunk = ids[i : i + 4]
            input_ids = utils.right_padding(chunk, padding_value=tokenizer.pad_token_id)
            mask = utils.right_padding([x.new_ones(x.size(), dtype=torch.bool) for x in chunk], padding_value=0)
            scores += model(input_ids, attention_mask=mask).end_scores[:, 0].double().tolist()
    return {"ids": [x.tolist() for x in ids], "scores": scores, "dtype": str(next(model.parameters()).dtype)}


def _main(argv: list[str]) -> None:
    import argparse
    import subprocess
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["score", "one"])
    parser.add_argument("out")
    parser.add_argument("--v1", type=Path)
    parser.add_argument("--v2", type=Path)
    parser.add_argument("--kind")
    parser.add_argument("--src", type=Path)
    parser.add_argument("--dtype")
    args = parser.parse_args(argv)
    if args.mode == "one":  # one kind, one dtype, in a fresh process (their code for one era)
        out = score_with_their_code(Path(args.out), args.src, args.dtype)
        print(json.dumps(out))
        return
    import transformers

    record = {"safe_rlhf_commits": {"v1": "507b06095b22c8b7c5348963fd96581de2e5d215",
                                    "v2": "e8cca16665ef2340ac92c6514f05519310251581"},
              "transformers": transformers.__version__, "max_length": MAX_LENGTH, "cases": CASES, "ids": None,
              "kinds": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in build(tmp).items():
            src = args.v1 if name.startswith("v1") else args.v2
            entry = {"files": file_hashes(path), "scores": {}}
            for dtype in ["auto", "float32"] if name == "v1_bf16" else ["auto"]:
                proc = subprocess.run([sys.executable, __file__, "one", str(path), "--src", str(src)]
                                      + (["--dtype", dtype] if dtype != "auto" else []),
                                      check=True, capture_output=True, text=True)  # fmt: skip
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                if record["ids"] is None:
                    record["ids"] = got["ids"]
                assert got["ids"] == record["ids"], f"{name}: token ids differ between kinds"
                entry["scores"][dtype] = got["scores"]
                entry.setdefault("dtypes", {})[dtype] = got["dtype"]
            record["kinds"][name] = entry
            print(name, entry["scores"], file=sys.stderr)
    Path(args.out).write_text(json.dumps(record, indent=1, ensure_ascii=True) + "\n")


if __name__ == "__main__":
    _main(sys.argv[1:])
