#!/usr/bin/env bash
# PeCAN as in the paper: no reward or cost model, only preference data. Alpaca-7B (reproduced) as
# pi_ref, PKU-SafeRLHF-30K's two judgements per pair (better_response_id: helpfulness,
# safer_response_id: safety), beta 0.1. Single node. Edit the knobs, then run:
#   bash recipes/pecan_beaver_7b.sh
set -euo pipefail

# ---- knobs ---------------------------------------------------------------------------------
REF=PKU-Alignment/alpaca-7b-reproduced
PREFS=PKU-Alignment/PKU-SafeRLHF-30K
PROMPTS=PKU-Alignment/PKU-SafeRLHF-30K
WORK=$PWD/pecan-beaver              # absolute: Ray actors read from here
MARGIN=1.0           # E_pi[g] - E_ref[g] >= MARGIN, g = beta log(pi_g / pi_ref): see $WORK/prep/frontier.png
BETA=0.1             # one beta for both pre-alignments, the dual and the PeCAN run
N_PROMPTS=1600
K=192                # the paper: ~1600 prompts x 192; with 8-32 the margin dual can be infeasible
GPUS=8
TEMPLATE=$'BEGINNING OF CONVERSATION: USER: {} ASSISTANT:'
DPO_FLAGS=(--ds.zero_stage 2 --ds.param_dtype bf16 --ds.load_in_4bit --ds.lora.rank 8 --ds.lora.alpha 16
           --model.gradient_checkpointing_enable --train.micro_batch_size 4 --train.batch_size 64
           --train.max_epochs 3 --adam.lr 5e-4 --lr_scheduler cosine_with_min_lr --data.max_len 1024
           --ckpt.save_steps -1 --logger.logging_steps 1)
# --------------------------------------------------------------------------------------------

# 1. Pre-alignment data: one JSONL per judgement, in OpenRLHF's prompt/chosen/rejected convention.
python -m openrlhf_dual.cli.split_preferences --data.dataset "$PREFS" --out "$WORK/data"

# 2. Pre-alignment: two runs of OpenRLHF's own DPO from the same reference with the same beta.
#    With LoRA, OpenRLHF saves the adapter only: merge it (OpenRLHF's lora_combiner) so that step 3
#    loads a full HF checkpoint.
for NAME in helpful safe; do
  deepspeed --module openrlhf.cli.train_dpo \
     --model.model_name_or_path "$REF" --model.beta "$BETA" "${DPO_FLAGS[@]}" \
     --data.dataset "$WORK/data/$NAME.jsonl" --data.prompt_key prompt --data.input_template "$TEMPLATE" \
     --ckpt.output_dir "$WORK/lora_$NAME"
  python -m openrlhf.cli.lora_combiner --model_path "$REF" --lora_path "$WORK/lora_$NAME" \
     --output_path "$WORK/pi_$NAME" --ds.param_dtype bf16
done

# 3. Dual step on implicit rewards: K samples of pi_ref, sequence log-probs of pi_ref, pi_helpful
#    and pi_safe on exactly the generated tokens (log-prob actors, several per model across GPUs).
python -m openrlhf_dual.cli.prepare --dual.algo pecan \
   --ref.model_name_or_path "$REF" \
   --data.prompt_dataset "$PROMPTS" --data.input_key prompt --data.max_samples "$N_PROMPTS" \
   --data.input_template "$TEMPLATE" \
   --rollout.n_samples_per_prompt "$K" --rollout.max_new_tokens 512 \
   --dual.backend vllm --vllm.num_engines "$GPUS" --vllm.gpu_memory_utilization 0.5 \
   --dual.num_actors 2 --dual.num_gpus_per_actor 0.5 \
   --dual.reward "policy:$WORK/pi_helpful" --dual.safety "policy:$WORK/pi_safe,sign=+1" \
   --dual.threshold "$MARGIN" --dual.beta "$BETA" --dual.prep_dir "$WORK/prep"

# 4. One PeCAN run: OpenRLHF's DPO on pseudo-preferences labelled by s_r + lambda* s_g. No
#    --data.input_template: the pairs' prompts are already the exact text pi_ref was given.
deepspeed --module openrlhf_dual.cli.train_dpo \
   --model.model_name_or_path "$REF" --model.beta "$BETA" "${DPO_FLAGS[@]}" \
   --ckpt.output_dir "$WORK/pecan" --dual.algo pecan --dual.prep_dir "$WORK/prep"
