"""Absolute or delta action chunks (openpi's DeltaActions / AbsoluteActions transforms).

With delta actions, every step of the chunk of frame t is stored as action[t + k] - state[t] (where state and action
are the same quantity), normalized with statistics of those deltas; the policy adds the current state back. The
model then predicts where to move relative to where it is, instead of reading its absolute position off the state
tokens to the precision of the action. `--delta-actions` in pipelines.preprocess turns it on; the manifest records it
as `delta_actions`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jaxtyping import Float


class ActionSpaceError(ValueError):
    """Delta actions asked of a dataset whose state and action are not the same quantity."""


def same_quantity(state_dim: int, action_dim: int, state_names: Any, action_names: Any) -> tuple[bool, str]:
    """(yes, why): state and action mean the same thing (equal dimension and equal recorded feature names)."""
    if state_dim != action_dim:
        return False, f"state has {state_dim} values and the action {action_dim}"
    if state_names is None or action_names is None:
        return False, "the dataset records no feature names for observation.state and action"
    if list(state_names) != list(action_names):
        return False, f"state names {list(state_names)} differ from action names {list(action_names)}"
    return True, f"state and action are the same quantities ({', '.join(map(str, state_names))})"


def to_delta(chunks: Float[np.ndarray, "*b h d"], state: Float[np.ndarray, "*b d"]) -> Float[np.ndarray, "*b h d"]:
    return (np.asarray(chunks, np.float32) - np.asarray(state, np.float32)[..., None, :]).astype(np.float32)


def to_absolute(chunks: Float[np.ndarray, "*b h d"], state: Float[np.ndarray, "*b d"]) -> Float[np.ndarray, "*b h d"]:
    return (np.asarray(chunks, np.float32) + np.asarray(state, np.float32)[..., None, :]).astype(np.float32)


def is_delta(manifest: dict[str, Any]) -> bool:
    return bool(manifest.get("delta_actions", False))
