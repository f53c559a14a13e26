"""The one place that touches OpenRLHF's CLI: the `--dual.*` flags and what they switch on.

Two ways in, same classes:
- patched OpenRLHF (patches/0002): `register` is found through the "openrlhf.cli_plugins" entry
  point, adds `--dual.*` to OpenRLHF's own parser, and its hook swaps the CLI's classes when
  `--dual.algo` is given: train_dpo's `DPOTrainer` and `RewardDataset` for the pseudo-preference
  ones (openrlhf_dual.trainer), train_sft's `SFTTrainer` and `SFTDataset` for the
  weighted-likelihood ones (openrlhf_dual.likelihood);
- stock OpenRLHF: `openrlhf_dual.cli.train_dpo` / `.train_sft` (`run_stock`) strip `--dual.*`
  from argv, install the same classes where OpenRLHF's CLI module imports them from, and run that
  module unchanged.

For `train_ppo_ray`, `--dual.prep_dir DIR` alone makes PPO's reward r + lambda*.g: it sets
`--reward.remote_url` to the prep directory's reward file (openrlhf_dual.ppo_reward) while the
arguments are parsed, so OpenRLHF's own checks see a remote reward.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

ALGOS = ("mocan", "pecan")
# where each CLI imports the classes we replace from
CLASS_HOMES = {
    "train_dpo": {"RewardDataset": "openrlhf.datasets", "DPOTrainer": "openrlhf.trainer.dpo_trainer"},
    "train_sft": {"SFTDataset": "openrlhf.datasets", "SFTTrainer": "openrlhf.trainer.sft_trainer"},
}


def add_dual_arguments(parser: argparse.ArgumentParser, cli: str = "train_dpo") -> None:
    objective = "pseudo-preference DPO" if cli == "train_dpo" else "weighted likelihood of prepare's samples"
    parser.add_argument("--dual.algo", choices=ALGOS, default=None, help=f"train CAN's primal step ({objective})")
    parser.add_argument("--dual.prep_dir", type=str, default=None, help="directory written by openrlhf_dual.cli.prepare")
    parser.add_argument(
        "--dual.lambda", type=float, nargs="+", default=None, help="override the solved lambda* (one per constraint)"
    )
    if cli != "train_dpo":
        return
    parser.add_argument("--dual.hard_labels", action="store_true", help="one Bernoulli label per pair, not soft labels")
    parser.add_argument("--dual.label_seed", type=int, default=0, help="seed of the Bernoulli labels")
    parser.add_argument("--dual.anchor", type=float, default=0.0,
                        help="add this times the dual-weighted likelihood of both responses of each pair (keeps "
                             "the mass DPO may move off the pairs' support; same population optimum)")  # fmt: skip


def dual_config(dual: SimpleNamespace):
    """DualConfig from the hierarchized `args.dual`, or None when `--dual.algo` is not given."""
    if dual.algo is None:
        return None
    if not dual.prep_dir:
        raise SystemExit("--dual.algo needs --dual.prep_dir (the directory written by openrlhf_dual.cli.prepare)")
    anchor = getattr(dual, "anchor", 0.0)
    if anchor < 0:
        raise SystemExit(f"--dual.anchor must be >= 0, got {anchor}")
    from openrlhf_dual.trainer import DualConfig

    lam = getattr(dual, "lambda")
    return DualConfig(
        algo=dual.algo,
        prep_dir=dual.prep_dir,
        lam=tuple(lam) if lam is not None else None,
        hard_labels=getattr(dual, "hard_labels", False),
        label_seed=getattr(dual, "label_seed", 0),
        anchor=anchor,
    )


def data_defaults(prep_dir: str, cli: str = "train_dpo") -> dict[str, str]:
    """OpenRLHF data flags that point the CLI at the prep directory (train_dpo: its pairs; train_sft:
    its prompts, whose samples the dataset reads), unless the user set them."""
    if cli == "train_sft":
        return {"data.dataset": str(Path(prep_dir) / "prompts.jsonl")}
    return {"data.dataset": str(Path(prep_dir) / "pairs.jsonl"), "data.prompt_key": "prompt"}


def dual_classes(cli: str, cfg) -> dict:
    """The classes that replace the CLI's own, by the names the CLI uses."""
    if cli == "train_sft":
        from openrlhf_dual.likelihood import likelihood_classes

        return likelihood_classes(cfg)
    from openrlhf_dual.trainer import mocan_classes

    return mocan_classes(cfg)


