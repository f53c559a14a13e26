"""The one place that touches OpenRLHF's CLI: the `--dual.*` flags and what they switch on.

Two ways in, same classes:
- patched OpenRLHF (patches/0002): `register` is found through the "openrlhf.cli_plugins" entry
  point, adds `--dual.*` to OpenRLHF's own parser, and its hook swaps the CLI's `DPOTrainer` and
  `RewardDataset` for the MoCAN ones when `--dual.algo` is given;
- stock OpenRLHF: `openrlhf_dual.cli.train_dpo` strips `--dual.*` from argv, installs the same
  classes where `openrlhf.cli.train_dpo` imports them from, and runs that module unchanged.

For `train_ppo_ray`, `--dual.prep_dir DIR` alone makes PPO's reward r + lambda*.g: it sets
`--reward.remote_url` to the prep directory's reward file (openrlhf_dual.ppo_reward) while the
arguments are parsed, so OpenRLHF's own checks see a remote reward.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

ALGOS = ("mocan", "pecan")


def add_dual_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dual.algo", choices=ALGOS, default=None, help="train on CAN pseudo-preferences")
    parser.add_argument("--dual.prep_dir", type=str, default=None, help="directory written by openrlhf_dual.cli.prepare")
    parser.add_argument(
        "--dual.lambda", type=float, nargs="+", default=None, help="override the solved lambda* (one per constraint)"
    )
    parser.add_argument("--dual.hard_labels", action="store_true", help="one Bernoulli label per pair, not soft labels")
    parser.add_argument("--dual.label_seed", type=int, default=0, help="seed of the Bernoulli labels")


def dual_config(dual: SimpleNamespace):
    """DualConfig from the hierarchized `args.dual`, or None when `--dual.algo` is not given."""
    if dual.algo is None:
        return None
    if not dual.prep_dir:
        raise SystemExit("--dual.algo needs --dual.prep_dir (the directory written by openrlhf_dual.cli.prepare)")
    from openrlhf_dual.trainer import DualConfig

    lam = getattr(dual, "lambda")
    return DualConfig(
        algo=dual.algo,
        prep_dir=dual.prep_dir,
        lam=tuple(lam) if lam is not None else None,
        hard_labels=dual.hard_labels,
        label_seed=dual.label_seed,
    )


def data_defaults(prep_dir: str) -> dict[str, str]:
    """OpenRLHF data flags that point train_dpo at the prep directory's pairs, unless the user set them."""
    return {"data.dataset": str(Path(prep_dir) / "pairs.jsonl"), "data.prompt_key": "prompt"}


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
    (MoCAN/PeCAN) and train_ppo_ray (one-shot constrained PPO)."""
    if cli == "train_ppo_ray":
        parser.add_argument("--dual.prep_dir", action=_PrepDirForPPO, default=None,
                            help="PPO reward = r + lambda*.g of this prep directory (sets --reward.remote_url)")
        parser.add_argument("--dual.lambda", type=float, nargs="+", default=None, help="override the solved lambda*")
        return _ppo_hook
    if cli != "train_dpo":
        return None
    add_dual_arguments(parser)

    def hook(args: SimpleNamespace, cli_globals: dict) -> None:
        cfg = dual_config(args.dual)
        if cfg is None:
            return
        for key, value in data_defaults(cfg.prep_dir).items():
            group, name = key.split(".")
            if getattr(getattr(args, group), name) is None:
                setattr(getattr(args, group), name, value)
        from openrlhf_dual.trainer import mocan_classes

        cli_globals.update(mocan_classes(cfg))

    return hook
