"""A Safe-RLHF score model (the beaver-7b-v1.0-reward / -cost format), scored as Safe-RLHF's own
code scores it, without the `safe-rlhf` package: the backbone (AutoModel: a LlamaModel under
`model.*` for the beaver models) and `score_head` (Linear hidden -> 1), read at the last token.
Checked against Safe-RLHF's code at commits 507b060 and e8cca16 (tests/test_safe_rlhf_reference.py).

- Head bias: v1.0-era `LlamaModelForScore` configs decide by `bias` (default false); later
  `*ForScore` configs by `score_bias` (default true). A bias is kept: absolute thresholds depend on it.
- Normaliser (later configs, when `do_normalize`; the `normalize` option overrides it, like
  Safe-RLHF's --normalize_reward/--normalize_cost): by `score_type`, reward (x - mean) / std,
  cost x / std (no mean), critic unchanged; std = sqrt(var[0]) + 1e-8, in float32.
- Text: the checkpoint's own tokenizer on "BEGINNING OF CONVERSATION: USER: {raw prompt}
  ASSISTANT:" + response + EOS, special tokens added (BOS), truncated on the right at `max_len`
  (512, Safe-RLHF's default and its evaluation's), so a truncated text has no EOS.
- dtype: the checkpoint's own (`torch_dtype` in config.json), as Safe-RLHF loads it; `dtype=`
  overrides. Weights are read straight into that dtype (no fp32 copy, no random init).
"""

from __future__ import annotations

import logging

import numpy as np

from openrlhf_dual.scoring.batch import ScoreBatch
from openrlhf_dual.scoring.checkpoint import read_config, read_tensors, torch_dtype, weight_names

PROMPT = "BEGINNING OF CONVERSATION: USER: {} ASSISTANT:"
V1_ARCHITECTURES = ("LlamaModelForScore", "BloomModelForScore")
V2_ARCHITECTURES = (
    "LlamaForScore", "BloomForScore", "GemmaForScore", "GPTNeoForScore", "GPTNeoXForScore", "GPT2ForScore",
    "GPTJForScore", "MistralForScore", "OPTForScore", "PhiForScore", "Qwen2ForScore",
)  # fmt: skip
NORMALIZE = {"reward": "affine", "cost": "scale", "critic": "identity"}


def head_bias(config: dict) -> bool:
    """Whether Safe-RLHF builds the score head with a bias for this config."""
    if set(config.get("architectures") or []) & set(V1_ARCHITECTURES):
        return bool(config.get("bias", False))
    return bool(config.get("score_bias", True))


def normaliser(config: dict, normalize: bool | None = None) -> tuple[float, float | None]:
    """(shift, var): Safe-RLHF's end score is (x - shift) / (sqrt(var) + 1e-8), or x when var is None."""
    if not (config.get("do_normalize", False) if normalize is None else normalize):
        return 0.0, None
    if set(config.get("architectures") or []) & set(V1_ARCHITECTURES):
        raise ValueError(f"{config['architectures']} (Safe-RLHF v1.0) has no normaliser; drop normalize=true")
    kind = NORMALIZE.get(config.get("score_type", "reward"))
    if kind is None:
        raise ValueError(f"score_type {config.get('score_type')!r}: expected one of {', '.join(NORMALIZE)}")
    mean, var = config.get("mean") or [0.0], config.get("var") or [1.0]
    if len(mean) != 1 or len(var) != 1:
        raise ValueError(f"score_dim {len(mean)}: only one score per text is supported")
    if kind == "identity":
        return 0.0, None
    return (float(mean[0]) if kind == "affine" else 0.0), float(var[0])


def _no_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


class SafeRLHFScorer:
    def __init__(self, path: str, *, device: str = "cpu", batch_size: int = 16, max_len: int = 512, dtype: str = "auto",
                 normalize: bool | None = None, trust_remote_code: bool = False):  # fmt: skip
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        config = read_config(path, trust_remote_code)
        if not set(config.get("architectures") or []) & set(V1_ARCHITECTURES + V2_ARCHITECTURES):
            raise ValueError(f"{path}: architectures {config.get('architectures')} is not a Safe-RLHF score model")
        names = weight_names(path)
        if "score_head.weight" not in names:
            raise ValueError(f"{path}: no score_head.weight in the checkpoint; refusing to score with a random head")
        has_bias = head_bias(config)
        if has_bias != ("score_head.bias" in names):
            raise ValueError(f"{path}: config says the score head has {'a' if has_bias else 'no'} bias but the weights "
                             f"{'lack' if has_bias else 'hold'} score_head.bias")  # fmt: skip
        # transformers' load report lists score_head.* as unexpected for the backbone: expected here
        # (the head is read below; missing backbone weights are refused), so that report is left out
        report = hf_logging.get_logger("transformers.modeling_utils")
        report.addFilter(_no_load_report)
        try:
            self.backbone, info = AutoModel.from_pretrained(
                path, dtype=torch_dtype(dtype), device_map={"": device}, output_loading_info=True,
                trust_remote_code=trust_remote_code, attn_implementation="eager" if device == "cpu" else "sdpa",
            )  # fmt: skip
        finally:
            report.removeFilter(_no_load_report)
        if info["missing_keys"]:
            raise ValueError(f"{path}: backbone weights missing: {sorted(info['missing_keys'])[:5]}")
        self.backbone.eval()
        head = read_tensors(path, ["score_head.weight", "score_head.bias"])
        compute = next(self.backbone.parameters()).dtype
        self.head_weight = head["score_head.weight"].to(device=device, dtype=compute)
        self.head_bias = head["score_head.bias"].to(device=device, dtype=compute) if has_bias else None
        shift, var = normaliser(config, normalize)
        # float32, as Safe-RLHF's Normalizer buffers
        self.shift = torch.tensor(shift, dtype=torch.float32, device=device)
        self.std = None if var is None else torch.tensor(var, dtype=torch.float32, device=device).sqrt() + 1e-8
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.device, self.batch_size, self.max_len, self.torch = device, batch_size, max_len, torch

    def input_ids(self, raw_prompt: str, response: str) -> list[int]:
        """The ids Safe-RLHF feeds its score model for one conversation turn."""
        tok = self.tokenizer
        text = PROMPT.format(raw_prompt) + response + tok.eos_token
        return tok(text, add_special_tokens=True, truncation=True, max_length=self.max_len)["input_ids"]

    def score(self, batch: ScoreBatch) -> np.ndarray:
        torch, out = self.torch, []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        with torch.no_grad():
            for i in range(0, len(batch), self.batch_size):
                seqs = [self.input_ids(p, r) for p, r in zip(batch.raw_prompts[i : i + self.batch_size],
                                                            batch.responses[i : i + self.batch_size])]  # fmt: skip
                lengths = torch.tensor([len(s) for s in seqs], device=self.device)
                ids = torch.full((len(seqs), int(lengths.max())), pad, device=self.device)
                for row, s in enumerate(seqs):
                    ids[row, : len(s)] = torch.tensor(s)
                mask = (torch.arange(ids.shape[1], device=self.device)[None] < lengths[:, None]).long()
                hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
                last = hidden[torch.arange(len(seqs)), lengths - 1]  # right padded: the last real token
                end = torch.nn.functional.linear(last, self.head_weight, self.head_bias)[:, 0].float()
                if self.std is not None:
                    end = (end - self.shift) / self.std
                out.append(end.double().cpu().numpy())
        return np.concatenate(out)
