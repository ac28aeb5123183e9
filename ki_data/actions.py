"""Action spaces: which action dimensions are stored relative to the state (delta actions), and the two transforms.

openpi trains most robots on joint actions relative to the current state and gripper actions absolute
(`DeltaActions(make_bool_mask(6, -1, 6, -1))` for ALOHA). Here a delta spec is one number per action dimension: the
index of the state dimension it is taken against, or -1 for an absolute dimension. Chunk row t is made relative to
the state of frame t (the observation the chunk is predicted from), every step of the chunk against that one state.

The spec is written into the manifest (`delta_actions`); norm statistics and the FAST fit are computed on the relative
chunks, and everything that shows actions to people (Policy, server, evaluation, rollout) turns them back with the
observation's state, so reports stay in the dataset's units.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxtyping import Float

ABSOLUTE = -1


class DeltaSpecError(ValueError):
    """A delta-action mask that does not fit the dataset (wrong length, unknown names, no matching state dimension)."""


def _expand_counts(text: str, action_dim: int) -> list[bool]:
    """openpi's make_bool_mask notation: "6,-1,6,-1" = six relative, one absolute, six relative, one absolute."""
    mask: list[bool] = []
    for part in text.split(","):
        try:
            n = int(part)
        except ValueError:
            raise DeltaSpecError(f"delta-action mask {text!r}: {part!r} is not an integer") from None
        if n == 0:
            raise DeltaSpecError(f"delta-action mask {text!r}: 0 is not a count")
        mask += [n > 0] * abs(n)
    if len(mask) != action_dim:
        raise DeltaSpecError(f"delta-action mask {text!r} covers {len(mask)} action dimensions; the dataset's action "
                             f"has {action_dim}")
    return mask


def parse_delta_actions(
    text: str | None,
    *,
    action_dim: int,
    state_dim: int,
    action_names: Sequence[str] | None,
    state_names: Sequence[str] | None,
) -> tuple[int, ...] | None:
    """The delta spec of a command-line mask, or None (all absolute) for None / "" / "none".

    Counts ("6,-1,6,-1"): relative dimension i is taken against state dimension i, or against the state dimension of
    the same name when both features are named and the names differ in order. Names ("x,y"): the named action
    dimensions are relative, each against the state dimension of the same name.
    """
    if text is None or text.strip().lower() in ("", "none"):
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    by_name = not all(p.lstrip("-").isdigit() for p in parts)
    if by_name:
        if action_names is None:
            raise DeltaSpecError(f"delta-action mask {text!r} names dimensions, but the dataset's action has no names")
        unknown = [p for p in parts if p not in action_names]
        if unknown:
            raise DeltaSpecError(f"delta-action mask names {unknown}, which are not action dimensions "
                                 f"({list(action_names)})")
        mask = [n in parts for n in action_names]
    else:
        mask = _expand_counts(text, action_dim)
    spec = []
    for i, relative in enumerate(mask):
        if not relative:
            spec.append(ABSOLUTE)
            continue
        name = action_names[i] if action_names is not None else None
        if name is not None and state_names is not None and name in state_names:
            spec.append(list(state_names).index(name))
        elif by_name:
            raise DeltaSpecError(f"action dimension {name!r} has no state dimension of the same name "
                                 f"(state: {list(state_names or [])})")
        elif i < state_dim:
            spec.append(i)
        else:
            raise DeltaSpecError(f"action dimension {i} is marked relative but the state has only {state_dim} "
                                 f"dimensions")
    return tuple(spec)


def _shift(
    chunks: Float[np.ndarray, "*b h d"], state: Float[np.ndarray, "*b s"], spec: Sequence[int] | None, sign: float
) -> Float[np.ndarray, "*b h d"]:
    """chunks + sign * (each relative dimension's state dimension), every step of a chunk with its own frame's state."""
    if spec is None:
        return chunks
    idx = np.asarray(spec, np.int64)
    rel = np.flatnonzero(idx != ABSOLUTE)
    out = np.array(chunks, dtype=np.float32, copy=True)
    out[..., rel] += sign * np.asarray(state, np.float32)[..., None, idx[rel]]
    return out


def to_relative(
    chunks: Float[np.ndarray, "*b h d"], state: Float[np.ndarray, "*b s"], spec: Sequence[int] | None
) -> Float[np.ndarray, "*b h d"]:
    """Absolute chunks -> stored chunks: relative dimensions minus their state dimension."""
    return _shift(chunks, state, spec, -1.0)


def to_absolute(
    chunks: Float[np.ndarray, "*b h d"], state: Float[np.ndarray, "*b s"], spec: Sequence[int] | None
) -> Float[np.ndarray, "*b h d"]:
    """Stored (possibly relative) chunks -> absolute: the inverse of `to_relative` with the same state."""
    return _shift(chunks, state, spec, 1.0)
