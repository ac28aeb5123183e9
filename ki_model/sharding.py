"""Logical axis names on the parameters -> PartitionSpecs / NamedShardings for a device mesh.

Logical names used by the modules: "vocab", "embed" (a model width), "embed_out" (the second width of a
width->width projection), "mlp", "heads", "kv_heads", "head_dim", "modulation", "norm", and None.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# FSDP: shard every weight along its model-width axis over the "fsdp" mesh axis; everything else replicated.
FSDP_RULES: LogicalRules = (("embed", "fsdp"),)


def logical_to_spec(axes: Sequence[str | None], rules: LogicalRules) -> PartitionSpec:
    """Map logical names through `rules`; a name without a rule is replicated (None)."""
    table = dict(rules)
    return PartitionSpec(*(table.get(a) if a is not None else None for a in axes))


def _is_var(x: object) -> bool:
    return isinstance(x, nnx.Variable)


def param_partition_specs(model: nnx.Module, rules: LogicalRules = FSDP_RULES) -> nnx.State:
    """The model's nnx.Param state with each value replaced by its PartitionSpec."""

    def spec(v: nnx.Variable) -> nnx.Variable:
        axes = v.get_metadata().get("out_sharding") or (None,) * v[...].ndim
        return v.replace(logical_to_spec(axes, rules))

    return jax.tree.map(spec, nnx.state(model, nnx.Param), is_leaf=_is_var)


def param_shardings(model: nnx.Module, mesh: Mesh, rules: LogicalRules = FSDP_RULES) -> nnx.State:
    """NamedShardings for the Params; an axis whose size the mesh axis does not divide stays replicated."""

    def sharding(v: nnx.Variable) -> nnx.Variable:
        shape = v[...].shape
        axes = v.get_metadata().get("out_sharding") or (None,) * len(shape)
        spec = list(logical_to_spec(axes, rules))
        for i, mesh_axes in enumerate(spec):
            if mesh_axes is None:
                continue
            names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            size = 1
            for n in names:
                size *= mesh.shape[n]
            if shape[i] % size:
                spec[i] = None
        return v.replace(NamedSharding(mesh, PartitionSpec(*spec)))

    return jax.tree.map(sharding, nnx.state(model, nnx.Param), is_leaf=_is_var)
