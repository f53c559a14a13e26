"""MoCAN/PeCAN policy update: OpenRLHF's DPO trainer on pseudo-preference labels.

The smallest subclasses of OpenRLHF's `RewardDataset` (carries a per-pair label) and `DPOTrainer`
(soft-label loss and label diagnostics). Everything else (ZeRO, LoRA, 4-bit, checkpointing,
resume, loggers) is OpenRLHF's own.

DPO's loss sees only log-ratio differences within pairs, so it pins pi_lambda's ratios on the
pairs' support and nothing else: mass can leave that support at no cost. `anchor` > 0 adds
anchor x the dual-weighted likelihood of both responses of every pair (weights self-normalised
over each prompt's pair responses, labels.sample_weights), whose population optimum is also
pi_lambda, absolute mass included (for pairs drawn from pi_ref; pairs of identical responses,
dropped by prepare, are missing from it). openrlhf_dual.likelihood trains on that likelihood alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from openrlhf.datasets import RewardDataset
from openrlhf.trainer.dpo_trainer import DPOTrainer

from openrlhf_dual.labels import combined_reward, pair_labels, sample_weights

SCORE_COLUMNS = ("chosen_reward", "chosen_safety", "rejected_reward", "rejected_safety")


@dataclass(frozen=True)
class DualConfig:
    """What `--dual.*` flags say: the prep directory, and optional overrides."""

    algo: str
    prep_dir: str
    lam: tuple[float, ...] | None = None  # overrides the solved lambda*
    hard_labels: bool = False
    label_seed: int = 0
    anchor: float = 0.0  # coefficient of the dual-weighted likelihood added to DPO's loss

    def solution(self) -> dict:
        path = Path(self.prep_dir) / "dual.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `python -m openrlhf_dual.cli.prepare` first")
        solution = json.loads(path.read_text())
        made_by = "pecan" if solution.get("form") == "margin" else "mocan"
        if made_by != self.algo:
            raise ValueError(f"{self.prep_dir} was prepared with --dual.algo {made_by}; train with --dual.algo {made_by}")
        return solution

    def multiplier(self) -> tuple[np.ndarray, float]:
        """(lambda [m], beta of the dual) for labelling."""
        sol = self.solution()
        lam = np.asarray(self.lam if self.lam is not None else sol["lam"], dtype=np.float64)
        if not np.all(np.isfinite(lam)) or np.any(lam < 0):
            raise ValueError(f"lambda must be finite and >= 0, got {lam.tolist()} (is the threshold infeasible?)")
        return lam, float(sol["beta"])


def pseudo_preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO with soft labels: cross-entropy of sigmoid(beta * z) against P(chosen > rejected).

    All inputs [B]; log-probs are summed over response tokens. labels in [0, 1]; labels == 1
    is OpenRLHF's DPOLoss exactly. Returns (mean loss, chosen and rejected implicit rewards [B]).
    """
    logits = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)
    losses = -labels * F.logsigmoid(beta * logits) - (1 - labels) * F.logsigmoid(-beta * logits)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses.mean(), chosen_rewards, rejected_rewards


