#!/usr/bin/env bash
# CAN with a closed loop, for when one shot misses: prepare once, train at lambda*, evaluate on
# held-out prompts, calibrate (openrlhf_dual.cli.calibrate: the dual re-solved for the thresholds
# corrected by the measured miss), retrain at the new lambda, evaluate, ... until calibrate
# certifies every constraint (one-sided 95% lower bound >= b_j - TOLERANCE) or after ROUNDS
# rounds. Re-training draws no new samples of pi_ref: only the labels (DPO) or the weights
# (likelihood) change. Paper's models by default (MoCAN as in recipes/mocan_beaver_7b.sh); every
# knob can be set from the environment. A rerun resumes: finished prepare, checkpoints and
# evaluations are kept.
#   bash recipes/calibrated.sh
set -euo pipefail

# ---- knobs ---------------------------------------------------------------------------------
REF=${REF:-PKU-Alignment/alpaca-7b-reproduced}
REWARD=${REWARD:-safe_rlhf:PKU-Alignment/beaver-7b-v1.0-reward}
SAFETY=${SAFETY:-safe_rlhf:PKU-Alignment/beaver-7b-v1.0-cost,sign=-1}
PROMPTS=${PROMPTS:-PKU-Alignment/PKU-SafeRLHF-30K}
TEMPLATE=${TEMPLATE:-$'BEGINNING OF CONVERSATION: USER: {} ASSISTANT:'}
HELDOUT=${HELDOUT:-PKU-Alignment/PKU-SafeRLHF-30K}
HELDOUT_SPLIT=${HELDOUT_SPLIT:-test}
PREP=${PREP:-./prep/mocan-calibrated}
OUT=${OUT:-./calibrated}
THRESHOLD=${THRESHOLD:-0.5}                  # E[safety] >= THRESHOLD (several: one per constraint, space-separated)
BETA=${BETA:-0.1}
N_PROMPTS=${N_PROMPTS:-1000}
K=${K:-128}
N_HELDOUT=${N_HELDOUT:-200}
K_EVAL=${K_EVAL:-4}
ROUNDS=${ROUNDS:-2}                          # calibration rounds after the one-shot run, at most
TOLERANCE=${TOLERANCE:-0.05}                 # certify E[g_j] >= b_j - TOLERANCE (thresholds' units)
GPUS=${GPUS:-8}                              # one node: prepare's and evaluate's vLLM engines, then training
# the primal step: likelihood (dual-weighted likelihood of prepare's samples, OpenRLHF's SFT trainer) or dpo (the paper's)
OBJECTIVE=${OBJECTIVE:-likelihood}
LAUNCH=${LAUNCH:-"deepspeed --module"}       # CPU: "torchrun --nproc_per_node 2 -m"
SAMPLE_FLAGS=${SAMPLE_FLAGS-"--dual.backend vllm --vllm.num_engines $GPUS --vllm.tensor_parallel_size 1 \
--vllm.gpu_memory_utilization 0.5 --dual.num_gpus_per_actor 1"}   # set it empty for HF on CPU
TRAIN_FLAGS=${TRAIN_FLAGS:-"--ds.zero_stage 2 --ds.param_dtype bf16 --ds.load_in_4bit --ds.lora.rank 8 --ds.lora.alpha 16 \
--train.micro_batch_size 4 --train.batch_size 64 --train.max_epochs 3 --adam.lr 5e-4 --data.max_len 1024"}
EVAL_FLAGS=${EVAL_FLAGS-""}                  # evaluate reuses prepare's engine settings unless given its own
# --------------------------------------------------------------------------------------------
mkdir -p "$OUT"
source "$(dirname "$0")/lib/runs.sh"

# 1. The dual step, once (a finished prepare is reused as it is).
python -m openrlhf_dual.cli.prepare \
   --ref.model_name_or_path "$REF" \
   --data.prompt_dataset "$PROMPTS" --data.input_key prompt --data.max_samples "$N_PROMPTS" \
   --data.input_template "$TEMPLATE" \
   --rollout.n_samples_per_prompt "$K" --rollout.max_new_tokens 512 --rollout.temperature 1.0 $SAMPLE_FLAGS \
   --dual.reward "$REWARD" --dual.safety $SAFETY \
   --dual.threshold $THRESHOLD --dual.beta "$BETA" --dual.prep_dir "$PREP"

if [ "$OBJECTIVE" = dpo ]; then TRAINER=(openrlhf_dual.cli.train_dpo --model.beta "$BETA"); else TRAINER=(openrlhf_dual.cli.train_sft); fi
LAM=""          # round 0 trains at the prep directory's lambda*; later rounds at calibrate's lambda
REPORTS=()
for ROUND in $(seq 0 "$ROUNDS"); do
  NAME="round-$ROUND"
  CKPT="$OUT/$NAME"
  # train (a finished run with the same settings is kept: recipes/lib/runs.sh), then make it loadable
  train_once "$CKPT" "$REF $PREP $OBJECTIVE $BETA ${LAM:-lambda*} $TRAIN_FLAGS" \
    $LAUNCH "${TRAINER[@]}" \
       --model.model_name_or_path "$REF" $TRAIN_FLAGS \
       --ckpt.output_dir "$CKPT" --logger.logging_steps 1 --logger.tensorboard_dir "$OUT/tensorboard/$NAME" \
       --dual.algo mocan --dual.prep_dir "$PREP" ${LAM:+--dual.lambda $LAM}
  loadable_ckpt "$REF"
  # 3. Evaluate on held-out prompts, the policy named with the lambda it was trained at.
  if [ ! -f "$OUT/$NAME-eval/report.json" ]; then
    python -m openrlhf_dual.cli.evaluate --dual.prep_dir "$PREP" --eval.out "$OUT/$NAME-eval" \
       --eval.policy "$NAME=$CKPT${LAM:+:${LAM// /,}}" \
       --data.prompt_dataset "$HELDOUT" --data.prompt_split "$HELDOUT_SPLIT" --data.max_samples "$N_HELDOUT" \
       --rollout.n_samples_per_prompt "$K_EVAL" $EVAL_FLAGS
  fi
  REPORTS+=("$OUT/$NAME-eval/report.json")
  # 4. Calibrate on every round so far: certificate of this round's policy, the next lambda.
  python -m openrlhf_dual.cli.calibrate --dual.prep_dir "$PREP" --eval.report "${REPORTS[@]}" \
     --calibrate.tolerance $TOLERANCE --calibrate.out "$OUT/$NAME-calibration"
  if grep -q '^  "certified": true' "$OUT/$NAME-calibration/calibration.json" 2>/dev/null; then
    echo "calibrated: $NAME is certified; $OUT/$NAME-calibration/calibration.json, $OUT/$NAME-eval/report.md"
    exit 0
  fi
  LAM=$(python -c 'import json, sys; print(*json.load(open(sys.argv[1]))["lambda"])' "$OUT/$NAME-calibration/calibration.json")
done
echo "calibrated: not certified after $ROUNDS rounds; see $OUT/$NAME-calibration/calibration.json"
exit 1
