"""Named training recipes: whole `TrainConfig`s, written once here (`python -m pipelines.train --recipe NAME`).

A recipe is data, in the manner of a config table: scripts/demo.sh and scripts/ki_compare.sh train through these
entries and only add what differs per run (a seed, a checkpoint directory, an ablation switch, the step counts of
`DEMO_STAGE1_STEPS` / `DEMO_STEPS`), so the demo's settings live here and nowhere else. Flags given after `--recipe`
change the recipe's fields. Paths are relative to the repository root, where the scripts run. A field left as
`MISSING` (the data and checkpoint of a fine-tune) must be given (`--shards DIR`, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tyro import MISSING

from ki_model.config import preset_optimizer
from ki_model.train_config import ModelOptions, TrainConfig

# The CPU demo (scripts/demo.sh): its shards, the demo preset, logs and validation every 500 steps; each stage decays
# its learning rate over its own length and saves at its end (decay_steps / save_every None: the run's --steps).
_DEMO = TrainConfig(
    shards="runs/demo/shards",
    checkpoint_dir=MISSING,
    config="demo",
    batch_size=32,
    log_every=100,
    eval_every=500,
    overwrite=True,
    save_every=None,
    optimizer=dataclasses.replace(preset_optimizer("demo"), decay_steps=None),
)
# Stage 1 of the KI recipe: vision + backbone learn the FAST tokens alone (no action expert runs), a π0-FAST-style
# policy; from scratch, so the state's number tokens start from a code of their value.
_DEMO_STAGE1 = dataclasses.replace(
    _DEMO, checkpoint_dir="runs/demo/stage1", steps=500, model=ModelOptions(flow_loss_weight=0.0),
    number_embeddings=True,
)
# Stage 2: stage 1's vision and backbone, a fresh action expert; insulation on (the default). The expert's output is
# the clean chunk (flow_target "clean"): the same flow, learned from fewer rows (docs/demo_random_start.md). 2500
# steps: at 1000 the flow head closed half as much in closed loop, and 2500 fit the validation chunks better than 2000
# in each of five seeds (the mean of 8 samples, which the demo's rollout executes); two (noise, time) draws per row:
# the two weakest of five seeds closed twice as much with them, four draws no more than two (README, the demo).
_DEMO_STAGE2 = dataclasses.replace(
    _DEMO, checkpoint_dir="runs/demo/checkpoint", steps=2_500, init="ki-backbone:runs/demo/stage1",
    model=ModelOptions(flow_target="clean", flow_samples=2),
)

# README "Fine-tuning π0.5 from openpi weights": float32 weights + Adam, bfloat16 activations, per-layer remat, each
# layer on 8 slices of the batch; the LoRA one with openpi's ranks.
_PI05_FINETUNE = TrainConfig(
    shards=MISSING, checkpoint_dir=MISSING, init=MISSING, config="pi05", batch_size=32,
    model=ModelOptions(remat=True, layer_chunks=8),
)

RECIPES: dict[str, TrainConfig] = {
    "demo-stage1": _DEMO_STAGE1,
    "demo-stage2": _DEMO_STAGE2,
    # scripts/ki_compare.sh: both heads trained together from scratch for the two stages' steps (runs c, d).
    "demo-scratch": dataclasses.replace(
        _DEMO, steps=_DEMO_STAGE1.steps + _DEMO_STAGE2.steps, number_embeddings=True, model=_DEMO_STAGE2.model,
    ),
    # scripts/ki_compare.sh's harder configuration (the demo of an earlier round): the contact-planner recording,
    # the tiny preset with 8-px patches, from scratch without insulation, for the two stages' steps.
    "harder": dataclasses.replace(
        _DEMO, shards="runs/harder/shards", checkpoint_dir="runs/harder/checkpoint", config="tiny",
        optimizer=dataclasses.replace(preset_optimizer("tiny"), decay_steps=None),
        steps=_DEMO_STAGE1.steps + _DEMO_STAGE2.steps, number_embeddings=True,
        model=ModelOptions(insulation=False, vision_variant="siglip_tiny_p8"),
    ),
    "pi05-finetune": _PI05_FINETUNE,
    "pi05-lora": dataclasses.replace(
        _PI05_FINETUNE, model=dataclasses.replace(_PI05_FINETUNE.model, lora="backbone,expert"),
    ),
}


class RecipeError(ValueError):
    """An unknown recipe, or one used without the fields it leaves to the user."""


def recipe(name: str, **changes: Any) -> TrainConfig:
    """The recipe `name` with `changes` applied; every field it leaves MISSING must be among them."""
    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; recipes: {sorted(RECIPES)}")
    cfg = dataclasses.replace(RECIPES[name], **changes)
    missing = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) is MISSING]
    if missing:
        raise RecipeError(f"recipe {name!r} needs {', '.join(missing)}")
    return cfg
