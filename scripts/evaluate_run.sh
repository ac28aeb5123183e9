#!/usr/bin/env bash
# The demo's evaluation of one training run, shared by scripts/demo.sh and scripts/ki_compare.sh so that every run is
# measured alike: open loop on 320 validation frames (one flow sample, the mean of 8, both FAST decodings), then both
# heads in closed loop from 20 initial states the recording never used, observing again every 2 steps of their
# 16-step chunks, the flow head executing the mean of 8 sampled chunks (README, the demo). Everything is written
# inside the checkpoint (the tools' default), where pipelines.compare_runs reads it.
# usage: scripts/evaluate_run.sh CHECKPOINT SHARDS VIDEO_EPISODES [EVALUATION_TEXT_FILE]
set -euo pipefail
ckpt=$1 shards=$2 videos=$3
py=.venv/bin/python
evaluation() {
  $py -m pipelines.evaluate --checkpoint "$ckpt" --shards "$shards" --batches 10 --batch-size 32 --shuffle \
    --flow-samples 8
}
if [ $# -ge 4 ]; then evaluation > "$4"; else evaluation; fi
$py -m pipelines.rollout --checkpoint "$ckpt" --episodes 20 --head flow --flow-samples 8 --replan 2 \
  --video-episodes "$videos"
$py -m pipelines.rollout --checkpoint "$ckpt" --episodes 20 --head fast --replan 2 --video-episodes 0
