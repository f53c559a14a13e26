"""Any transformers sequence-classification checkpoint (toxicity or harm classifiers) as a score
source: `classifier:PATH,label=NAME[,output=logodds|logprob][,text=response|pair]`.

Score: the named label's log-odds log(p / (1 - p)) (default) or log-probability log p, in nats,
where p is the softmax over the labels, or the label's own sigmoid for multi-label classifiers
(`problem_type: multi_label_classification`, or a single logit), as transformers' pipelines read
them. A label that means harm (e.g. "toxic") is a cost: declare sign=-1.

Text: the classifier's own tokenizer with its own special tokens, on the response alone
(`text=response`, default: what most toxicity classifiers were trained on) or on the user's raw
prompt and the response as a text pair (`text=pair`: [CLS] prompt [SEP] response [SEP] for
BERT-style models), truncated at `max_len` (default: the tokenizer's model_max_length, capped by
the model's positions). dtype: the checkpoint's own unless `dtype=`.
"""

from __future__ import annotations

import numpy as np

from openrlhf_dual.scoring.batch import ScoreBatch
from openrlhf_dual.scoring.checkpoint import read_config, torch_dtype

OUTPUTS = ("logodds", "logprob")
TEXTS = ("response", "pair")


class ClassifierScorer:
    def __init__(self, path: str, *, label: str | None, output: str = "logodds", text: str = "response",
                 device: str = "cpu", batch_size: int = 16, max_len: int | None = None, dtype: str = "auto",
                 trust_remote_code: bool = False):  # fmt: skip
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if output not in OUTPUTS or text not in TEXTS:
            raise ValueError(f"{path}: output must be one of {OUTPUTS} and text one of {TEXTS}, got {output}, {text}")
        config = read_config(path, trust_remote_code)
        labels = {name: int(i) for i, name in (config.get("id2label") or {}).items()}
        if label not in labels:
            raise ValueError(f"{path}: label={label} is not one of this classifier's labels {sorted(labels)}")
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch_dtype(dtype), device_map={"": device}, trust_remote_code=trust_remote_code,
        ).eval()  # fmt: skip
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        positions = getattr(self.model.config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        self.max_len = max_len or min(self.tokenizer.model_max_length, positions)
        n = self.model.config.num_labels
        self.sigmoid = n == 1 or self.model.config.problem_type == "multi_label_classification"
        self.index, self.output, self.text = labels[label], output, text
        # without a pad token a decoder classifier cannot find each row's last token: one row at a time
        self.batch_size = batch_size if self.tokenizer.pad_token is not None else 1
        self.device, self.torch = device, torch

    def score(self, batch: ScoreBatch) -> np.ndarray:
        torch, out = self.torch, []
        with torch.no_grad():
            for i in range(0, len(batch), self.batch_size):
                responses = batch.responses[i : i + self.batch_size]
                args = (batch.raw_prompts[i : i + self.batch_size], responses) if self.text == "pair" else (responses,)
                enc = self.tokenizer(*args, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
                logits = self.model(**enc.to(self.device)).logits.double()
                out.append(self.label_score(logits).cpu().numpy())
        return np.concatenate(out)

    def label_score(self, logits):
        """[B, num_labels] logits -> [B] log-odds or log-probability of the label."""
        torch, own = self.torch, logits[:, self.index]
        if self.sigmoid:
            return own if self.output == "logodds" else torch.nn.functional.logsigmoid(own)
        logp = torch.log_softmax(logits, dim=-1)[:, self.index]
        if self.output == "logprob":
            return logp
        others = torch.cat([logits[:, : self.index], logits[:, self.index + 1 :]], dim=-1)
        return own - torch.logsumexp(others, dim=-1)
