#!/usr/bin/env bash
# MoCAN as in the paper (Huang et al., NeurIPS 2024): Alpaca-7B (reproduced) as pi_ref,
# beaver-7b-v1.0 reward and cost models, PKU-SafeRLHF-30K prompts and pairs, beta 0.1, K = 128.
# Single node. Edit the knobs, then run: bash recipes/mocan_beaver_7b.sh
set -euo pipefail

# ---- knobs ---------------------------------------------------------------------------------
REF=PKU-Alignment/alpaca-7b-reproduced
REWARD=PKU-Alignment/beaver-7b-v1.0-reward
COST=PKU-Alignment/beaver-7b-v1.0-cost
PROMPTS=PKU-Alignment/PKU-SafeRLHF-30K
PREP=./prep/mocan-beaver
SAVE=./ckpt/alpaca-7b-mocan
THRESHOLD=0.5        # E[safety] >= THRESHOLD, safety = -cost (pick it from $PREP/frontier.png)
BETA=0.1
N_PROMPTS=1000
K=128
GPUS=8
# --------------------------------------------------------------------------------------------

# 1. Dual step: sample K responses per prompt with OpenRLHF's vLLM engines, score, solve lambda*.
python -m openrlhf_dual.cli.prepare \
   --ref.model_name_or_path "$REF" \
   --data.prompt_dataset "$PROMPTS" --data.input_key prompt --data.max_samples "$N_PROMPTS" \
   --data.input_template $'BEGINNING OF CONVERSATION: USER: {} ASSISTANT:' \
   --rollout.n_samples_per_prompt "$K" --rollout.max_new_tokens 512 --rollout.temperature 1.0 \
   --dual.backend vllm --vllm.num_engines "$GPUS" --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.5 \
   --dual.num_gpus_per_actor 1 \
   --dual.reward "safe_rlhf:$REWARD" \
   --dual.safety "safe_rlhf:$COST,sign=-1" \
   --dual.threshold "$THRESHOLD" --dual.beta "$BETA" --dual.prep_dir "$PREP"

# 2. One unconstrained run: OpenRLHF's DPO on pseudo-preferences labelled by r + lambda*.g.
#    (paper: LoRA r=8 on a 4-bit base, lr 5e-4 cosine, 3 epochs, max length 512)
deepspeed --module openrlhf_dual.cli.train_dpo \
   --model.model_name_or_path "$REF" --model.beta "$BETA" \
   --ds.zero_stage 2 --ds.param_dtype bf16 --ds.load_in_4bit --ds.lora.rank 8 --ds.lora.alpha 16 \
   --model.gradient_checkpointing_enable \
   --train.micro_batch_size 4 --train.batch_size 64 --train.max_epochs 3 \
   --adam.lr 5e-4 --lr_scheduler cosine_with_min_lr --data.max_len 1024 \
   --ckpt.output_dir "$SAVE" --ckpt.save_steps -1 --logger.logging_steps 1 \
   --dual.algo mocan --dual.prep_dir "$PREP"
# With patches/0002 applied to OpenRLHF, the same run is your usual
#   deepspeed --module openrlhf.cli.train_dpo ... --dual.algo mocan --dual.prep_dir "$PREP"
