#!/usr/bin/env bash
# The embedded CPU demo (what `make demo` runs): the toy world end to end, with exact answers.
# Knobs: OUT, SEED, THRESHOLD (between the reference safety and the reachable maximum).
set -euo pipefail
OUT=${OUT:-demo_out}
SEED=${SEED:-0}
THRESHOLD=${THRESHOLD:-0.5}
python -m openrlhf_dual.demo --out "$OUT" --seed "$SEED" --dual.threshold "$THRESHOLD"
