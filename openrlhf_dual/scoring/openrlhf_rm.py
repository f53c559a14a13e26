"""An OpenRLHF reward-model checkpoint (as `openrlhf.cli.train_rm` writes it), scored by OpenRLHF's
own reward-model class (the one `get_llm_for_sequence_regression` builds), with its traps closed:
- the normalisation buffers (mean/std) come back uninitialised after from_pretrained with
  transformers 5.15: they are restored from the checkpoint's config.json;
- a head saved under another name would load silently with a random head: the checkpoint must
  hold `{value_head_prefix}.weight`, else a clear error; any other missing weight is an error too.
dtype: the checkpoint's own (`dtype=` overrides; OpenRLHF's loader only knows bf16/fp16), weights
read straight into it. Canonical text: prompt + response, tokenised like serve_rm (no special
tokens added, left padded, truncated to max_len); the score is read at the last attended token.
"""

from __future__ import annotations

import numpy as np

from openrlhf_dual.scoring.batch import ScoreBatch
from openrlhf_dual.scoring.checkpoint import read_config, torch_dtype, weight_names


class OpenRLHFRewardScorer:
    def __init__(
        self,
        path: str,
        *,
        device: str = "cpu",
        batch_size: int = 16,
        max_len: int = 2048,
        dtype: str = "auto",
        normalize: bool = True,
        value_head_prefix: str | None = None,
        trust_remote_code: bool = False,
    ):
        import torch
        from openrlhf.models.model import _get_reward_model
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        config_dict = read_config(path, trust_remote_code)
        head = value_head_prefix or config_dict.get("value_head_prefix", "score")
        names = weight_names(path)
        if f"{head}.weight" not in names:
            heads = sorted(n for n in names if not n.startswith(("model.", "transformer.", "gpt_neox.")))
            raise ValueError(
                f"{path}: no reward head '{head}.weight' in the checkpoint (other top-level weights: {heads[:8]}); "
                "it would load with a random head. Pass value_head_prefix=<name> in the source spec."
            )
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        config.normalize_reward = normalize
        base = AutoModel._model_mapping[type(config)]
        model, info = _get_reward_model(base.__base__, base, head).from_pretrained(
            path, config=config, dtype=torch_dtype(dtype), device_map={"": device}, output_loading_info=True,
            trust_remote_code=trust_remote_code, attn_implementation="eager" if device == "cpu" else "sdpa",
        )  # fmt: skip
        if info["missing_keys"]:
            raise ValueError(f"{path}: weights missing from the checkpoint: {sorted(info['missing_keys'])[:5]}")
        with torch.no_grad():  # restore what from_pretrained leaves uninitialised
            model.mean.fill_(float(config_dict.get("mean", 0.0)))
            model.std.fill_(float(config_dict.get("std", 1.0)))
        self.model = model.eval()
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
