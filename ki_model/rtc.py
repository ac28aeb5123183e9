"""Guided real-time chunking (RTC; Black, Galliker, Levine 2025, "Real-Time Execution of Action Chunking Flow
Policies", arXiv 2506.07339): flow sampling steered so that a new chunk continues the one the robot is executing.

While a chunk is computed (a latency of d control steps) the robot keeps executing the previous chunk, so the new
chunk's first d actions are settled before it exists, and the actions after them should join the old chunk's remainder
without a jump. The paper treats this as inpainting: at every Euler step the clean chunk the action expert predicts,
Â = x_t - t·v (ours: x_t = t·noise + (1 - t)·actions, v = noise - actions, t from 1 at the noise to 0 at the data), is
compared with the remainder Y under a soft mask W, and the velocity is corrected by the vector-Jacobian product of Â
with respect to x_t:

    g = (∂Â/∂x_t)ᵀ ((Y - Â) ⊙ W),        v_guided = v - w(t)·g

One `jax.vjp` through the action expert per step: the prefix's KV cache is a constant, the backbone never runs again.
The paper's time τ runs the other way (τ = 0 noise, τ = 1 data): τ = 1 - t, its velocity is -v, hence the minus sign
(the Euler step x - v_guided / N moves Â toward Y).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

MAX_GUIDANCE_WEIGHT = 5.0  # the paper's β


class Prefix(NamedTuple):
    """What a sample is guided toward, in the model's (normalized, stored) action space."""

    actions: Float[Array, "b h d"]  # Y: row 0 = the next action to execute; padded to the horizon
    weights: Float[Array, "b h"]  # W: the soft mask (`soft_mask`), 0 on the padding


def soft_mask(delay: int | Int[Array, ""], end: int | Int[Array, ""], horizon: int) -> Float[Array, " h"]:
    """The paper's Eq. 5 with end = H - s (s: the execution horizon): 1 on the first d actions (executed from the
    previous chunk while this one is computed), c·(e^c - 1)/(e - 1) with c_i = (end - i)/(end - d + 1) for
    d <= i < end, 0 from `end` on (no previous action to agree with). `end` wins over `delay` (d > end: ones up to
    end). Ints or traced scalars."""
    i = jnp.arange(horizon)
    d = jnp.minimum(delay, end)
    c = jnp.clip((end - i) / (end - d + 1), 0.0, 1.0)
    decay = c * jnp.expm1(c) / (math.e - 1.0)
    return jnp.where(i < d, 1.0, jnp.where(i >= end, 0.0, decay)).astype(jnp.float32)


def guidance_weight(t: Float[Array, ""], max_weight: float) -> Float[Array, ""]:
    """The paper's min(β, (1 - τ)/τ · 1/r²_τ) with 1/r²_τ = (τ² + (1 - τ)²)/(1 - τ)² and τ = 1 - t, which is
    (τ² + (1 - τ)²)/(τ(1 - τ)): symmetric in t and τ, 2 at mid-flow, β toward both ends."""
    # At the noise (t = 1) the denominator is 0 and the quotient +inf (its numerator is 1): the clip makes it β.
    return jnp.minimum(max_weight, (t**2 + (1.0 - t) ** 2) / (t * (1.0 - t)))


def guided_velocity(
    velocity: Callable[[Float[Array, "b h d"]], Float[Array, "b h d"]],
    x_t: Float[Array, "b h d"],
    t: Float[Array, ""],
    prefix: Prefix,
    max_weight: float,
) -> Float[Array, "b h d"]:
    """v - w(t)·(∂Â/∂x_t)ᵀ((Y - Â) ⊙ W) at x_t, with `velocity` the expert's flow at time t. Rows of a batch are
    independent samples, so one VJP of the batch gives each row its own Jacobian product."""

    def clean(x: Float[Array, "b h d"]) -> tuple[Float[Array, "b h d"], Float[Array, "b h d"]]:
        v = velocity(x)
        return x - t * v, v

    a_hat, vjp, v = jax.vjp(clean, x_t, has_aux=True)
    (g,) = vjp((prefix.actions - a_hat) * prefix.weights[..., None])
    return v - guidance_weight(t, max_weight) * g
