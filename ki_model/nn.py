"""Small building blocks shared by the Gemma and SigLIP modules.

Every weight is an `nnx.Param` in float32 carrying logical axis names (`out_sharding` metadata) so that
`ki_model.sharding.param_partition_specs` can map them onto a device mesh. Eager sharding is off: the
model can be built without a mesh, and the trainer places the parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike
from jaxtyping import Array, Float

from ki_model.config import remat_policy_name

LogicalAxes = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class Init:
    """A parameter initializer that runs on the host (numpy) when its key is concrete and in jax when traced.

    Host initialization avoids compiling one XLA program per random weight (tens of seconds for the tiny model on
    CPU); under `nnx.eval_shape` / `nnx.jit` (abstract or sharded creation) the same distribution is drawn by jax.
    """

    kind: str  # "zeros", "ones", "normal", "truncated_normal" (within +-2 stddev)
    stddev: float = 1.0

    @classmethod
    def fan_in(cls, shape: Sequence[int], in_axes: Sequence[int]) -> Init:
        """LeCun normal (truncated) over the input axes, the variance scaling of Gemma/ViT dense layers."""
        fan = int(np.prod([shape[a] for a in in_axes]))
        # 0.8796...: stddev of a unit normal truncated to [-2, 2]; dividing keeps the variance at 1/fan_in.
        return cls("truncated_normal", (1.0 / fan) ** 0.5 / 0.87962566103423978)

    def __call__(self, key: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
        if self.kind in ("zeros", "ones"):
            return (jnp.zeros if self.kind == "zeros" else jnp.ones)(shape, jnp.float32)
        if isinstance(key, jax.core.Tracer):
            if self.kind == "normal":
                return self.stddev * jax.random.normal(key, shape, jnp.float32)
            return self.stddev * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
        x = rng.standard_normal(shape, dtype=np.float32)
        if self.kind == "truncated_normal":
            bad = np.abs(x) > 2.0
            while bad.any():
                x[bad] = rng.standard_normal(int(bad.sum()), dtype=np.float32)
                bad = np.abs(x) > 2.0
        return jnp.asarray(self.stddev * x)


ZEROS, ONES = Init("zeros"), Init("ones")


def make_param(rngs: nnx.Rngs, init: Init, shape: Sequence[int], axes: LogicalAxes) -> nnx.Param:
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match the shape {tuple(shape)}")
    key = rngs.params() if init.kind not in ("zeros", "ones") else None
    return nnx.Param(init(key, tuple(shape)), out_sharding=axes, eager_sharding=False)


def fan_in_param(rngs: nnx.Rngs, shape: Sequence[int], in_axes: Sequence[int], axes: LogicalAxes) -> nnx.Param:
    return make_param(rngs, Init.fan_in(shape, in_axes), shape, axes)


LAYER_AXIS = "layers"  # the logical name of the leading axis of a stacked layer parameter (never sharded)


def remat_layer(fn: Callable, policy: bool | str) -> Callable:
    """`fn` (one layer of a scan body) rematerialised in the backward pass under `policy`."""
    name = remat_policy_name(policy)
    if name == "none":
        return fn
    saveable = {"nothing_saveable": jax.checkpoint_policies.nothing_saveable,
                "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[name]
    # prevent_cse=False: inside a scan XLA cannot merge the recomputation back into the forward pass anyway.
    return jax.checkpoint(fn, policy=saveable, prevent_cse=False)


def stack_layers(make: Callable[[], nnx.Module], depth: int) -> nnx.Module:
    """`depth` layers built by `make` (in order, so each draws its own initial weights as an unrolled stack would)
    as ONE module whose every parameter carries a leading layer axis [depth, ...] (openpi's scanned layout).
    `scan_layers` runs it."""
    layers = [make() for _ in range(depth)]
    stacked = layers[0]
    per_layer = [dict(nnx.to_flat_state(nnx.state(layer, nnx.Param))) for layer in layers]
    for path, var in per_layer[0].items():
        var.set_value(jnp.stack([p[path].get_value() for p in per_layer]))
        var.set_metadata("out_sharding", (LAYER_AXIS, *var.get_metadata()["out_sharding"]))
    return stacked


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of `n` that is at most `at_most` (at least 1)."""
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


def _chunked(fn: Callable, chunks: int, remat: bool | str) -> Callable:
    """`fn(*args)` (every array in args and in the result batch-leading) run as `chunks` strided chunks of the batch
    (chunk j: rows j, j + chunks, j + 2 chunks, ... so that each device of a data-sharded batch holds its share of
    every chunk), one after another in a `lax.map`, each rematerialised under `remat`: the backward pass then holds
    one chunk's intermediates at a time, and the gradients of the weights `fn` closes over are summed over the chunks
    by the scan's transpose (one weight-sized buffer). Exact: rows never interact inside a layer."""
    split = lambda x: x.reshape(x.shape[0] // chunks, chunks, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731
    join = lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:])  # noqa: E731
    step = remat_layer(lambda args: fn(*args), remat)

    def run(*args: Any) -> Any:
        return jax.tree.map(join, jax.lax.map(step, jax.tree.map(split, args)))

    return run


