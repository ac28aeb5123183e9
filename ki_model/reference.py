"""Straightforward reference computations that the model's efficient paths are tested (and benchmarked) against.

Nothing here is used for training or inference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def fast_cross_entropy_full_logits(
    prompt_out: Float[Array, "b l w"],
    table: Float[Array, "v w"],
    tokens: Int[Array, "b l"],
    loss_mask: Bool[Array, "b l"],
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """`ki_model.losses.fast_cross_entropy` with the whole [b, l-1, vocab] logits array in float32."""
    logits = jnp.einsum("blw,vw->blv", prompt_out[:, :-1], table.astype(prompt_out.dtype),
                        preferred_element_type=jnp.float32)
    targets = tokens[:, 1:]
    weight = loss_mask[:, 1:].astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    count = jnp.maximum(jnp.sum(weight), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(nll * weight) / count, jnp.sum(correct * weight) / count
