#!/usr/bin/env bash
# The whole demo on a fresh machine: set up .venv, record the pusht demo dataset with the simulator, preprocess it
# into token shards, train the tiny pi0.5 model with the KI recipe (stage 1: the backbone learns FAST tokens alone;
# stage 2: a fresh action expert learns the flow with insulation on), evaluate it open loop and in closed loop with
# both heads. Library logs go to runs/demo/logs/; the terminal keeps one progress bar per stage and the summaries.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export HF_HUB_OFFLINE=1 SDL_VIDEODRIVER=dummy
export HF_LEROBOT_HOME="${HF_LEROBOT_HOME:-$PWD/runs/lerobot}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/jax_cache}"
py=.venv/bin/python
repo_id=ki/pusht_line
out=runs/demo
seed="${DEMO_SEED:-0}"
mkdir -p "$out/logs"
export KI_LOG_DIR="$PWD/$out/logs"

# The task: push the T to the goal from behind it (--start behind: the agent starts where the line expert pushes
# from; the expert is a function of what the policy observes), each episode ending 10 steps after the expert is done
# (README, the demo).
$py -m pipelines.make_demo_dataset --repo-id "$repo_id" --episodes "${DEMO_EPISODES:-300}" --seed 0 --expert line \
  --start behind --after-done 10 --skip-existing
# The block's pose joins the state; the agent's x, y actions are stored relative to its position (delta actions).
# Small images and a 16-step horizon keep the CPU demo to minutes (defaults: 224 px, 50 steps); the block's pose is
# in the state, so 32 px (16 image tokens of 8 px) is enough to keep the images in the prompt.
$py -m pipelines.preprocess "$repo_id" --output "$out/shards" --image-size 32 --action-horizon 16 \
  --max-token-len 64 --max-text-len 40 --prompt-layout fast --image-format png --workers 2 --show-rows 1 --overwrite \
  --state-keys observation.state,observation.environment_state --delta-actions x,y
# Training settings live in the recipes demo-stage1 and demo-stage2 (ki_model/recipes.py: the demo preset, batch,
# schedule, logging, and the directories under runs/demo this script reads); DEMO_STAGE1_STEPS / DEMO_STEPS change
# their lengths (the learning rate decays over each stage, which saves at its end).
# Stage 1: vision + backbone learn the FAST tokens alone (no action expert runs): a pi0-FAST-style policy.
$py -m pipelines.train --recipe demo-stage1 --seed "$seed" ${DEMO_STAGE1_STEPS:+--steps "$DEMO_STAGE1_STEPS"}
# Stage 2: from stage 1's vision and backbone, a fresh action expert; insulation on (the default).
$py -m pipelines.train --recipe demo-stage2 --seed "$seed" ${DEMO_STEPS:+--steps "$DEMO_STEPS"}
# Open loop, then both heads in closed loop (the flow head executing the mean of 8 sampled chunks), inside the
# checkpoint: scripts/evaluate_run.sh, which scripts/ki_compare.sh runs on every run it compares.
ckpt="$out/checkpoint"
bash scripts/evaluate_run.sh "$ckpt" "$out/shards" 3
echo
echo "shards:      $out/shards"
echo "checkpoints: $out/stage1 (FAST only), $out/checkpoint (KI; metrics.jsonl inside)"
echo "eval:        $ckpt/eval/eval_report.json, eval_plot.png"
echo "closed loop: $ckpt/rollout_mean8/ (flow head: report, plot, GIF), $ckpt/rollout_fast/ (FAST head)"
echo "logs:        $out/logs/"