def weighted_likelihood_loss(logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """-mean_b w_b log pi(y_b | x_b). logps [B]: sequence log-probs summed over response tokens;
    weights [B] >= 0, the dual's self-normalised weights (labels.sample_weights, mean 1 per prompt)."""
    return -(weights * logps).mean()


class PromptLength(int):
    """A DPO prompt length, as OpenRLHF's trainer slices with it, that also carries the pair's label
    and the anchor weights of its chosen and rejected responses."""

    def __new__(cls, length: int, label: float, weights: tuple[float, float] = (0.0, 0.0)):
        obj = super().__new__(cls, int(length))
        obj.label = float(label)
        obj.weights = (float(weights[0]), float(weights[1]))
        return obj

    def __getnewargs__(self):
        return int(self), self.label, self.weights


def pair_anchor_weights(rows: dict, lam: np.ndarray, beta: float) -> np.ndarray:
    """[n, 2] dual weights of each pair's chosen and rejected response, self-normalised over the
    responses of all pairs of the same prompt (prompt_id, else the prompt text), mean 1 there."""
    u = np.stack([
        combined_reward(np.asarray(rows[f"{side}_reward"]), np.asarray(rows[f"{side}_safety"]), lam)
        for side in ("chosen", "rejected")
    ], axis=1)  # fmt: skip
    groups = rows["prompt_id"] if "prompt_id" in rows else rows["prompt"]
    weights = np.zeros_like(u)
    index: dict = {}
    for i, key in enumerate(groups):
        index.setdefault(key, []).append(i)
    for members in index.values():
        scores = u[members].reshape(1, -1)
        weights[members] = sample_weights(scores, np.zeros((1, scores.shape[1], 1)), np.zeros(1), beta).reshape(-1, 2)
    return weights


class PseudoPreferenceDataset(RewardDataset):
    """RewardDataset(is_dpo=True) over prep pairs; labels come from the rows' raw scores and lambda."""

    def __init__(
        self, dataset, tokenizer, max_length, strategy, input_template=None, is_dpo=True, *, dual: DualConfig, **kwargs
    ):
        if not is_dpo:
            raise ValueError("PseudoPreferenceDataset is for DPO pairs")
        if input_template or getattr(strategy.args.data, "apply_chat_template", False):
            raise ValueError(
                "the pairs' prompts are already the exact text pi_ref was given (prepare applied the template); "
                "drop --data.input_template / --data.apply_chat_template, which would template them a second time"
            )
        missing = [c for c in SCORE_COLUMNS if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"the pairs dataset lacks columns {missing}: MoCAN/PeCAN label pairs from the raw scores "
                "written by `python -m openrlhf_dual.cli.prepare` (its pairs.jsonl)"
            )
        lam, beta_dual = dual.multiplier()
        labels = pair_labels(
            np.asarray(dataset["chosen_reward"]),
            np.asarray(dataset["chosen_safety"]),
            np.asarray(dataset["rejected_reward"]),
            np.asarray(dataset["rejected_safety"]),
            lam,
            beta_dual,
            strategy.args.model.beta,
            hard=dual.hard_labels,
            seed=dual.label_seed,
        )
        dataset = dataset.add_column("dual_label", labels.tolist())
        anchor = np.zeros((len(labels), 2))
        if dual.anchor > 0:
            cols = ["chosen_reward", "chosen_safety", "rejected_reward", "rejected_safety", "prompt"]
            cols += ["prompt_id"] if "prompt_id" in dataset.column_names else []
            anchor = pair_anchor_weights({c: dataset[c] for c in cols}, lam, beta_dual)
        dataset = dataset.add_column("dual_anchor", anchor.tolist())
        super().__init__(dataset, tokenizer, max_length, strategy, input_template=input_template, is_dpo=True, **kwargs)

    def process_data(self, data):
        out = super().process_data(data)
        out["extra"] = [out["extra"], data["dual_label"], *data["dual_anchor"]]
        return out

    def __getitem__(self, idx):
        *tensors, (prompt_len, label, anchor_chosen, anchor_rejected) = super().__getitem__(idx)
        return (*tensors, PromptLength(prompt_len, label, (anchor_chosen, anchor_rejected)))


class MoCANTrainer(DPOTrainer):
    """DPOTrainer whose preference loss uses each pair's pseudo-preference label."""

    def __init__(self, *args, dual: DualConfig, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.model.ipo_enable:
            raise ValueError("--model.ipo_enable has no pseudo-preference form; drop it with --dual.algo")
        self.lam, _ = dual.multiplier()
        self.anchor = dual.anchor
        self.loss_fn = self._loss
        self._labels = None
        self._anchor_weights = None
        self._label_logs = {}

    def concatenated_forward(self, model, chosen_ids, c_mask, reject_ids, r_mask, prompt_id_lens):
        device = chosen_ids.device
        self._labels = torch.tensor([p.label for p in prompt_id_lens], dtype=torch.float32, device=device)
        self._anchor_weights = torch.tensor([p.weights for p in prompt_id_lens], dtype=torch.float32, device=device)
        return super().concatenated_forward(model, chosen_ids, c_mask, reject_ids, r_mask, prompt_id_lens)

    def _loss(self, policy_chosen, policy_rejected, reference_chosen, reference_rejected):
        loss, chosen_rewards, rejected_rewards = pseudo_preference_loss(
            policy_chosen, policy_rejected, reference_chosen, reference_rejected, self._labels, self.beta
        )
        if self.anchor > 0:
            both = torch.stack([policy_chosen, policy_rejected], dim=1)
            anchor = weighted_likelihood_loss(both.reshape(-1), self._anchor_weights.to(both.dtype).reshape(-1))
            loss = loss + self.anchor * anchor
        p = self._labels.double().clamp(1e-12, 1 - 1e-12)
        prefers_chosen = (chosen_rewards > rejected_rewards).double()
        self._label_logs = {
            "label_mean": self._labels.mean().item(),
            "label_entropy": (-(p * p.log() + (1 - p) * (1 - p).log())).mean().item(),
            "label_agreement": (prefers_chosen * p + (1 - prefers_chosen) * (1 - p)).mean().item(),
        }
        if self.anchor > 0:
            self._label_logs["anchor_loss"] = anchor.item()
        return loss, chosen_rewards, rejected_rewards

    def save_logs_and_checkpoints(self, args, global_step, step_bar, logs_dict=None, client_states=None):
        logs_dict = dict(logs_dict or {})
        logs_dict.update(self.strategy.all_reduce(self._label_logs))
        logs_dict.update(lambda_logs(self.lam))
        super().save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)


def lambda_logs(lam) -> dict[str, float]:
    """The multipliers a primal step trains with, as `lambda_j` entries of OpenRLHF's logs."""
    return {f"lambda_{j}": float(v) for j, v in enumerate(lam)}


def mocan_classes(dual: DualConfig) -> dict[str, partial]:
    """Dataset and trainer constructors bound to one `--dual.*` configuration, under the names
    OpenRLHF's train_dpo CLI calls them by."""
    return {
        "RewardDataset": partial(PseudoPreferenceDataset, dual=dual),
        "DPOTrainer": partial(MoCANTrainer, dual=dual),
    }
