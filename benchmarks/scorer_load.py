"""Peak host memory of loading a scorer, against the checkpoint's bytes on disk, measured side by
side in one run: our loaders (weights read straight into the checkpoint's dtype, no random init)
and the previous loader (the full model built in fp32 with random init, then the weights loaded
into it), each in a fresh process.

    python benchmarks/scorer_load.py [--hidden 1024] [--layers 8] [--vocab 32000] [--device cuda]

The checkpoints are Llama score models in bf16 built in-process (the beaver-7b-v1.0 layout: a
Safe-RLHF `LlamaModelForScore`, and an OpenRLHF reward model with the same backbone), ~270 MB at
the defaults. Peak RSS is the process's ru_maxrss minus its RSS after the imports (the interpreter
and libraries do not count), after loading and after a first scoring call (which makes every
memory-mapped weight resident); target: <= 1.5x the checkpoint's bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys
import torch, transformers
from transformers import AutoModel, LlamaConfig, LlamaModel  # imported before the baseline
from openrlhf_dual.scoring import build_scorer, parse_source
mode, path, device = sys.argv[1:4]
if mode == "rm":
    import openrlhf.models.model
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
base = rss_mb()
if mode == "previous":  # the loader before: LlamaModel(config) in fp32 with random init, then all weights
    from openrlhf_dual.scoring.checkpoint import read_tensors, weight_names
    weights = read_tensors(path, sorted(weight_names(path)))
    model = LlamaModel(LlamaConfig.from_pretrained(path))
    model.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("model.")}, strict=False)
    model = model.to(device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
else:
    scorer = build_scorer(parse_source(mode + ":" + path), device=device)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if mode != "previous":  # one scoring call: every weight is read (a memory-mapped one becomes resident)
    from openrlhf_dual.scoring import ScoreBatch
    scorer.score(ScoreBatch(["hello"], ["hello"], ["world"]))
else:
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]], device=device))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
print("RESULT " + json.dumps({"base_mb": base, "loaded_mb": loaded, "peak_mb": peak, "gpu_mb": gpu}))
"""


def build(path: Path, hidden: int, layers: int, vocab: int) -> tuple[Path, Path]:
    """A Safe-RLHF v1 score model and an OpenRLHF reward model, bf16, from one random backbone."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    inter, h = 4 * hidden, hidden
    shapes = {"embed_tokens.weight": (vocab, h), "norm.weight": (h,)}
    for i in range(layers):
        for name, shape in [("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (h, h)), ("self_attn.v_proj", (h, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
                            ("mlp.down_proj", (h, inter)), ("input_layernorm", (h,)), ("post_attention_layernorm", (h,))]:  # fmt: skip
            shapes[f"layers.{i}.{name}" + ("" if name.endswith("weight") else ".weight")] = shape
    backbone = {f"model.{k}": torch.from_numpy(rng.standard_normal(s, dtype=np.float32) * 0.02).to(torch.bfloat16)
                for k, s in shapes.items()}  # fmt: skip
    cfg = {"model_type": "llama", "vocab_size": vocab, "hidden_size": h, "intermediate_size": inter,
           "num_hidden_layers": layers, "num_attention_heads": max(1, h // 64), "num_key_value_heads": max(1, h // 64),
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}  # fmt: skip
    head = torch.from_numpy(rng.standard_normal((1, h), dtype=np.float32)).to(torch.bfloat16)
    out = []
    for name, arch, head_name, extra in [("safe_rlhf", "LlamaModelForScore", "score_head", {"bias": False, "score_dim": 1}),
                                         ("rm", "LlamaForSequenceClassification", "score", {})]:  # fmt: skip
        d = path / name
        d.mkdir(parents=True)
        save_file({**backbone, f"{head_name}.weight": head}, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({**cfg, "architectures": [arch], **extra}))
        _tokenizer(d)
        out.append(d)
    return out[0], out[1]


def _tokenizer(path: Path) -> None:
    from openrlhf_dual.tiny import build_tokenizer

    build_tokenizer(path, ["hello", "world"])


def measure(mode: str, path: Path, device: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), device], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--device", default="cpu", help="cpu, or cuda: weights go straight to the GPU")
    p.add_argument("--kinds", nargs="+", default=["safe_rlhf", "rm", "previous"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        safe, rm = build(Path(tmp), args.hidden, args.layers, args.vocab)
        size_mb = (safe / "model.safetensors").stat().st_size / 2**20
        print(f"checkpoint: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, bf16, {size_mb:.0f} MB; "
              f"loading to {args.device}")  # fmt: skip
        print(f"{'loader':30s} {'peak host RSS over imports: loaded':>35s} {'/ checkpoint':>13s} "
              f"{'after a first score':>20s} {'/ checkpoint':>13s} {'GPU peak':>9s}")  # fmt: skip
        labels = {"safe_rlhf": "safe_rlhf: (ours)", "rm": "rm: (ours)", "previous": "previous (fp32 init + load)"}
        for mode in args.kinds:
            r = measure(mode, rm if mode == "rm" else safe, args.device)
            loaded, used = r["loaded_mb"] - r["base_mb"], r["peak_mb"] - r["base_mb"]
            print(f"{labels[mode]:30s} {loaded:32.0f} MB {loaded / size_mb:12.2f}x {used:17.0f} MB {used / size_mb:12.2f}x "
                  f"{r['gpu_mb']:6.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
