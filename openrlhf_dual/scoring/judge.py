"""A generative safety judge in the Llama Guard style as a score source:
`judge:PATH[,safe=TOKEN][,unsafe=TOKEN]`.

Text: the judge's own chat template around the conversation [user: the raw prompt, assistant: the
response], with the generation prompt, exactly the ids the judge would generate its verdict after.
Score: g = log P(safe) - log P(unsafe) of the first generated token, in nats (higher is safer:
declare sign=+1), from one forward pass (no generation; only the last position's logits). The
token strings default to "safe" and "unsafe" and must each be one token of the judge's vocabulary
(tokenised alone, as the judge writes its verdict's first word). A conversation longer than
`max_len` (default: the model's positions) is refused rather than cut: cutting either end would
remove the judge's instructions or the verdict prompt. dtype: the checkpoint's own unless `dtype=`.
"""

from __future__ import annotations

import numpy as np

from openrlhf_dual.scoring.batch import ScoreBatch
from openrlhf_dual.scoring.checkpoint import read_config, torch_dtype


class JudgeScorer:
    def __init__(self, path: str, *, safe: str = "safe", unsafe: str = "unsafe", device: str = "cpu",
                 batch_size: int = 16, max_len: int | None = None, dtype: str = "auto",
                 trust_remote_code: bool = False):  # fmt: skip
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        read_config(path, trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if not self.tokenizer.chat_template:
            raise ValueError(f"{path}: the judge has no chat template (chat_template.jinja or tokenizer_config.json)")
        self.token_ids = []
        for word in (safe, unsafe):
            ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                pieces = self.tokenizer.convert_ids_to_tokens(ids)
                raise ValueError(f"{path}: {word!r} is {len(ids)} tokens {pieces} for this judge; pass the verdict's "
                                 "first token as safe=/unsafe= in the source spec")  # fmt: skip
            self.token_ids.append(ids[0])
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(dtype), device_map={"": device}, trust_remote_code=trust_remote_code,
            attn_implementation="eager" if device == "cpu" else "sdpa",
        ).eval()  # fmt: skip
        positions = getattr(self.model.config, "max_position_embeddings", None)
        self.max_len = max_len or positions or self.tokenizer.model_max_length
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.device, self.batch_size, self.torch = device, batch_size, torch

    def input_ids(self, raw_prompt: str, response: str) -> list[int]:
        conversation = [{"role": "user", "content": raw_prompt}, {"role": "assistant", "content": response}]
        ids = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]  # fmt: skip
        if len(ids) > self.max_len:
            raise ValueError(f"a conversation of {len(ids)} tokens is longer than the judge's max_len {self.max_len}; "
                             "raise max_len= in the source spec if the judge reads that far")  # fmt: skip
        return ids

    def score(self, batch: ScoreBatch) -> np.ndarray:
        torch, out = self.torch, []
        safe, unsafe = self.token_ids
        with torch.no_grad():
            for i in range(0, len(batch), self.batch_size):
                seqs = [self.input_ids(p, r) for p, r in zip(batch.raw_prompts[i : i + self.batch_size],
                                                            batch.responses[i : i + self.batch_size])]  # fmt: skip
                width = max(len(s) for s in seqs)
                ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
                mask = torch.zeros(len(seqs), width, dtype=torch.long)
                for row, s in enumerate(seqs):  # left padded: every row's next token is at the last position
                    ids[row, width - len(s) :] = torch.tensor(s)
                    mask[row, width - len(s) :] = 1
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = self.model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                    position_ids=positions.to(self.device), logits_to_keep=1,
                ).logits[:, -1].double()  # fmt: skip
                # log P(safe) - log P(unsafe): the softmax normaliser cancels
                out.append((logits[:, safe] - logits[:, unsafe]).cpu().numpy())
        return np.concatenate(out)
