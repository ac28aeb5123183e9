"""What both checkpoint formats share: writing converted arrays into the model's parameters, the model's own
parameter shapes, and error listings."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from ki_model.checkpoint import CheckpointError
from ki_model.config import Pi05KIConfig

_LIST_LIMIT = 12

def write_into_params(params: dict, tensors: Iterator[tuple[tuple, np.ndarray]]) -> None:
    """Put converted arrays into a `nnx.to_pure_dict` parameter tree in place, one at a time: each new array placed
    with the sharding of the one it replaces (so the old one is freed as it goes), its shape checked."""
    for target, value in tensors:
        *parents, leaf = target
        node = params
        for key in parents:
            node = node[key]
        old = node[leaf]
        if tuple(old.shape) != value.shape:
            raise CheckpointError(f"parameter {target} has shape {tuple(old.shape)}, converted {value.shape}")
        sharding = getattr(old, "sharding", None)
        node[leaf] = jax.device_put(value.astype(old.dtype), sharding) if sharding else value.astype(old.dtype)
        del old

ParamPath = tuple[str | int, ...]

def listing(names: Sequence[str]) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else ""
    return ", ".join(names[:_LIST_LIMIT]) + more


def architecture(config: Pi05KIConfig) -> tuple:
    """The config fields that decide the shapes of the parameters loaded here (sizes, whether named or explicit)."""
    return config.backbone, config.expert, config.vision, config.vocab_size, config.image_size


def host_device() -> jax.Device:
    # Checkpoint tensors are read and converted on the host; only the final arrays go to the model's devices.
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return jax.devices()[0]


def model_param_shapes(config: Pi05KIConfig) -> dict[ParamPath, tuple[int, ...]]:
    abstract = nnx.eval_shape(lambda: config.create(nnx.Rngs(0)))
    return {p: tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}



def write_into_model(model: nnx.Module, checked: Pi05KIConfig, fields: Callable[[Pi05KIConfig], tuple],
                     tensors: Iterator[tuple[ParamPath, np.ndarray]]) -> None:
    """Write converted arrays into a `Pi05KI`'s parameters in place, one at a time, once the model is known to have
    the architecture (`fields`) of the config the checkpoint was checked against."""
    config = getattr(model, "config", None)
    if not isinstance(config, Pi05KIConfig) or fields(config) != fields(checked):
        raise CheckpointError(
            f"the model's architecture {None if config is None else fields(config)} differs from the one "
            f"this checkpoint was checked against {fields(checked)}"
        )
    variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for target, value in tensors:
        var = variables[target]
        old = var.get_value()
        var.set_value(jax.device_put(value.astype(old.dtype), old.sharding))
        del value, old
