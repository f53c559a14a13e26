#!/usr/bin/env bash
# One-shot constrained PPO: lambda* from the dual step, then ONE ordinary train_ppo_ray run whose
# reward is r + lambda*.g (no Lagrangian loop). The paper's models: Alpaca-7B (reproduced) as
# pi_ref and actor, beaver-7b-v1.0 reward and cost, PKU-SafeRLHF-30K prompts, beta 0.1.
# Single node, 8 GPUs, Ray. Edit the knobs, then run: bash recipes/ppo_one_shot.sh
#
# How the reward reaches PPO: `--dual.prep_dir $PREP` (patched OpenRLHF, patches/0002) sets
# `--reward.remote_url $PREP/ppo_reward.py`; with stock OpenRLHF pass that flag yourself. The file
# loads the beaver models in each vLLM engine process (one copy per engine, on its GPU): leave them
# room with --vllm.gpu_memory_utilization. For many engines or larger scorers, serve them once
# instead and point PPO at the server (REWARD_SERVER=1 below):
#   python -m openrlhf_dual.cli.serve_reward --dual.prep_dir $PREP --port 5000   # on GPUs of its own
#   ... --reward.remote_url http://127.0.0.1:5000/get_reward
# Co-locating the scorers with OpenRLHF's placement groups: train_ppo_ray reserves one bundle
# {"GPU": 1, "CPU": 1} per actor GPU (--train.colocate_all puts actor, ref and vLLM on the same
# bundles). A reward server is outside those groups: start it on GPUs Ray does not schedule on
# (CUDA_VISIBLE_DEVICES of the server process, and `ray start --num-gpus` that leaves them out),
# or give it a node of its own and pass --host 0.0.0.0 on a trusted network.
set -euo pipefail

# ---- knobs ---------------------------------------------------------------------------------
REF=PKU-Alignment/alpaca-7b-reproduced
REWARD=PKU-Alignment/beaver-7b-v1.0-reward
COST=PKU-Alignment/beaver-7b-v1.0-cost
PROMPTS=PKU-Alignment/PKU-SafeRLHF-30K
PREP=${PREP:-$PWD/prep/ppo-beaver}   # absolute: Ray workers load $PREP/ppo_reward.py
SAVE=$PWD/ckpt/alpaca-7b-ppo-one-shot
THRESHOLD=0.5        # E[safety] >= THRESHOLD, safety = -cost (pick it from $PREP/frontier.png)
BETA=0.1             # the KL coefficient: the dual's beta IS PPO's --algo.kl.init_coef
N_PROMPTS=1000
K=128
GPUS=8
REWARD_SERVER=${REWARD_SERVER:-0}
# --------------------------------------------------------------------------------------------

# 1. Dual step (skipped when $PREP already holds a solution; rerunning it resumes or re-solves).
if [ ! -f "$PREP/dual.json" ]; then
  python -m openrlhf_dual.cli.prepare \
     --ref.model_name_or_path "$REF" \
     --data.prompt_dataset "$PROMPTS" --data.input_key prompt --data.max_samples "$N_PROMPTS" \
     --data.input_template $'BEGINNING OF CONVERSATION: USER: {} ASSISTANT:' \
     --rollout.n_samples_per_prompt "$K" --rollout.max_new_tokens 512 \
     --dual.backend vllm --vllm.num_engines "$GPUS" --vllm.gpu_memory_utilization 0.5 --dual.num_gpus_per_actor 1 \
     --dual.reward "safe_rlhf:$REWARD" --dual.safety "safe_rlhf:$COST,sign=-1" \
     --dual.threshold "$THRESHOLD" --dual.beta "$BETA" --dual.prep_dir "$PREP"
fi

if [ "$REWARD_SERVER" = 1 ]; then
  REWARD_FLAGS=(--reward.remote_url http://127.0.0.1:5000/get_reward)
else
  REWARD_FLAGS=(--dual.prep_dir "$PREP")
fi

# 2. One PPO run on r + lambda*.g. The KL penalty is fixed at beta (no adaptive KL target): the
#    dual's optimum pi_lambda* is that of the beta-regularised objective. Settings that keep
#    pi_lambda* the optimum of what PPO optimises (docs/ppo_landing.md, measured on the toy world):
#    k1 in the reward (no --algo.kl.use_loss: as a loss, k3 is a per-token forward KL and lets the
#    policy leave the reference's support), RLOO advantages (reinforce_baseline's group mean
#    includes the sample itself: effective beta x n/(n-1), x4/3 here; GRPO's group_norm divides
#    the reward, not the KL, by a std that shrinks as the policy sharpens, and overshoots), no
#    entropy bonus, no --reward.normalize_enable. REINFORCE++ (--algo.advantage.estimator
#    reinforce) is unbiased too.
ray job submit --address="http://127.0.0.1:8265" \
   -- python3 -m openrlhf.cli.train_ppo_ray \
   --ref.num_nodes 1 --ref.num_gpus_per_node "$GPUS" \
   --actor.num_nodes 1 --actor.num_gpus_per_node "$GPUS" \
   --vllm.num_engines "$GPUS" --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.5 \
   --train.colocate_all --vllm.enable_sleep --ds.enable_sleep \
   --actor.model_name_or_path "$REF" \
   --data.prompt_dataset "$PROMPTS" --data.input_key prompt \
   --data.input_template $'BEGINNING OF CONVERSATION: USER: {} ASSISTANT:' \
   --data.max_samples 100000 --data.max_len 1024 --rollout.max_new_tokens 512 \
   --algo.advantage.estimator rloo --rollout.n_samples_per_prompt 4 \
   --algo.kl.init_coef "$BETA" --algo.kl.estimator k1 \
   --rollout.batch_size 128 --rollout.micro_batch_size 8 --train.batch_size 128 --train.micro_batch_size 4 \
   --train.max_epochs 1 --train.num_episodes 1 --actor.adam.lr 5e-7 \
   --ds.zero_stage 3 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable \
   --ckpt.output_dir "$SAVE" --ckpt.save_steps -1 --logger.logging_steps 1 \
   "${REWARD_FLAGS[@]}"
# wandb/tensorboard (--logger.*) show dual_reward and dual_safety_0 next to the reward: helpfulness
# and safety as they move. Check the constraint after training with the evaluate step.
