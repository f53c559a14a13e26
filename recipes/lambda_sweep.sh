#!/usr/bin/env bash
# A lambda sweep: ONE prepare, several MoCAN runs at different lambdas, ONE evaluate over all of
# them, ONE picture (helpfulness/safety plane with the predicted frontier). Paper's models by
# default; every knob can be set from the environment (make evidence runs it on the CPU toy world).
#   bash recipes/lambda_sweep.sh
set -euo pipefail

# ---- knobs ---------------------------------------------------------------------------------
REF=${REF:-PKU-Alignment/alpaca-7b-reproduced}
PREP=${PREP:-./prep/mocan-beaver}            # from recipes/mocan_beaver_7b.sh step 1 (or any prepare)
HELDOUT=${HELDOUT:-PKU-Alignment/PKU-SafeRLHF-30K}
HELDOUT_SPLIT=${HELDOUT_SPLIT:-test}
N_HELDOUT=${N_HELDOUT:-200}
K_EVAL=${K_EVAL:-4}
OUT=${OUT:-./sweep}
BETA=${BETA:-0.1}
# multipliers to train at; "star" is the prep directory's lambda*
LAMBDAS=${LAMBDAS:-"0 0.25 0.5 star 1.5"}
GPUS=${GPUS:-8}                              # one node; evaluate samples with prepare's vLLM engines
# the primal step: likelihood (dual-weighted likelihood of prepare's samples, OpenRLHF's SFT trainer) or dpo (the paper's)
OBJECTIVE=${OBJECTIVE:-likelihood}
LAUNCH=${LAUNCH:-"deepspeed --module"}       # CPU: "torchrun --nproc_per_node 2 -m"
TRAIN_FLAGS=${TRAIN_FLAGS:-"--ds.zero_stage 2 --ds.param_dtype bf16 --ds.load_in_4bit --ds.lora.rank 8 --ds.lora.alpha 16 \
--train.micro_batch_size 4 --train.batch_size 64 --train.max_epochs 3 --adam.lr 5e-4 --data.max_len 1024"}
EVAL_FLAGS=${EVAL_FLAGS-"--dual.backend vllm --dual.num_gpus_per_actor 1"}   # set it empty for HF on CPU
# --------------------------------------------------------------------------------------------
mkdir -p "$OUT"
source "$(dirname "$0")/lib/runs.sh"

if [ "$OBJECTIVE" = dpo ]; then TRAINER=(openrlhf_dual.cli.train_dpo --model.beta "$BETA"); else TRAINER=(openrlhf_dual.cli.train_sft); fi
POLICIES=()
for LAM in $LAMBDAS; do
  if [ "$LAM" = star ]; then LAM_FLAG=(); NAME=lambda-star; LAM_SPEC="";
  else LAM_FLAG=(--dual.lambda "$LAM"); NAME="lambda-$LAM"; LAM_SPEC=":$LAM"; fi
  CKPT="$OUT/$NAME"
  # train (a finished run with the same settings is kept: recipes/lib/runs.sh), then make it loadable
  train_once "$CKPT" "$REF $PREP $OBJECTIVE $BETA ${LAM_FLAG[*]} $TRAIN_FLAGS" \
    $LAUNCH "${TRAINER[@]}" \
       --model.model_name_or_path "$REF" $TRAIN_FLAGS \
       --ckpt.output_dir "$CKPT" --logger.logging_steps 1 --logger.tensorboard_dir "$OUT/tensorboard/$NAME" \
       --dual.algo mocan --dual.prep_dir "$PREP" "${LAM_FLAG[@]}"
  loadable_ckpt "$REF"
  POLICIES+=("$NAME=$CKPT$LAM_SPEC")
done

python -m openrlhf_dual.cli.evaluate --dual.prep_dir "$PREP" --eval.out "$OUT/eval" \
   --eval.policy "${POLICIES[@]}" \
   --data.prompt_dataset "$HELDOUT" --data.prompt_split "$HELDOUT_SPLIT" --data.max_samples "$N_HELDOUT" \
   --rollout.n_samples_per_prompt "$K_EVAL" $EVAL_FLAGS
echo "sweep: $OUT/eval/report.md and $OUT/eval/plane.png"
