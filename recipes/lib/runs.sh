# Sourced by the recipes that train several policies (lambda_sweep.sh, calibrated.sh).

# train_once CKPT RUN CMD...: run CMD, a training run writing CKPT, unless it already finished with
# the same settings RUN. CKPT.done is written after CMD exits 0 and holds RUN, so a run killed while
# it saved (config.json written, weights not) is run again, and a finished run is never reused
# under other settings: that is refused.
train_once() {
  local ckpt=$1 run=$2
  shift 2
  if [ -f "$ckpt.done" ] && [ "$(cat "$ckpt.done")" != "$run" ]; then
    echo "$ckpt was trained with other settings ($(cat "$ckpt.done")); remove $ckpt.done to train it again" >&2
    exit 1
  fi
  if [ ! -f "$ckpt.done" ]; then
    "$@"
    printf '%s\n' "$run" > "$ckpt.done"
  fi
}

# loadable_ckpt REF: with LoRA OpenRLHF saves the adapter only, which vLLM cannot load as a model;
# merge $CKPT into REF with OpenRLHF's lora_combiner (once: CKPT-merged.done) and point CKPT at it.
loadable_ckpt() {
  if [ -f "$CKPT/adapter_config.json" ]; then
    if [ ! -f "$CKPT-merged.done" ]; then
      python -m openrlhf.cli.lora_combiner --model_path "$1" --lora_path "$CKPT" \
         --output_path "$CKPT-merged" --ds.param_dtype bf16
      touch "$CKPT-merged.done"
    fi
    CKPT="$CKPT-merged"
  fi
}