def scan_layers(
    stacks: Sequence[nnx.Module],
    layer: Callable[..., tuple[Any, Any]],
    carry: Any,
    xs: Any = None,
    *,
    remat: bool | str = "none",
    per_example: tuple = (),
    batch_chunks: int = 1,
) -> tuple[Any, Any]:
    """Run layer i of every stacked module in `stacks` (built by `stack_layers`, same depth) jointly, for i = 0, 1,
    ...: `carry, y_i = layer(blocks_i, carry, xs_i, *per_example)` with `jax.lax.scan`; returns the final carry and
    the y_i stacked on a leading layer axis. Each layer is rematerialised under `remat`.

    `batch_chunks` > 1 runs each layer on that many strided chunks of the batch one after another (`_chunked`; the
    largest divisor of the batch not above it): every array of `carry`, `xs_i`, `per_example` (arrays every layer
    reads, e.g. positions and the attention mask) and `y_i` must then lead with the batch axis. Under remat this
    divides the per-layer working set of the backward pass (the recomputed layer's activations and their gradients)
    by the chunk count; the saved layer inputs stay whole."""
    graphdefs, states = zip(*(nnx.split(s) for s in stacks), strict=True)
    batch = jax.tree.leaves(carry)[0].shape[0]
    chunks = largest_divisor(batch, batch_chunks)

    def body(carry: Any, per_layer: tuple[Any, Any]) -> tuple[Any, Any]:
        layer_states, x = per_layer

        def run(c: Any, x: Any, *args: Any) -> tuple[Any, Any]:
            blocks = [nnx.merge(g, s) for g, s in zip(graphdefs, layer_states, strict=True)]
            return layer(blocks, c, x, *args)

        if chunks == 1:
            return run(carry, x, *per_example)
        return _chunked(run, chunks, remat)(carry, x, *per_example)

    return jax.lax.scan(remat_layer(body, remat), carry, (tuple(states), xs))


def compute_dtype(name: str) -> DTypeLike:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel [in, out] (a transpose of torch's Linear weight)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: LogicalAxes,
        rngs: nnx.Rngs,
        use_bias: bool = True,
        kernel_init: Init | None = None,
    ):
        shape = (in_features, out_features)
        self.kernel = make_param(rngs, kernel_init or Init.fan_in(shape, [0]), shape, axes)
        self.bias = make_param(rngs, ZEROS, (out_features,), axes[1:]) if use_bias else None

    def __call__(self, x: Float[Array, "... i"], dtype: DTypeLike) -> Float[Array, "... o"]:
        y = jnp.einsum("...i,io->...o", x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias (SigLIP); statistics in float32."""

    def __init__(self, width: int, *, rngs: nnx.Rngs, eps: float = 1e-6):
        self.scale = make_param(rngs, ONES, (width,), ("norm",))
        self.bias = make_param(rngs, ZEROS, (width,), ("norm",))
        self.eps = eps

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)
