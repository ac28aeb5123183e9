"""LoRA fine-tuning: low-rank updates on the attention and MLP weights of chosen parts, their base weights frozen.

A weight W [..., in, out] of a part with LoRA gets A [..., in, r] and B [..., r, out] (B starts at zero, so the
model starts as exactly the base model); the layer uses W + A @ B. Every other weight of that part is frozen
and stored in bfloat16 (openpi's LoRA recipe: half the memory of the frozen weights, no gradient, no optimizer
state). Parts: "backbone" (the SigLIP encoder and the Gemma backbone: the backbone side of the insulation cut; the
encoder has no LoRA, it is frozen) and "expert" (the action expert's Gemma; its small projections and time MLP stay
trainable). LoRA weights are named `<weight>_lora_a/_lora_b` next to their weight, so they belong to its side of
the cut (`ki_model.pi05_ki.param_group`).

Which parameters train is read from the stored dtype: a bfloat16 parameter is a frozen base weight
(`is_frozen`); the optimizer gives it no state and the train step no gradient. For inference `merge_lora` folds
A @ B into the weights (float32) and returns the config of the same model without LoRA: the Policy runs the plain
model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike
from jaxtyping import Array, Float

from ki_model.config import parse_lora  # noqa: F401  (re-exported: the --lora syntax)

# The top-level modules of each part.
LORA_PARTS = {"backbone": ("vision", "backbone"), "expert": ("action_expert",)}
# The weights that get LoRA (attention and MLP projections of the Gemma blocks).
LORA_WEIGHTS = ("q_einsum", "kv_einsum", "attn_vec_einsum", "gating_einsum", "linear")
FROZEN_DTYPE = jnp.bfloat16
_SUFFIXES = ("_lora_a", "_lora_b")


def is_lora_param(path: tuple) -> bool:
    return str(path[-1]).endswith(_SUFFIXES)


def frozen_paths(lora: tuple[tuple[str, int], ...], path: tuple) -> bool:
    """Whether the parameter at `path` is a frozen base weight under `lora` (config.lora)."""
    modules = {m for part, _ in lora for m in LORA_PARTS[part]}
    return str(path[0]) in modules and not is_lora_param(path)


def is_frozen(leaf: Any) -> bool:
    """A stored parameter (array or ShapeDtypeStruct) is frozen iff it is bfloat16 (trainable ones are float32)."""
    return getattr(leaf, "dtype", None) == FROZEN_DTYPE


def add_lora(module: nnx.Module, rngs: nnx.Rngs, rank: int, axes: Mapping[str, tuple]) -> None:
    """Give `module` A/B factors for each of its weights in LORA_WEIGHTS (A fan-in initialised, B zero)."""
    from ki_model.nn import ZEROS, Init, make_param

    for name in LORA_WEIGHTS:
        if not hasattr(module, name):
            continue
        shape = getattr(module, name).get_value().shape
        lead, (p, q) = shape[:-2], shape[-2:]
        lead_axes, (in_axis, out_axis) = axes[name][:-2], axes[name][-2:]
        setattr(module, name + "_lora_a",
                make_param(rngs, Init.fan_in((p, rank), [0]), (*lead, p, rank), (*lead_axes, in_axis, None)))
        setattr(module, name + "_lora_b", make_param(rngs, ZEROS, (*lead, rank, q), (*lead_axes, None, out_axis)))


def weight(module: nnx.Module, name: str, dtype: DTypeLike) -> Float[Array, "..."]:
    """The weight `name` of `module` as the layer uses it, in `dtype`: W, or W + A @ B (summed in float32) with LoRA."""
    w = getattr(module, name)[...]
    a = getattr(module, name + "_lora_a", None)
    if a is None:
        return w.astype(dtype)
    delta = jnp.einsum("...pr,...rq->...pq", a[...], getattr(module, name + "_lora_b")[...])
    return (w.astype(jnp.float32) + delta).astype(dtype)


def freeze(model: nnx.Module, lora: tuple[tuple[str, int], ...]) -> None:
    """Store the frozen base weights of `model` (a Pi05KI with config.lora = lora) in bfloat16, in place."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if frozen_paths(lora, path):
            var.set_value(var.get_value().astype(FROZEN_DTYPE))


def merge_lora(params: dict, config: Any) -> tuple[dict, Any]:
    """(params with every A @ B folded into its weight, all float32 and without LoRA factors, the config without
    LoRA): the plain model, for inference."""

    def merge(node: Any) -> Any:
        if not isinstance(node, dict):
            return jnp.asarray(node, jnp.float32)
        out = {}
        for key, value in node.items():
            if str(key).endswith(_SUFFIXES):
                continue
            a = node.get(f"{key}_lora_a")
            if a is not None:
                delta = jnp.einsum("...pr,...rq->...pq", jnp.asarray(a, jnp.float32),
                                   jnp.asarray(node[f"{key}_lora_b"], jnp.float32))
                out[key] = jnp.asarray(value, jnp.float32) + delta
            else:
                out[key] = merge(value)
        return out

    return merge(params), dataclasses.replace(config, lora=())


def split_frozen(params: Any) -> tuple[Any, Any]:
    """(trainable, frozen): two trees shaped like `params`, each with None where the other holds the leaf."""
    trainable = jax.tree.map(lambda x: None if is_frozen(x) else x, params)
    frozen = jax.tree.map(lambda x: x if is_frozen(x) else None, params)
    return trainable, frozen


def join_frozen(trainable: Any, frozen: Any) -> Any:
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)
