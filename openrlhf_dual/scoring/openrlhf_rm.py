"""An OpenRLHF reward-model checkpoint (as `openrlhf.cli.train_rm` writes it), loaded with
OpenRLHF's own `get_llm_for_sequence_regression`, with its two traps closed:
- the normalisation buffers (mean/std) come back uninitialised after from_pretrained with
  transformers 5.15: they are restored from the checkpoint's config.json;
- a head saved under another name would load silently with a random head: the checkpoint must
  hold `{value_head_prefix}.weight`, else a clear error.
Canonical text: prompt + response, tokenised like serve_rm (no special tokens added, left padded,
truncated to max_len); the score is read at the last attended token.
"""

from __future__ import annotations

import numpy as np

from openrlhf_dual.scoring.batch import ScoreBatch
from openrlhf_dual.scoring.checkpoint import read_config, weight_names


class OpenRLHFRewardScorer:
    def __init__(
        self,
        path: str,
        *,
        device: str = "cpu",
        batch_size: int = 16,
        max_len: int = 2048,
        normalize: bool = True,
        value_head_prefix: str | None = None,
        trust_remote_code: bool = False,
    ):
        import torch
        from openrlhf.models import get_llm_for_sequence_regression
        from transformers import AutoTokenizer

        config = read_config(path, trust_remote_code)
        head = value_head_prefix or config.get("value_head_prefix", "score")
        names = weight_names(path)
        if f"{head}.weight" not in names:
            heads = sorted(n for n in names if not n.startswith(("model.", "transformer.", "gpt_neox.")))
            raise ValueError(
                f"{path}: no reward head '{head}.weight' in the checkpoint (other top-level weights: {heads[:8]}); "
                "it would load with a random head. Pass value_head_prefix=<name> in the source spec."
            )
        model = get_llm_for_sequence_regression(
            path, "reward", normalize_reward=normalize, value_head_prefix=head,
            attn_implementation="eager" if device == "cpu" else "sdpa",
        )  # fmt: skip
        if device == "cpu":
            model = model.float()
        with torch.no_grad():  # restore what from_pretrained leaves uninitialised
            model.mean.fill_(float(config.get("mean", 0.0)))
            model.std.fill_(float(config.get("std", 1.0)))
        self.model = model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device, self.batch_size, self.max_len, self.torch = device, batch_size, max_len, torch

    def score(self, batch: ScoreBatch) -> np.ndarray:
        queries, out = batch.queries, []
        with self.torch.no_grad():
            for i in range(0, len(queries), self.batch_size):
                enc = self.tokenizer(
                    queries[i : i + self.batch_size], add_special_tokens=False, padding=True, truncation=True,
                    max_length=self.max_len, return_tensors="pt",
                ).to(self.device)  # fmt: skip
                out.append(self.model(enc["input_ids"], enc["attention_mask"]).double().cpu().numpy())
        return np.concatenate(out)