def run_stock(cli: str, argv: list[str]) -> None:
    """Stock OpenRLHF: take `--dual.*` off argv, install our classes where `openrlhf.cli.<cli>`
    imports them from, and run that module as `__main__` (plain OpenRLHF without `--dual.algo`)."""
    import importlib

    from openrlhf.utils.config import hierarchize

    parser = argparse.ArgumentParser(add_help=False)
    add_dual_arguments(parser, cli)
    known, rest = parser.parse_known_args(argv)
    cfg = dual_config(hierarchize(known).dual)
    if cfg is not None:
        for name, cls in dual_classes(cli, cfg).items():
            setattr(importlib.import_module(CLASS_HOMES[cli][name]), name, cls)
        given = {a.split("=", 1)[0] for a in rest}
        for key, value in data_defaults(cfg.prep_dir, cli).items():
            if f"--{key}" not in given:
                rest += [f"--{key}", value]
    sys.argv = [f"openrlhf.cli.{cli}", *rest]
    runpy.run_module(f"openrlhf.cli.{cli}", run_name="__main__", alter_sys=True)


class _PrepDirForPPO(argparse.Action):
    """`--dual.prep_dir` of train_ppo_ray: also points `--reward.remote_url` at the prep directory's
    reward file (one flag enables one-shot constrained PPO)."""

    def __call__(self, parser, namespace, value, option_string=None):
        from openrlhf_dual.ppo_reward import REWARD_FILE

        if getattr(namespace, "reward.remote_url", None) is not None:
            parser.error("--dual.prep_dir sets the PPO reward to r + lambda*.g: drop --reward.remote_url")
        setattr(namespace, self.dest, value)
        setattr(namespace, "reward.remote_url", str(Path(value) / REWARD_FILE))


def _ppo_hook(args: SimpleNamespace, cli_globals: dict) -> None:
    """Write the reward file (for --dual.lambda, one with that lambda) and check nothing replaced it."""
    prep_dir = args.dual.prep_dir
    if prep_dir is None:
        return
    from openrlhf_dual.ppo_reward import REWARD_FILE, CombinedReward, write_reward_file

    if args.reward.remote_url != [str(Path(prep_dir) / REWARD_FILE)]:
        raise SystemExit("--dual.prep_dir sets the PPO reward to r + lambda*.g: drop --reward.remote_url")
    lam = getattr(args.dual, "lambda")
    CombinedReward.check_prep_dir(prep_dir, lam)
    args.reward.remote_url = [str(write_reward_file(prep_dir, lam))]


def register(cli: str, parser: argparse.ArgumentParser) -> Callable | None:
    """Entry point for patched OpenRLHF ("openrlhf.cli_plugins"): adds our flags to train_dpo
    (pseudo-preference DPO), train_sft (weighted likelihood) and train_ppo_ray (one-shot
    constrained PPO)."""
    if cli == "train_ppo_ray":
        parser.add_argument("--dual.prep_dir", action=_PrepDirForPPO, default=None,
                            help="PPO reward = r + lambda*.g of this prep directory (sets --reward.remote_url)")
        parser.add_argument("--dual.lambda", type=float, nargs="+", default=None, help="override the solved lambda*")
        return _ppo_hook
    if cli not in CLASS_HOMES:
        return None
    add_dual_arguments(parser, cli)

    def hook(args: SimpleNamespace, cli_globals: dict) -> None:
        cfg = dual_config(args.dual)
        if cfg is None:
            return
        for key, value in data_defaults(cfg.prep_dir, cli).items():
            group, name = key.split(".")
            if getattr(getattr(args, group), name) is None:
                setattr(getattr(args, group), name, value)
        cli_globals.update(dual_classes(cli, cfg))

    return hook
