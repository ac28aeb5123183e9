"""Action chunks: row t of an episode carries actions t .. t+H-1, padded inside the episode with its last action."""

from __future__ import annotations

import numpy as np
from jaxtyping import Bool, Float, Int

from ki_data.actions import to_relative


def chunk_indices(length: int, horizon: int) -> tuple[Int[np.ndarray, "n h"], Bool[np.ndarray, "n h"]]:
    """For every frame t: indices t..t+H-1 clamped to the last frame (the last action repeats), and the pad mask."""
    steps = np.arange(length)[:, None] + np.arange(horizon)[None, :]
    return np.minimum(steps, length - 1), steps >= length


def action_chunks(
    actions: Float[np.ndarray, "n d"],
    horizon: int,
    state: Float[np.ndarray, "n s"] | None = None,
    delta: tuple[int, ...] | None = None,
) -> tuple[Float[np.ndarray, "n h d"], Bool[np.ndarray, "n h"]]:
    """Chunk t = actions[t .. t+H-1] inside the episode, padded with the last action; and the pad mask. With a delta
    spec (ki_data.actions), chunk t's relative dimensions are taken against frame t's state."""
    idx, is_pad = chunk_indices(len(actions), horizon)
    if delta is None:
        return actions[idx], is_pad
    if state is None:
        raise ValueError("delta actions need the state of every frame")
    return to_relative(actions[idx], state, delta), is_pad
