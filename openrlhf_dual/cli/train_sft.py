"""CAN's weighted-likelihood primal step with stock OpenRLHF: every `openrlhf.cli.train_sft` flag,
plus `--dual.*`.

    deepspeed --module openrlhf_dual.cli.train_sft <openrlhf.cli.train_sft flags> \
        --dual.algo mocan --dual.prep_dir DIR

Trains on prepare's own samples of pi_ref, each weighted by the dual's self-normalised weight
(openrlhf_dual.likelihood); `--data.dataset` defaults to the prep directory's prompts.jsonl.
Without `--dual.algo` it is plain train_sft.
"""

from __future__ import annotations

import sys

from openrlhf_dual.plugin import run_stock


def main(argv: list[str] | None = None) -> None:
    run_stock("train_sft", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
