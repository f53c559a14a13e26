"""Sequence log-probabilities of given token ids under one causal LM (PeCAN's implicit rewards,
evaluation's KL estimates).

log pi(y | x) = sum over the response tokens y_t (EOS included when generated) of log pi(y_t | x,
y_<t), the sum DPO's trainer uses. Inputs are token ids, never text: the exact tokens the sampler
generated after the exact prompt ids it was given, so no re-tokenisation can shift them.
"""

from __future__ import annotations

import numpy as np


class SequenceLogProb:
    """One HF causal LM in eval mode (float32 on CPU, bfloat16 on GPU; log-softmax in float32).

    `__call__(prompt_ids, response_ids)` -> float64 [n]: log pi(response | prompt) in nats."""

    def __init__(self, model_path: str, device: str | None = None, batch_size: int = 16, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, trust_remote_code=trust_remote_code,
            attn_implementation="eager" if self.device == "cpu" else "sdpa",
        ).to(self.device).eval()  # fmt: skip
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.batch_size = batch_size

    def __call__(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> np.ndarray:
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        out = np.zeros(len(prompt_ids))
        order = np.argsort([-(len(p) + len(r)) for p, r in zip(prompt_ids, response_ids)], kind="stable")
        for start in range(0, len(order), self.batch_size):  # similar lengths together: less padding
            rows = order[start : start + self.batch_size]
            out[rows] = self._batch([prompt_ids[i] for i in rows], [response_ids[i] for i in rows])
        return out

    def _batch(self, prompts: list[list[int]], responses: list[list[int]]) -> np.ndarray:
        """Right-padded [B, T] forward; the response mask selects each row's own tokens. The LM head
        and log-softmax run only on positions from the shortest prompt on (`logits_to_keep`)."""
        torch = self.torch
        seqs = [p + r for p, r in zip(prompts, responses)]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        attn = torch.zeros(len(seqs), width, dtype=torch.long)
        resp = torch.zeros(len(seqs), width, dtype=torch.bool)
        for row, (p, s) in enumerate(zip(prompts, seqs)):
            if max(s, default=0) >= self.vocab_size or min(s, default=0) < 0:
                raise ValueError(f"token ids outside this model's vocabulary ({self.vocab_size}): a different tokenizer?")
            ids[row, : len(s)] = torch.tensor(s)
            attn[row, : len(s)] = 1
            resp[row, len(p) : len(s)] = True
        ids, attn, resp = ids.to(self.device), attn.to(self.device), resp.to(self.device)
        # logits only where they predict a response token: from the shortest prompt's last position on
        start = min(len(p) for p in prompts) - 1
        keep = torch.arange(start, width - 1, device=self.device)
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits.float()
            targets = ids[:, start + 1 :]
            token_logps = logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)
            return (token_logps * resp[:, start + 1 :]).sum(-1).double().cpu().numpy()
