"""The weighted-likelihood primal step on OpenRLHF's SFT trainer: maximise sum_k w_k log pi(y_k | x)
over prepare's own samples y_k of pi_ref, with the dual's self-normalised weights
w_k = K softmax_k((r_k + lambda . g_k) / beta) (labels.sample_weights; PeCAN: r = beta s_r,
g = beta s_g, so w_k is proportional to exp(s_r + lambda s_g)).

Its population optimum is pi_lambda = pi_ref exp((r + lambda . g) / beta) / Z itself, absolute
mass included: unlike DPO, whose loss only sees log-ratio differences within pairs, it cannot
move mass off the samples' support for free. No reference model is needed while training.

The smallest subclasses of OpenRLHF's `SFTDataset` (prepare's samples on their exact token ids,
each response token's loss-mask entry holding its sample's weight) and `SFTTrainer` (the loss).
Everything else (ZeRO, LoRA, 4-bit, checkpointing, resume, loggers) is OpenRLHF's own.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from openrlhf.datasets import SFTDataset
from openrlhf.trainer.sft_trainer import SFTTrainer

from openrlhf_dual.artifacts import read_jsonl
from openrlhf_dual.labels import sample_weights
from openrlhf_dual.trainer import DualConfig, lambda_logs, weighted_likelihood_loss


def scored_samples(prep_dir: str | Path) -> tuple[list[dict], list[list[dict]], np.ndarray]:
    """(prompt rows, K samples per prompt {"text", "token_ids", "finished"}, scores [N, K, 1 + m])
    from a prep directory's samples/ and scores/ shards, in prompt order."""
    prep = Path(prep_dir)
    shards = sorted((prep / "scores").glob("*.npy"))
    if not shards or not (prep / "prompts.jsonl").exists():
        raise FileNotFoundError(f"{prep} has no scored samples: run `python -m openrlhf_dual.cli.prepare` first")
    samples = [r["responses"] for s in shards for r in read_jsonl(prep / "samples" / f"{s.stem}.jsonl")]
    scores = np.concatenate([np.load(s) for s in shards])
    prompts = read_jsonl(prep / "prompts.jsonl")
    if not (len(prompts) == len(samples) == len(scores)):
        raise ValueError(f"{prep}: {len(prompts)} prompts, {len(samples)} sampled, {len(scores)} scored; rerun prepare")
    return prompts, samples, scores


class WeightedSampleDataset(SFTDataset):
    """prepare's samples of pi_ref for the prompts of `dataset` (rows of the prep directory's
    prompts.jsonl, as train_sft loads them), each an SFT example on its exact token ids (prompt
    tokenised as the sampler did, response as generated: EOS only where it was generated) whose
    loss mask carries the sample's dual weight on its response tokens."""

    def __init__(self, dataset, tokenizer, max_length, strategy, input_template=None, pretrain_mode=False,
                 num_processors=8, multiturn=False, *, dual: DualConfig):  # fmt: skip
        if pretrain_mode or multiturn:
            raise ValueError("--dual.algo trains on prepare's samples: drop --model.pretrain_mode_enable/--data.multiturn")
        if "id" not in dataset.column_names:
            raise ValueError("the dataset lacks the column 'id': point --data.dataset at the prep directory's prompts.jsonl")
        self.tokenizer, self.strategy, self.max_length = tokenizer, strategy, max_length
        self.pretrain_mode, self.multiturn = False, False
        prompts, samples, scores = scored_samples(dual.prep_dir)
        lam, beta = dual.multiplier()
        sol = dual.solution()
        scale = beta if sol.get("form") == "margin" else 1.0  # PeCAN scores are log-ratios: beta s in reward units
        weights = sample_weights(scale * scores[..., 0], scale * scores[..., 1:], lam, beta)
        by_id = {p["id"]: i for i, p in enumerate(prompts)}
        self.rows = []  # (prompt ids, response ids, weight)
        for pid in dataset["id"]:
            if pid not in by_id:
                raise ValueError(f"prompt id {pid} is not in {dual.prep_dir}/prompts.jsonl")
            i = by_id[pid]
            head = tokenizer(prompts[i]["prompt"], add_special_tokens=False)["input_ids"]
            for sample, w in zip(samples[i], weights[i]):
                if len(head) + len(sample["token_ids"]) > max_length:
                    raise ValueError(f"a sample of prompt {pid} has {len(head) + len(sample['token_ids'])} tokens, "
                                     f"more than --data.max_len {max_length}: raise it (dropping samples biases the weights)")  # fmt: skip
                self.rows.append((head, sample["token_ids"], float(w)))
        self.weights = np.array([w for _, _, w in self.rows])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, idx):
        head, response, weight = self.rows[idx]
        ids = torch.tensor([head + response])
        loss_mask = torch.zeros(ids.shape, dtype=torch.float32)
        loss_mask[0, len(head) - 1 : -1] = weight  # position t predicts token t + 1
        return ids, torch.ones_like(ids), loss_mask


class WeightedLikelihoodTrainer(SFTTrainer):
    """SFTTrainer whose loss is the weighted sequence likelihood of prepare's samples."""

    def __init__(self, *args, dual: DualConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.lam, _ = dual.multiplier()
        self.loss_fn = self._loss

    @staticmethod
    def _loss(per_token_logps, token_weights, **_normalisers):
        # the response tokens of a row all carry its weight; other positions 0
        logps = (per_token_logps * (token_weights > 0)).sum(-1)
        return weighted_likelihood_loss(logps, token_weights.amax(-1))

    def save_logs_and_checkpoints(self, args, global_step, step_bar, logs_dict=None, client_states=None):
        logs_dict = dict(logs_dict or {})
        logs_dict.update(lambda_logs(self.lam))
        super().save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)


def likelihood_classes(dual: DualConfig) -> dict[str, partial]:
    """Dataset and trainer constructors bound to one `--dual.*` configuration, under the names
    OpenRLHF's train_sft CLI calls them by."""
    return {
        "SFTDataset": partial(WeightedSampleDataset, dual=dual),
        "SFTTrainer": partial(WeightedLikelihoodTrainer, dual=dual),
    }
