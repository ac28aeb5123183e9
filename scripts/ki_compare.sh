#!/usr/bin/env bash
# The figures the KI paper is about, on the demo's data and step budget (README, "Does knowledge insulation help?"):
# closed-loop figures of both heads for (a) stage 1 -> KI (the demo), (b) stage 1 -> insulation off, (c) insulation
# off from scratch, (d) KI from scratch, how much stage 2 disturbs stage 1's backbone, and the demo's recipe on more
# seeds. Run ./scripts/demo.sh first (it makes runs/demo/shards, runs/demo/stage1 and run (a) for seed 0).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 SDL_VIDEODRIVER=dummy
export HF_LEROBOT_HOME="${HF_LEROBOT_HOME:-$PWD/runs/lerobot}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/jax_cache}"
py=.venv/bin/python
demo=runs/demo
out=runs/compare
# Training settings are the recipes' (ki_model/recipes.py); the step counts too, unless DEMO_STAGE1_STEPS / DEMO_STEPS
# change them (each run's learning rate decays over its own length, and it saves at its end).
recipe_steps() { $py -c 'import sys; from ki_model.recipes import RECIPES; print(RECIPES[sys.argv[1]].steps)' "$1"; }
stage1="${DEMO_STAGE1_STEPS:-$(recipe_steps demo-stage1)}"
stage2="${DEMO_STEPS:-$(recipe_steps demo-stage2)}"
total=$((stage1 + stage2))
seeds="${COMPARE_SEEDS:-1 2}"
mkdir -p "$out/logs"
export KI_LOG_DIR="$PWD/$out/logs"
[ -f "$demo/checkpoint/metrics.jsonl" ] || { echo "error: run ./scripts/demo.sh first" >&2; exit 1; }

closed_loop() { bash scripts/evaluate_run.sh "$1" "$demo/shards" 0 "$1.evaluate.txt"; }  # as scripts/demo.sh
train() { $py -m pipelines.train "$@" | sed '/^step /d'; }  # the validation lines stay

# (a) is the demo's run (scripts/demo.sh evaluated it as closed_loop does); its stage 1 (the recipe demo-stage2's
# --init) also starts (b).
[ -d "$demo/checkpoint/rollout_fast" ] || closed_loop "$demo/checkpoint"
train --recipe demo-stage2 --checkpoint-dir "$out/b_stage1_off" --steps "$stage2" --insulation off --seed 0
closed_loop "$out/b_stage1_off"
train --recipe demo-scratch --checkpoint-dir "$out/c_scratch_off" --steps "$total" --insulation off --seed 0
closed_loop "$out/c_scratch_off"
train --recipe demo-scratch --checkpoint-dir "$out/d_scratch_ki" --steps "$total" --seed 0
closed_loop "$out/d_scratch_ki"
for s in $seeds; do
  train --recipe demo-stage1 --checkpoint-dir "$out/a_seed$s/stage1" --steps "$stage1" --seed "$s"
  train --recipe demo-stage2 --checkpoint-dir "$out/a_seed$s/checkpoint" --steps "$stage2" \
    --init "ki-backbone:$out/a_seed$s/stage1" --seed "$s"
  closed_loop "$out/a_seed$s/checkpoint"
done
runs=("$demo/checkpoint" "$out/b_stage1_off" "$out/c_scratch_off" "$out/d_scratch_ki")
labels="a: stage1->KI,b: stage1->off,c: scratch off,d: scratch KI"
for s in $seeds; do runs+=("$out/a_seed$s/checkpoint"); labels+=",a: seed $s"; done
$py -m pipelines.compare_runs "${runs[@]}" --labels "$labels" --output "$out/compare.png" | tee "$out/compare.txt"

# The harder configuration (the demo before): the contact-planner expert, whose choices depend on counters and random
# push lengths a policy cannot see, and a state of the agent's x, y only, absolute actions; trained from scratch
# without insulation as the demo used to be, with the same total steps.
if [ "${HARDER:-1}" = 1 ]; then
  hard=runs/harder
  mkdir -p "$hard"
  $py -m pipelines.make_demo_dataset --repo-id ki/pusht_planner --episodes 100 --seed 0 --expert planner --skip-existing
  $py -m pipelines.preprocess ki/pusht_planner --output "$hard/shards" --image-size 64 --action-horizon 16 \
    --max-token-len 64 --max-text-len 40 --prompt-layout fast --image-format png --workers 2 --overwrite --no-progress
  train --recipe harder --steps "$total" --seed 0  # its shards and checkpoint: $hard/shards, $hard/checkpoint
  $py -m pipelines.evaluate --checkpoint "$hard/checkpoint" --shards "$hard/shards" --batches 10 --batch-size 32 \
    --shuffle --flow-samples 8 > "$hard/evaluate.txt"
  $py -m pipelines.rollout --checkpoint "$hard/checkpoint" --episodes 20 --head flow --video-episodes 0 \
    | tee "$hard/rollout.txt"
fi
