"""Safe reads of a local HF checkpoint for the model-holding scorers: its config (refusing remote
code by default), the names and a few tensors of its weights without loading the rest
(safetensors headers, or torch.load weights-only and memory-mapped), and the compute dtype."""

from __future__ import annotations

import json
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")


def read_config(path: str | Path, trust_remote_code: bool) -> dict:
    config = json.loads((Path(path) / "config.json").read_text())
    if config.get("auto_map") and not trust_remote_code:
        raise ValueError(f"{path} ships its own model code (auto_map); add trust_remote_code=true to the source to run it")
    return config


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors or *.bin weights")
    return files


def _bin(file: Path) -> dict:
    import torch

    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def weight_names(path: str | Path) -> set[str]:
    """Tensor names, without reading tensors (safetensors headers; .bin files memory-mapped)."""
    from safetensors import safe_open

    names = set()
    for f in _weight_files(Path(path)):
        if f.suffix == ".safetensors":
            with safe_open(f, framework="pt") as handle:
                names |= set(handle.keys())
        else:
            names |= set(_bin(f))
    return names


def read_tensors(path: str | Path, names: list[str]) -> dict:
    """The named tensors (e.g. a score head) and nothing else of the checkpoint."""
    from safetensors import safe_open

    out = {}
    for f in _weight_files(Path(path)):
        if f.suffix == ".safetensors":
            with safe_open(f, framework="pt") as handle:
                out.update({n: handle.get_tensor(n) for n in names if n in handle.keys()})
        else:
            tensors = _bin(f)
            out.update({n: tensors[n].clone() for n in names if n in tensors})
    return out


def torch_dtype(name: str):
    """`auto` (the checkpoint's own dtype, as from_pretrained reads it) or a torch dtype by name."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype={name}: expected one of {', '.join(DTYPES)}")
    return "auto" if name == "auto" else getattr(torch, name)
