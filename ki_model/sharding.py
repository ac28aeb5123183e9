"""The device mesh and where arrays live on it: parameters sharded (FSDP) by their logical axis names, the batch
split over every device.

Logical names used by the modules: "vocab", "embed" (a model width), "embed_out" (the second width of a
width->width projection), "mlp", "heads", "kv_heads", "head_dim", "modulation", "norm", and None.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DATA_AXIS, FSDP_AXIS = "data", "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# FSDP: shard every weight along its model-width axis over the "fsdp" mesh axis; everything else replicated.
FSDP_RULES: LogicalRules = (("embed", FSDP_AXIS),)


class MeshError(ValueError):
    """A mesh that cannot be built from the devices as asked."""


def make_mesh(fsdp_devices: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
    """(data, fsdp) mesh over all devices: parameters sharded over `fsdp`, the batch over both axes."""
    devices = list(jax.devices() if devices is None else devices)
    if fsdp_devices < 1 or len(devices) % fsdp_devices:
        raise MeshError(f"--fsdp-devices {fsdp_devices} does not divide the {len(devices)} devices")
    grid = np.asarray(devices).reshape(len(devices) // fsdp_devices, fsdp_devices)
    return Mesh(grid, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def logical_to_spec(axes: Sequence[str | None], rules: LogicalRules = FSDP_RULES) -> PartitionSpec:
    """Map logical names through `rules`; a name without a rule is replicated (None)."""
    table = dict(rules)
    return PartitionSpec(*(table.get(a) if a is not None else None for a in axes))


def _is_var(x: object) -> bool:
    return isinstance(x, nnx.Variable)


def _axes(v: nnx.Variable) -> tuple[str | None, ...]:
    return v.get_metadata().get("out_sharding") or (None,) * len(v.get_value().shape)


def param_partition_specs(params: nnx.State, rules: LogicalRules = FSDP_RULES) -> nnx.State:
    """Each nnx.Param's PartitionSpec (works on abstract params, e.g. from nnx.eval_shape)."""
    return jax.tree.map(lambda v: v.replace(logical_to_spec(_axes(v), rules)), params, is_leaf=_is_var)


def param_shardings(params: nnx.State, mesh: Mesh, rules: LogicalRules = FSDP_RULES) -> nnx.State:
    """NamedShardings of the params on `mesh`; a mesh axis that does not divide its dimension leaves that dimension
    replicated. Works on abstract params."""

    def one(v: nnx.Variable) -> nnx.Variable:
        shape = v.get_value().shape
        spec = list(logical_to_spec(_axes(v), rules))
        for i, names in enumerate(spec):
            names = (names,) if isinstance(names, str) else tuple(names or ())
            if shape[i] % int(np.prod([mesh.shape[n] for n in names])):
                spec[i] = None
        return v.replace(NamedSharding(mesh, PartitionSpec(*spec)))

    return jax.tree.map(one, params, is_leaf=_is_var)
