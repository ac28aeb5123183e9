#!/usr/bin/env bash
# The whole demo on a fresh machine: set up .venv, record the demo pusht dataset with the simulator,
# preprocess it into token shards, train the tiny pi0.5-KI model for a few minutes, evaluate it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export HF_HUB_OFFLINE=1 SDL_VIDEODRIVER=dummy
export HF_LEROBOT_HOME="${HF_LEROBOT_HOME:-$PWD/runs/lerobot}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/jax_cache}"
py=.venv/bin/python
repo_id=ki/pusht_demo
out=runs/demo

$py -m pipelines.make_demo_dataset --repo-id "$repo_id" --episodes "${DEMO_EPISODES:-20}" --seed 0 --skip-existing
# Small images and a 16-step horizon keep the CPU demo to minutes; the defaults are 224 px and 50 steps.
$py -m pipelines.preprocess "$repo_id" --output "$out/shards" --image-size 64 --action-horizon 16 \
  --max-token-len 64 --max-text-len 40 --workers 2 --show-rows 2 --overwrite
$py -m pipelines.train --shards "$out/shards" --checkpoint-dir "$out/checkpoint" --config tiny \
  --steps "${DEMO_STEPS:-1000}" --batch-size 32 --log-every 100 --save-every 500 --overwrite
$py -m pipelines.evaluate --checkpoint "$out/checkpoint" --shards "$out/shards" --output "$out/eval"
echo
echo "shards:      $out/shards"
echo "checkpoint:  $out/checkpoint (metrics.jsonl inside)"
echo "eval report: $out/eval/eval_report.json"
echo "eval plot:   $out/eval/eval_plot.png"
