"""A Safe-RLHF score model (the beaver-7b-v1.0-reward / -cost format), read without the
`safe-rlhf` package: a LlamaModel under `model.*` and `score_head` (Linear hidden -> 1, with a
bias when the checkpoint has one: absolute thresholds depend on it), scored at the last token.

Config variants: architectures "LlamaModelForScore" (v1.0, no normaliser) or "LlamaForScore";
later configs carry `do_normalize` with `mean`/`var` lists (or `mean`/`std`), applied as
(score - mean[0]) / sqrt(var[0]). Canonical text: BOS + "BEGINNING OF CONVERSATION: USER:
{raw prompt} ASSISTANT:" + response + EOS, with the checkpoint's own tokenizer.
"""

from __future__ import annotations

import math

import numpy as np

from openrlhf_dual.scoring.batch import ScoreBatch
from openrlhf_dual.scoring.checkpoint import load_weights, read_config

PROMPT = "BEGINNING OF CONVERSATION: USER: {} ASSISTANT:"
ARCHITECTURES = ("LlamaModelForScore", "LlamaForScore")


def normaliser(config: dict) -> tuple[float, float]:
    """(mean, std) the score is normalised with; (0, 1) when the config asks for none."""
    if not config.get("do_normalize", False):
        return 0.0, 1.0
    first = lambda v: float(v[0] if isinstance(v, (list, tuple)) else v)  # noqa: E731
    mean = first(config.get("mean", 0.0))
    std = first(config["std"]) if "std" in config else math.sqrt(first(config.get("var", 1.0)))
    return mean, std


class SafeRLHFScorer:
    def __init__(self, path: str, *, device: str = "cpu", batch_size: int = 16, max_len: int = 2048,
                 trust_remote_code: bool = False):  # fmt: skip
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaModel

        config = read_config(path, trust_remote_code)
        if not set(config.get("architectures") or []) & set(ARCHITECTURES):
            raise ValueError(f"{path}: architectures {config.get('architectures')} is not a Safe-RLHF score model")
        weights = load_weights(path)
        if "score_head.weight" not in weights:
            raise ValueError(f"{path}: no score_head.weight in the checkpoint; refusing to score with a random head")
        has_bias = "score_head.bias" in weights
        if config.get("bias", False) and not has_bias:
            raise ValueError(f"{path}: config says the score head has a bias but score_head.bias is missing")
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        backbone = LlamaModel(LlamaConfig.from_pretrained(path))
        head = torch.nn.Linear(backbone.config.hidden_size, weights["score_head.weight"].shape[0], bias=has_bias)
        prefix = "model."
        missing, unexpected = backbone.load_state_dict(
            {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}, strict=False
        )
        if missing:
            raise ValueError(f"{path}: backbone weights missing: {missing[:5]}")
        head.load_state_dict({k.split(".", 1)[1]: v for k, v in weights.items() if k.startswith("score_head.")})
        self.backbone = backbone.to(device=device, dtype=dtype).eval()
        self.head = head.to(device=device, dtype=dtype).eval()
        self.mean, self.std = normaliser(config)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.device, self.batch_size, self.max_len, self.torch = device, batch_size, max_len, torch

    def _ids(self, raw_prompt: str, response: str) -> list[int]:
        tok = self.tokenizer
        ids = tok(PROMPT.format(raw_prompt) + response, add_special_tokens=False)["input_ids"][: self.max_len - 2]
        return [tok.bos_token_id, *ids, tok.eos_token_id]

    def score(self, batch: ScoreBatch) -> np.ndarray:
        torch, out = self.torch, []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        with torch.no_grad():
            for i in range(0, len(batch), self.batch_size):
                seqs = [self._ids(p, r) for p, r in zip(batch.raw_prompts[i : i + self.batch_size],
                                                       batch.responses[i : i + self.batch_size])]  # fmt: skip
                lengths = torch.tensor([len(s) for s in seqs], device=self.device)
                ids = torch.full((len(seqs), int(lengths.max())), pad, device=self.device)
                for row, s in enumerate(seqs):
                    ids[row, : len(s)] = torch.tensor(s)
                mask = (torch.arange(ids.shape[1], device=self.device)[None] < lengths[:, None]).long()
                hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
                last = hidden[torch.arange(len(seqs)), lengths - 1]  # right padded: the last real token
                out.append(self.head(last)[:, 0].double().cpu().numpy())
        return (np.concatenate(out) - self.mean) / self.std
