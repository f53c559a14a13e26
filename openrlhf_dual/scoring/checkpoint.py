"""Safe reads of a local HF checkpoint for the model-holding scorers: its config, the names of its
weights (safetensors, or torch.load with weights_only), and a refusal of remote code by default."""

from __future__ import annotations

import json
from pathlib import Path


def read_config(path: str | Path, trust_remote_code: bool) -> dict:
    config = json.loads((Path(path) / "config.json").read_text())
    if config.get("auto_map") and not trust_remote_code:
        raise ValueError(f"{path} ships its own model code (auto_map); add trust_remote_code=true to the source to run it")
    return config


def load_weights(path: str | Path) -> dict:
    """All tensors of a checkpoint directory: *.safetensors, else *.bin loaded weights-only."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(f).items()}
    files = sorted(path.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors or *.bin weights")
    return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}


def weight_names(path: str | Path) -> set[str]:
    """Tensor names without loading tensors where the format allows (safetensors headers)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return set(load_weights(path))
    names = set()
    for f in files:
        with safe_open(f, framework="pt") as handle:
            names |= set(handle.keys())
    return names
