#!/usr/bin/env bash
# The whole demo on a fresh machine: set up .venv, record the demo pusht dataset with the simulator, preprocess it
# into token shards, train the tiny pi0.5 model from scratch, evaluate it open loop and in closed loop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export HF_HUB_OFFLINE=1 SDL_VIDEODRIVER=dummy
export HF_LEROBOT_HOME="${HF_LEROBOT_HOME:-$PWD/runs/lerobot}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/jax_cache}"
py=.venv/bin/python
repo_id=ki/pusht_demo
out=runs/demo
steps="${DEMO_STEPS:-4000}"

$py -m pipelines.make_demo_dataset --repo-id "$repo_id" --episodes "${DEMO_EPISODES:-100}" --seed 0 --skip-existing
# Small images and a 16-step horizon keep the CPU demo to minutes; the defaults are 224 px and 50. From scratch the
# demo writes PNG and the `fast` prompt layout: on this data both trained better than the defaults (JPEG, `pi05`), which
# exist for pretrained π0.5 checkpoints (README, "Training from scratch").
$py -m pipelines.preprocess "$repo_id" --output "$out/shards" --image-size 64 --action-horizon 16 \
  --max-token-len 64 --max-text-len 40 --prompt-layout fast --image-format png --workers 2 --show-rows 2 --overwrite
# Trained from scratch, so (README, "Training from scratch"): no insulation (there is no pretrained knowledge to
# protect, and an insulated expert cannot read a from-scratch prefix), number-aware state-token embeddings, and 8-px
# patches (the 64-px image as 8x8 tokens).
$py -m pipelines.train --shards "$out/shards" --checkpoint-dir "$out/checkpoint" --config tiny \
  --steps "$steps" --decay-steps "$steps" --batch-size 32 --log-every 100 --save-every 1000 --eval-every 500 \
  --insulation off --number-embeddings --vision-variant siglip_tiny_p8 --overwrite
$py -m pipelines.evaluate --checkpoint "$out/checkpoint" --shards "$out/shards" --output "$out/eval" \
  --batches 10 --batch-size 32 --shuffle
$py -m pipelines.rollout --checkpoint "$out/checkpoint" --episodes 20 --output "$out/rollout"
echo
echo "shards:      $out/shards"
echo "checkpoint:  $out/checkpoint (metrics.jsonl inside)"
echo "eval:        $out/eval/eval_report.json, eval_plot.png"
echo "closed loop: $out/rollout/rollout_report.json, rollout_plot.png, rollout.gif"
