"""The model's input: images per camera, their masks, state and the token fields of the prompt (docs/DESIGN.md §3/§4)."""

from __future__ import annotations

import typing
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Float, Int, UInt8

from ki_data import schema
from ki_data.schema import PROMPT_COLUMNS, TEXT_COLUMNS, TOKEN_COLUMNS


def pad_action_dim(actions: Float[np.ndarray, "*b h d"], dim: int) -> Float[np.ndarray, "*b h dim"]:
    """A dataset's action chunks zero-padded to the model's action dimension (openpi's π0.5 checkpoints have 32;
    the FAST tokens and everything a user sees stay over the dataset's own dimensions)."""
    actions = np.asarray(actions, np.float32)
    if actions.shape[-1] > dim:
        raise ObservationError(f"actions have {actions.shape[-1]} dimensions, more than the model's {dim}")
    return np.pad(actions, [(0, 0)] * (actions.ndim - 1) + [(0, dim - actions.shape[-1])])


class ObservationError(ValueError):
    """A batch that cannot become an Observation (missing column, wrong dtype or shape)."""


# Not checked at run time (the fields' annotations stay as documentation): JAX and nnx rebuild this pytree through
# __init__ with stand-in leaves (None from nnx.jit's clear_non_graph_nodes, ShapeDtypeStruct from eval_shape, specs).
@typing.no_type_check
@struct.dataclass
class Observation:
    """A batch of observations (a pytree; dict keys are cameras, flattened in sorted order).

    `state` is carried for completeness; π0.5 reads the state only through the discretized text prompt, so the
    model never uses it and it may be None.
    """

    images: dict[str, UInt8[Array, "b s s 3"]]
    image_masks: dict[str, Bool[Array, " b"]]
    tokenized_prompt: Int[Array, "b l"]
    tokenized_prompt_mask: Bool[Array, "b l"]
    token_ar_mask: Bool[Array, "b l"]
    token_loss_mask: Bool[Array, "b l"]
    text_prompt: Int[Array, "b t"]
    text_prompt_mask: Bool[Array, "b t"]
    state: Float[Array, "b state"] | None = None

    @property
    def batch_size(self) -> int:
        return self.tokenized_prompt.shape[0]

    @classmethod
    def from_batch(cls, columns: Mapping[str, np.ndarray]) -> Observation:
        """From decoded shard columns: `image.<cam>` uint8 [b,S,S,3], optional `image_mask.<cam>` bool [b]
        (default all True), optional `state`, and the six token columns under their shard names.

        Other columns (episode_index, actions, task, ...) are ignored.
        """
        cams = schema.cameras_in(columns)
        if not cams:
            raise ObservationError(f"no `{schema.image_column('<camera>')}` column among {sorted(columns)}")
        missing = [c for c in PROMPT_COLUMNS if c not in columns]
        if missing:
            raise ObservationError(f"token columns {missing} missing (have {sorted(columns)})")
        tokens = {c: np.asarray(columns[c]) for c in PROMPT_COLUMNS}
        b = tokens[schema.TOKENIZED_PROMPT].shape[0]
        images, masks = {}, {}
        for cam in cams:
            img = np.asarray(columns[schema.image_column(cam)])
            if img.dtype != np.uint8 or img.ndim != 4 or img.shape[-1] != 3 or img.shape[0] != b:
                raise ObservationError(
                    f"column `{schema.image_column(cam)}` must be decoded uint8 [{b}, S, S, 3], got {img.dtype} "
                    f"{img.shape}"
                )
            images[cam] = jnp.asarray(img)
            mask = columns.get(schema.image_mask_column(cam))
            mask = np.ones((b,), bool) if mask is None else np.asarray(mask)
            if mask.shape != (b,):
                raise ObservationError(f"column `{schema.image_mask_column(cam)}` must be bool [{b}], got {mask.shape}")
            masks[cam] = jnp.asarray(mask.astype(bool))
        lengths = {c: tokens[c].shape for c in PROMPT_COLUMNS}
        for group in (TOKEN_COLUMNS, TEXT_COLUMNS):
            shapes = {lengths[c] for c in group}
            if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[0] != b:
                raise ObservationError(f"columns {list(group)} must share one [{b}, length] shape, got {lengths}")
        state = columns.get(schema.STATE)
        return cls(
            images=images,
            image_masks=masks,
            tokenized_prompt=jnp.asarray(tokens[schema.TOKENIZED_PROMPT], jnp.int32),
            tokenized_prompt_mask=jnp.asarray(tokens[schema.TOKENIZED_PROMPT_MASK], bool),
            token_ar_mask=jnp.asarray(tokens[schema.TOKEN_AR_MASK], bool),
            token_loss_mask=jnp.asarray(tokens[schema.TOKEN_LOSS_MASK], bool),
            text_prompt=jnp.asarray(tokens[schema.TEXT_PROMPT], jnp.int32),
            text_prompt_mask=jnp.asarray(tokens[schema.TEXT_PROMPT_MASK], bool),
            state=None if state is None else jnp.asarray(np.asarray(state), jnp.float32),
        )
