#!/usr/bin/env bash
# MoCAN on several nodes: the dual step as a Ray job (sampling and scoring actors spread over the
# cluster), then DeepSpeed training from a hostfile. Edit the knobs, then run on the head node.
set -euo pipefail

# ---- knobs ---------------------------------------------------------------------------------
REF=PKU-Alignment/alpaca-7b-reproduced
REWARD=PKU-Alignment/beaver-7b-v1.0-reward
COST=PKU-Alignment/beaver-7b-v1.0-cost
PROMPTS=PKU-Alignment/PKU-SafeRLHF-30K
PREP=/shared/prep/mocan-beaver     # must be on storage every node sees
SAVE=/shared/ckpt/alpaca-7b-mocan
THRESHOLD=0.5
BETA=0.1
RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
NODES=2                             # the Ray cluster and the hostfile: NODES x GPUS_PER_NODE GPUs
GPUS_PER_NODE=8
ENGINES=$((NODES * GPUS_PER_NODE))  # vLLM engines across the cluster (sampling, then scoring: not at once)
HOSTFILE=./hostfile                 # "node1 slots=$GPUS_PER_NODE" per line
# --------------------------------------------------------------------------------------------

ray job submit --address="$RAY_ADDRESS" --runtime-env-json='{"working_dir": "."}' -- \
   python -m openrlhf_dual.cli.prepare \
   --ref.model_name_or_path "$REF" \
   --data.prompt_dataset "$PROMPTS" --data.input_key prompt --data.max_samples 1000 \
   --data.input_template $'BEGINNING OF CONVERSATION: USER: {} ASSISTANT:' \
   --rollout.n_samples_per_prompt 128 --rollout.max_new_tokens 512 \
   --dual.backend vllm --vllm.num_engines "$ENGINES" --vllm.gpu_memory_utilization 0.5 \
   --dual.num_gpus_per_actor 1 --dual.shard_size 64 \
   --dual.reward "safe_rlhf:$REWARD" --dual.safety "safe_rlhf:$COST,sign=-1" \
   --dual.threshold "$THRESHOLD" --dual.beta "$BETA" --dual.prep_dir "$PREP"

deepspeed --hostfile "$HOSTFILE" --module openrlhf_dual.cli.train_dpo \
   --model.model_name_or_path "$REF" --model.beta "$BETA" \
   --ds.zero_stage 3 --ds.param_dtype bf16 --model.gradient_checkpointing_enable \
   --train.micro_batch_size 4 --train.batch_size 128 --train.max_epochs 3 \
   --adam.lr 5e-7 --data.max_len 1024 \
   --ckpt.output_dir "$SAVE" --logger.logging_steps 1 \
   --dual.algo mocan --dual.prep_dir "$PREP"
