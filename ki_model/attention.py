"""Attention tables and RoPE positions of docs/DESIGN.md §5, built explicitly block by block.

Blocks: I (image tokens, all cameras), T (text prompt: the ar==0 real part of `tokenized_prompt`),
F (`Action: ` FAST .. EOS: the ar==1 real part), A (the horizon noisy-action tokens of the action expert).

| query | may read                               |
|-------|----------------------------------------|
| I, T  | I, T (real tokens only)                |
| F     | I, T, and F at or before itself        |
| A_k   | I, T, A_k                              |

Nobody in I, T, F reads A and A never reads F. Training may draw K flow samples per pass: K action blocks
A_1..A_K, each reading I, T and itself only, never another block. Padding queries read like I/T (their outputs are
never used; this keeps every row non-empty). Positions: I and T count 0.. over real tokens, F continues after T,
every A_k starts right after T, so each sits at the same positions as at inference where the prefix is
[I | text_prompt].
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Bool, Int


class Layout(NamedTuple):
    mask: Bool[Array, "b n s"]  # query i may read key j
    positions: Int[Array, "b n"]  # RoPE positions of the queries


def _count_positions(valid: Bool[Array, "b n"]) -> Int[Array, "b n"]:
    """0, 1, 2, ... over the real tokens; a padding token gets its predecessor's count (never read)."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


def prefix_layout(prefix_valid: Bool[Array, "b n"]) -> Layout:
    """Inference prefix [I | text_prompt]: bidirectional over the real tokens."""
    n = prefix_valid.shape[1]
    mask = jnp.broadcast_to(prefix_valid[:, None, :], (prefix_valid.shape[0], n, n))
    return Layout(mask, _count_positions(prefix_valid))


def suffix_layout(prefix_valid: Bool[Array, "b n"], horizon: int) -> Layout:
    """Action tokens after a cached prefix: read the real prefix tokens and all action tokens; keys [prefix | A]."""
    b, n = prefix_valid.shape
    reads_prefix = jnp.broadcast_to(prefix_valid[:, None, :], (b, horizon, n))
    mask = jnp.concatenate([reads_prefix, jnp.ones((b, horizon, horizon), bool)], axis=2)
    start = jnp.sum(prefix_valid, axis=1, dtype=jnp.int32)[:, None]
    return Layout(mask, start + jnp.arange(horizon, dtype=jnp.int32)[None, :])


def training_layout(
    image_valid: Bool[Array, "b i"],
    prompt_mask: Bool[Array, "b l"],
    prompt_ar: Bool[Array, "b l"],
    horizon: int,
    action_blocks: int = 1,
) -> Layout:
    """The single training pass over [I | tokenized_prompt | A_1 .. A_K] (N = i + l + K * horizon, keys = queries)."""
    b, n_img = image_valid.shape
    n_bb = n_img + prompt_mask.shape[1]
    n_act = action_blocks * horizon
    no_img = jnp.zeros((b, n_img), bool)
    is_it = jnp.concatenate([image_valid, prompt_mask & ~prompt_ar], axis=1)  # [b, n_bb] real I or T
    is_f = jnp.concatenate([no_img, prompt_mask & prompt_ar], axis=1)  # [b, n_bb] real F
    order = jnp.arange(n_bb)
    causal = order[None, :] <= order[:, None]  # [q, k]

    # Backbone queries (I, T, F and padding) over backbone keys; they read no A key.
    bb_reads_bb = is_it[:, None, :] | (is_f[:, :, None] & is_f[:, None, :] & causal[None])
    bb_rows = jnp.concatenate([bb_reads_bb, jnp.zeros((b, n_bb, n_act), bool)], axis=2)
    # Action queries read real I/T keys and every key of their own block, never F nor another block.
    block = jnp.arange(n_act) // horizon
    own_block = block[:, None] == block[None, :]
    a_rows = jnp.concatenate(
        [jnp.broadcast_to(is_it[:, None, :], (b, n_act, n_bb)), jnp.broadcast_to(own_block, (b, n_act, n_act))], axis=2
    )
    mask = jnp.concatenate([bb_rows, a_rows], axis=1)

    bb_positions = _count_positions(is_it | is_f)  # F follows T in the prompt, so F continues after T
    a_start = jnp.sum(is_it, axis=1, dtype=jnp.int32)[:, None]
    a_positions = a_start + jnp.tile(jnp.arange(horizon, dtype=jnp.int32), action_blocks)[None, :]
    return Layout(mask, jnp.concatenate([bb_positions, a_positions], axis=1))


def cumulative_ar_layout(input_mask: Bool[Array, "b n"], ar_mask: Bool[Array, "b n"]) -> Layout:
    """big_vision's prefix-LM construction (token reads keys whose cumulative ar count is <= its own).

    Used only by the two-pass reference, as an independent construction to check `training_layout` against.
    """
    cum = jnp.cumsum(ar_mask.astype(jnp.int32), axis=1)
    mask = (cum[:, None, :] <= cum[:, :, None]) & input_mask[:, None, :] & input_mask[:, :, None]
    return Layout(mask, _count_positions(input_mask))
