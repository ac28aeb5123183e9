"""The optimizer: AdamW with openpi's schedule, clipped and stepped separately on each side of the insulation cut."""

from __future__ import annotations

from typing import Any

import jax
import optax

from ki_model.config import OptimizerConfig
from ki_model.lora import is_frozen
from ki_model.pi05_ki import param_group

Params = dict[str, Any]  # nnx.to_pure_dict of the model's nnx.Param state


__all__ = ["FROZEN", "SIDES", "OptimizerConfig", "Params", "make_optimizer", "make_schedule", "param_labels"]


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    if cfg.decay_steps is None:  # a run resolves it to its length (TrainConfig.resolved)
        raise ValueError("the optimizer's decay_steps is unresolved (None: the run's length); resolve it first")
    # openpi starts the warm-up at peak / (warmup + 1), not at 0, so that step 0 already updates.
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.peak_lr / (cfg.warmup_steps + 1),
        peak_value=cfg.peak_lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.decay_steps,
        end_value=cfg.decay_lr,
    )


SIDES = ("backbone", "action_expert")


FROZEN = "frozen"


def param_labels(params: Params) -> Params:
    """The insulation side (`param_group`) of every parameter leaf, or FROZEN for a frozen base weight of LoRA
    fine-tuning (stored in bfloat16: `ki_model.lora.is_frozen`), as a tree shaped like `params`."""
    return {name: jax.tree.map(lambda x, n=name: FROZEN if is_frozen(x) else param_group((n,)), sub)
            for name, sub in params.items()}


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW with clipping, run separately on each side of the insulation cut (docs/DESIGN.md §5).

    A global-norm clip over all gradients would let the flow loss rescale every backbone update (and the FAST loss
    every expert update) whenever it clips; each side therefore has its own clip and its own optimizer state. AdamW,
    weight decay and the schedule are per-element or per-step and couple nothing. With gradient accumulation the
    clip sees the accumulated gradients (ki_model.train).
    """

    def side() -> optax.GradientTransformation:
        return optax.chain(
            optax.clip_by_global_norm(cfg.clip_norm),
            optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
        )

    # Frozen weights (LoRA fine-tuning) get no update and no optimizer state.
    return optax.partition({**{name: side() for name in SIDES}, FROZEN: optax.set_to_zero()}, param_labels)
