#!/usr/bin/env bash
# The whole demo on a fresh machine: set up .venv, record the demo pusht dataset with the simulator,
# preprocess it into token shards, train the tiny pi0.5-KI model for a few minutes, evaluate it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export HF_HUB_OFFLINE=1 SDL_VIDEODRIVER=dummy
export HF_LEROBOT_HOME="${HF_LEROBOT_HOME:-$PWD/runs/lerobot}"
py=.venv/bin/python
repo_id=ki/pusht_demo
out=runs/demo

$py -m pipelines.make_demo_dataset --repo-id "$repo_id" --episodes "${DEMO_EPISODES:-20}" --seed 0 --skip-existing
$py -m pipelines.preprocess "$repo_id" --output "$out/shards" --workers 2 --show-rows 2 --overwrite
$py -m pipelines.train --shards "$out/shards" --checkpoint-dir "$out/checkpoint" --config tiny \
  --steps "${DEMO_STEPS:-300}" --batch-size 16 --overwrite
$py -m pipelines.evaluate --checkpoint "$out/checkpoint" --shards "$out/shards" --output "$out/eval"
echo
echo "shards:      $out/shards"
echo "checkpoint:  $out/checkpoint (metrics.jsonl inside)"
echo "eval report: $out/eval/eval_report.json"
echo "eval plot:   $out/eval/eval_plot.png"
