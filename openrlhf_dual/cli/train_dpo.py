"""MoCAN/PeCAN training with stock OpenRLHF: every `openrlhf.cli.train_dpo` flag, plus `--dual.*`.

    deepspeed --module openrlhf_dual.cli.train_dpo <openrlhf.cli.train_dpo flags> \
        --dual.algo mocan --dual.prep_dir DIR

OpenRLHF's own parser stays the authority for its flags: this module takes only `--dual.*` off
the command line, installs the MoCAN dataset and trainer where `openrlhf.cli.train_dpo` imports
them from, and runs that module as `__main__`. Without `--dual.algo` it is plain train_dpo.
"""

from __future__ import annotations

import argparse
import runpy
import sys

from openrlhf.utils.config import hierarchize

from openrlhf_dual.plugin import add_dual_arguments, data_defaults, dual_config


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(add_help=False)
    add_dual_arguments(parser)
    known, rest = parser.parse_known_args(argv)
    cfg = dual_config(hierarchize(known).dual)
    if cfg is not None:
        import openrlhf.datasets
        import openrlhf.trainer.dpo_trainer

        from openrlhf_dual.trainer import mocan_classes

        classes = mocan_classes(cfg)
        openrlhf.datasets.RewardDataset = classes["RewardDataset"]
        openrlhf.trainer.dpo_trainer.DPOTrainer = classes["DPOTrainer"]
        given = {a.split("=", 1)[0] for a in rest}
        for key, value in data_defaults(cfg.prep_dir).items():
            if f"--{key}" not in given:
                rest += [f"--{key}", value]
    sys.argv = ["openrlhf.cli.train_dpo", *rest]
    runpy.run_module("openrlhf.cli.train_dpo", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
