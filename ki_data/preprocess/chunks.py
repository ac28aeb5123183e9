"""Action chunks: row t of an episode carries actions t .. t+H-1, padded inside the episode with its last action."""

from __future__ import annotations

import numpy as np
from jaxtyping import Bool, Float, Int


def chunk_indices(length: int, horizon: int) -> tuple[Int[np.ndarray, "n h"], Bool[np.ndarray, "n h"]]:
    """For every frame t: indices t..t+H-1 clamped to the last frame (the last action repeats), and the pad mask."""
    steps = np.arange(length)[:, None] + np.arange(horizon)[None, :]
    return np.minimum(steps, length - 1), steps >= length


def action_chunks(
    actions: Float[np.ndarray, "n d"], horizon: int
) -> tuple[Float[np.ndarray, "n h d"], Bool[np.ndarray, "n h"]]:
    """Chunk t = actions[t .. t+H-1] inside the episode, padded with the last action; and the pad mask."""
    idx, is_pad = chunk_indices(len(actions), horizon)
    return actions[idx], is_pad
