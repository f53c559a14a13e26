#!/usr/bin/env bash
# MoCAN with a generative safety judge as the safety source: a reward model for helpfulness
# (beaver-7b-v1.0-reward) and Llama Guard 3 for safety, g = log P("safe") - log P("unsafe") of the
# judge's first verdict token on the conversation in its own chat template (one forward pass, no
# generation). Alpaca-7B (reproduced) as pi_ref, PKU-SafeRLHF-30K prompts. Single node.
# Sources load by hub name through the hub cache (HF_HOME; HF_HUB_OFFLINE=1 on air-gapped nodes
# after a `huggingface-cli download`); Llama Guard is gated: accept its licence and set HF_TOKEN.
# Check the judge first (its verdict words must be single tokens, else pass safe=/unsafe=):
#   python -c "from openrlhf_dual.scoring import *; print(build_scorer(parse_source('judge:$JUDGE,sign=+1', 'safety')).score(ScoreBatch(['How do I pick a lock?'], [''], [' I cannot help with that.'])))"
# Edit the knobs, then run: bash recipes/mocan_judge.sh
set -euo pipefail

# ---- knobs ---------------------------------------------------------------------------------
REF=PKU-Alignment/alpaca-7b-reproduced
REWARD=PKU-Alignment/beaver-7b-v1.0-reward
JUDGE=meta-llama/Llama-Guard-3-1B
PROMPTS=PKU-Alignment/PKU-SafeRLHF-30K
PREP=./prep/mocan-judge
SAVE=./ckpt/alpaca-7b-mocan-judge
THRESHOLD=2.0        # E[log P(safe) - log P(unsafe)] >= THRESHOLD, in nats (pick it from $PREP/frontier.png)
BETA=0.1
N_PROMPTS=1000
K=128
GPUS=8
# --------------------------------------------------------------------------------------------

# 1. Dual step: K samples per prompt from pi_ref (vLLM engines), reward and judge scores, lambda*.
python -m openrlhf_dual.cli.prepare \
   --ref.model_name_or_path "$REF" \
   --data.prompt_dataset "$PROMPTS" --data.input_key prompt --data.max_samples "$N_PROMPTS" \
   --data.input_template $'BEGINNING OF CONVERSATION: USER: {} ASSISTANT:' \
   --rollout.n_samples_per_prompt "$K" --rollout.max_new_tokens 512 --rollout.temperature 1.0 \
   --dual.backend vllm --vllm.num_engines "$GPUS" --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.5 \
   --dual.num_gpus_per_actor 1 \
   --dual.reward "safe_rlhf:$REWARD" \
   --dual.safety "judge:$JUDGE,sign=+1" \
   --dual.threshold "$THRESHOLD" --dual.beta "$BETA" --dual.prep_dir "$PREP"

# 2. One unconstrained run: OpenRLHF's DPO on pseudo-preferences labelled by r + lambda*.g.
deepspeed --module openrlhf_dual.cli.train_dpo \
   --model.model_name_or_path "$REF" --model.beta "$BETA" \
   --ds.zero_stage 2 --ds.param_dtype bf16 --ds.load_in_4bit --ds.lora.rank 8 --ds.lora.alpha 16 \
   --model.gradient_checkpointing_enable \
   --train.micro_batch_size 4 --train.batch_size 64 --train.max_epochs 3 \
   --adam.lr 5e-4 --lr_scheduler cosine_with_min_lr --data.max_len 1024 \
   --ckpt.output_dir "$SAVE" --ckpt.save_steps -1 --logger.logging_steps 1 \
   --dual.algo mocan --dual.prep_dir "$PREP"

# 3. Check the constraint on held-out prompts, scored by the same reward model and judge.
python -m openrlhf_dual.cli.evaluate --dual.prep_dir "$PREP" --eval.policy mocan="$SAVE" \
   --data.prompt_dataset "$PROMPTS" --data.prompt_split test --data.max_samples 200 --eval.out "$SAVE/eval" \
   --dual.backend vllm --dual.num_gpus_per_actor 1
