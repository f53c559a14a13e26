"""PeCAN's pre-alignment data: one preference dataset with two judgements per pair (PKU-SafeRLHF:
`better_response_id` for helpfulness, `safer_response_id` for safety) -> two JSONL files in
OpenRLHF's prompt/chosen/rejected convention, one per DPO run:

    python -m openrlhf_dual.cli.split_preferences --data.dataset PKU-Alignment/PKU-SafeRLHF-30K \
        --out data/pku-split        # writes helpful.jsonl and safe.jsonl

Rows whose two responses are identical are dropped (no preference to learn); the counts go to
stdout. Written atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from openrlhf_dual.artifacts import write_jsonl


def split(rows, prompt_key: str, response_keys: tuple[str, str], judgements: dict[str, str]) -> dict[str, list[dict]]:
    """{name: [{"prompt", "chosen", "rejected"}]} for each judgement column (value 0 or 1: the
    index of the preferred response)."""
    out = {name: [] for name in judgements}
    for i, row in enumerate(rows):
        responses = [row[k] for k in response_keys]
        if responses[0] == responses[1]:
            continue
        for name, column in judgements.items():
            won = row[column]
            if won not in (0, 1):
                raise ValueError(f"row {i}: {column} = {won!r}, expected 0 or 1")
            out[name].append({"prompt": row[prompt_key], "chosen": responses[won], "rejected": responses[1 - won]})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data.dataset", dest="dataset", required=True, help="HF dataset name or path (json/jsonl/dir)")
    p.add_argument("--data.split", dest="split", default="train")
    p.add_argument("--data.max_samples", dest="max_samples", type=int, default=10**9)
    p.add_argument("--data.prompt_key", dest="prompt_key", default="prompt")
    p.add_argument("--response_keys", nargs=2, default=["response_0", "response_1"])
    p.add_argument("--helpful_key", default="better_response_id", help="index of the more helpful response")
    p.add_argument("--safe_key", default="safer_response_id", help="index of the safer response")
    p.add_argument("--out", required=True, help="directory for helpful.jsonl and safe.jsonl")
    a = p.parse_args(argv)
    from openrlhf.datasets.utils import blending_datasets

    strategy = SimpleNamespace(print=lambda *x: None, is_rank_0=lambda: True, args=SimpleNamespace(use_ms=False))
    data = blending_datasets(a.dataset, None, strategy, 0, max_count=a.max_samples, dataset_split=a.split)
    needed = [a.prompt_key, *a.response_keys, a.helpful_key, a.safe_key]
    missing = [k for k in needed if k not in data.column_names]
    if missing:
        print(f"split_preferences: {a.dataset} has no column {missing[0]!r} (columns: {data.column_names})", file=sys.stderr)
        return 2
    try:
        parts = split(data, a.prompt_key, tuple(a.response_keys), {"helpful": a.helpful_key, "safe": a.safe_key})
    except ValueError as err:
        print(f"split_preferences: {err}", file=sys.stderr)
        return 2
    for name, rows in parts.items():
        write_jsonl(Path(a.out) / f"{name}.jsonl", rows)
    print(json.dumps({"rows": len(data), **{name: len(rows) for name, rows in parts.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
