"""MoCAN/PeCAN training with stock OpenRLHF: every `openrlhf.cli.train_dpo` flag, plus `--dual.*`.

    deepspeed --module openrlhf_dual.cli.train_dpo <openrlhf.cli.train_dpo flags> \
        --dual.algo mocan --dual.prep_dir DIR [--dual.anchor C]

OpenRLHF's own parser stays the authority for its flags: this module takes only `--dual.*` off
the command line, installs the pseudo-preference dataset and trainer where `openrlhf.cli.train_dpo`
imports them from, and runs that module as `__main__`. Without `--dual.algo` it is plain train_dpo.
"""

from __future__ import annotations

import sys

from openrlhf_dual.plugin import run_stock


def main(argv: list[str] | None = None) -> None:
    run_stock("train_dpo", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
