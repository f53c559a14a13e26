#!/usr/bin/env bash
# The embedded CPU demo (what `make demo` / `make demo-pecan` run): the toy world end to end, with
# exact answers. Knobs: OUT, ALGO (mocan or pecan), SEED, THRESHOLD (between the reference safety
# and the reachable maximum, in the world's true safety units for both algorithms).
set -euo pipefail
OUT=${OUT:-demo_out}
ALGO=${ALGO:-mocan}
SEED=${SEED:-0}
THRESHOLD=${THRESHOLD:-0.5}
python -m openrlhf_dual.demo --algo "$ALGO" --out "$OUT" --seed "$SEED" --dual.threshold "$THRESHOLD"
