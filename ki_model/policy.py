"""Inference: a trained checkpoint as a policy on live LeRobot-layout observations.

`Policy.prepare(frame)` turns one observation into the model's input with the very function preprocessing made the
shard rows with (`ki_data.schema.frame_row` over the checkpoint's `ki_data.DataArtifacts`, without actions; images
through `shard_image` and decoded back), so the tensors are bit-identical to that frame's shard row;
`Policy.infer(frame)` runs the action expert's flow and returns the chunk in the dataset's own units. Given the part
of the previous chunk not yet executed, `infer` guides the flow to continue it (real-time chunking, ki_model.rtc).
With `flow_samples=N` it returns the mean of N chunks sampled for the observation (one batch): the flow's estimate of
the expected chunk, which errs less than one sample when the demonstrations agree (the evaluation's "mean of 8"), and
blends them where they split (around an obstacle by the left or by the right); 1, the default, samples as openpi.

Importing this module loads no training code (optax, grain, orbax's checkpoint manager): serving stays light.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Float, UInt8

from ki_data.artifacts import DataArtifacts
from ki_data.manifest import ManifestError
from ki_data import schema
from ki_data.schema import camera_name
from ki_model import checkpoint as ckpt
from ki_model import rtc
from ki_model.compile import compiler_options
from ki_model.config import Pi05KIConfig
from ki_model.decoding import FastDecodeSpec
from ki_model.observation import Observation


class FrameError(ValueError):
    """An observation that does not fit the policy (missing camera, state of the wrong size, bad image)."""


def frame_images(frame: Mapping[str, Any]) -> dict[str, Any]:
    """Camera name -> image, from LeRobot keys (`observation.images.<cam>`, or `observation.image` = camera `image`)."""
    out = {}
    for key, value in frame.items():
        if key.startswith("observation.images.") or key == "observation.image":
            out[camera_name(key)] = value
    return out


def to_uint8_hwc(img: Any, *, where: str) -> UInt8[np.ndarray, "h w 3"]:
    """HxWx3 uint8 as stored, or CxHxW float in [0, 1] as LeRobotDataset returns (x*255 rounded: exact for 8-bit)."""
    arr = np.asarray(img.numpy() if hasattr(img, "numpy") else img)
    if arr.ndim != 3:
        raise FrameError(f"{where}: image must be HxWx3 uint8 or 3xHxW float, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        if arr.shape[-1] == 3:
            return arr
        if arr.shape[0] == 3:
            return np.ascontiguousarray(arr.transpose(1, 2, 0))
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.shape[0] == 3 and arr.shape[-1] != 3:
            arr = arr.transpose(1, 2, 0)
        if arr.shape[-1] == 3:
            return np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise FrameError(f"{where}: image must be HxWx3 uint8 or 3xHxW float in [0, 1], got {arr.dtype} {arr.shape}")


def _count(value: Any, name: str, low: int, high: int, what: str) -> int:
    """An integer in [low, high]; FrameError naming `name` otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise FrameError(f"{name} must be an integer, got {type(value).__name__}")
    if not low <= int(value) <= high:
        raise FrameError(f"{name} must be in [{low}, {high}] ({what}), got {int(value)}")
    return int(value)


class Policy:
    def __init__(
        self,
        model: nnx.Module,
        config: Pi05KIConfig,
        data: DataArtifacts,
        *,
        seed: int = 0,
        num_steps: int | None = None,
        fast_compile: bool = False,
        max_guidance_weight: float = rtc.MAX_GUIDANCE_WEIGHT,
        flow_samples: int = 1,
    ):
        """max_guidance_weight: real-time chunking's β (ki_model.rtc); 0 samples as if no previous chunk were given.
        flow_samples: chunks sampled per observation, of which the flow head returns the mean (module docstring)."""
        if isinstance(flow_samples, bool) or not isinstance(flow_samples, int) or flow_samples < 1:
            raise ValueError(f"flow_samples must be an integer of at least 1, got {flow_samples!r}")
        self.flow_samples = flow_samples
        self.config = config
        self.data = data
        self.manifest = data.manifest
        self.cameras = data.manifest.cameras
        self.num_steps = num_steps or config.num_flow_steps
        self.max_guidance_weight = max_guidance_weight
        self._graphdef, self._params = nnx.split(model, nnx.Param)
        self._key = jax.random.key(seed)
        self._calls = 0
        self.compiler_options = compiler_options(fast_compile)
        self._sample = jax.jit(self._sample_fn, static_argnums=(3,), compiler_options=self.compiler_options)
        # Delay and execution horizon reach it as the mask's values: one program whatever they are.
        self._sample_guided = jax.jit(self._sample_fn, static_argnums=(3, 5),
                                      compiler_options=self.compiler_options)
        self._decode_fast: dict[bool, Any] = {}  # compiled on the first infer_fast, per `constrained`

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        checkpoint_dir: str | Path,
        *,
        step: int | None = None,
        use_ema: bool = True,
        seed: int = 0,
        fast_compile: bool = False,
        max_guidance_weight: float = rtc.MAX_GUIDANCE_WEIGHT,
        flow_samples: int = 1,
    ) -> Policy:
        """The latest (or given) step of a training run; its EMA weights when it kept them and `use_ema`.

        fast_compile: see ki_model.compile.compiler_options (CPU: quicker first call, slower calls).
        max_guidance_weight: real-time chunking's β (ki_model.rtc). flow_samples: see `Policy`."""
        root = Path(checkpoint_dir)
        config = ckpt.load_model_config(root)
        try:
            data = DataArtifacts.open(root)
        except ManifestError as e:
            raise ckpt.CheckpointError(f"{root}: not a complete ki training checkpoint directory ({e})") from None
        abstract = nnx.eval_shape(lambda: config.create(nnx.Rngs(0)))
        graphdef, abstract_params = nnx.split(abstract, nnx.Param)
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
            nnx.to_pure_dict(abstract_params),
        )
        params, _, _ = ckpt.restore_params(root, target, step=step, prefer_ema=use_ema)
        if config.lora:  # fold the LoRA factors into the weights: inference runs the plain model
            from ki_model.lora import merge_lora

            params, config = merge_lora(params, config)
            graphdef = nnx.split(nnx.eval_shape(lambda: config.create(nnx.Rngs(0))), nnx.Param)[0]
        return cls(nnx.merge(graphdef, params), config, data, seed=seed, fast_compile=fast_compile,
                   max_guidance_weight=max_guidance_weight, flow_samples=flow_samples)

    # ------------------------------------------------------------------ frame -> model input

    def prepare_columns(self, frame: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """One frame as a batch of 1 in shard-column layout, images decoded: the row `schema.frame_row` makes of it
        (as pass 2 made the training rows, without actions), through `schema.model_batch`."""
        if "task" not in frame:
            raise FrameError("frame has no 'task' string")
        state = self.frame_state(frame)
        images = frame_images(frame)
        missing = [c for c in self.cameras if c not in images]
        if missing:
            raise FrameError(f"frame lacks cameras {missing} (has {sorted(images)}); expected {list(self.cameras)}")
        pixels = {cam: to_uint8_hwc(images[cam], where=f"camera {cam}") for cam in self.cameras}
        row, _ = schema.frame_row(self.data, task=str(frame["task"]), state=state, images=pixels)
        return schema.model_batch([row])

    def frame_state(self, frame: Mapping[str, Any]) -> Float[np.ndarray, " s"]:
        """The raw state: the manifest's `state_keys` of the frame, concatenated (as preprocessing did)."""
        keys = self.manifest.state_keys
        missing = [k for k in keys if k not in frame]
        if missing:
            raise FrameError(f"frame has no {missing[0]!r}; the policy's state is {' + '.join(keys)}")
        state = np.concatenate([np.asarray(frame[k], dtype=np.float32).reshape(-1) for k in keys])
        if state.shape[0] != self.manifest.state_dim:
            raise FrameError(f"{' + '.join(keys)} has {state.shape[0]} values; the policy was trained on "
                             f"{self.manifest.state_dim}")
        return state

    def prepare(self, frame: Mapping[str, Any]) -> Observation:
        return Observation.from_batch(self.prepare_columns(frame))

    # ------------------------------------------------------------------ inference

    def _sample_fn(self, params: Any, rng: jax.Array, obs: Observation, num_steps: int,
                   prefix: rtc.Prefix | None = None, max_guidance_weight: float = rtc.MAX_GUIDANCE_WEIGHT,
                   ) -> Float[jax.Array, "b h d"]:
        """One chunk per observation, the mean of `flow_samples` draws: each row repeated N times in one batch (rows
        i*N to i*N+N-1 are observation i's), sampled with independent noise, averaged back to one chunk per row."""
        model = nnx.merge(self._graphdef, params)
        n = self.flow_samples
        if n == 1:
            return model.sample_actions(rng, obs, num_steps, prefix=prefix, max_guidance_weight=max_guidance_weight)
        repeat = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731
        chunks = model.sample_actions(rng, jax.tree.map(repeat, obs), num_steps,
                                      prefix=None if prefix is None else jax.tree.map(repeat, prefix),
                                      max_guidance_weight=max_guidance_weight)
        return chunks.reshape(-1, n, *chunks.shape[1:]).mean(axis=1)

    def sample_normalized(
        self, obs: Observation, rng: jax.Array | None = None, prefix: rtc.Prefix | None = None
    ) -> Float[np.ndarray, "b h d"]:
        """Normalized chunks over the dataset's action dimensions (a model with more, as openpi's 32, is cut back), one
        per observation (each the mean of `flow_samples` draws); guided toward `prefix` (`rtc_prefix`) when given and
        the guidance weight is not 0."""
        if rng is None:
            rng = jax.random.fold_in(self._key, self._calls)
            self._calls += 1
        if prefix is None or self.max_guidance_weight == 0:
            actions = self._sample(self._params, rng, obs, self.num_steps)
        else:
            actions = self._sample_guided(self._params, rng, obs, self.num_steps, prefix, self.max_guidance_weight)
        return np.asarray(actions)[..., : self.manifest.action_dim]

    def unnormalize_actions(self, actions: Float[np.ndarray, "*b h d"]) -> Float[np.ndarray, "*b h d"]:
        return self.data.unnormalize_actions(actions)

    def rtc_prefix(
        self,
        previous_chunk: Float[np.ndarray, "k d"],
        state: Float[np.ndarray, " s"],
        delay: int = 0,
        execution_horizon: int | None = None,
    ) -> rtc.Prefix:
        """The guidance target of real-time chunking for one frame of raw `state`.

        previous_chunk: the previous chunk's actions not executed yet when the frame was observed, absolute, in the
        dataset's units as `infer` returned them; row 0 is the action that executes next (1 <= k <= horizon rows).
        delay: the actions the robot executes from it while the new chunk is computed (0 <= delay <= k): the new
        chunk's first `delay` actions are held to them. execution_horizon (s): the mask reaches 0 at index H - s;
        None: H - k, where the previous chunk ends (as when every chunk is executed for s = H - k actions).

        With delta actions the chunk is re-expressed against the new frame's state (its rows are relative to an older
        one), then normalized; it is padded to the horizon (its last row repeated, mask 0) and to the model's action
        dimensions (zeros, as training pads them)."""
        c, dim = self.config, self.manifest.action_dim
        prev = np.asarray(previous_chunk)
        if prev.ndim != 2 or prev.shape[1] != dim or not 1 <= prev.shape[0] <= c.action_horizon:
            raise FrameError(f"previous_chunk must be [k, {dim}] actions with 1 <= k <= {c.action_horizon} (the "
                             f"horizon), got shape {list(prev.shape)}")
        if prev.dtype.kind not in "iuf" or not np.isfinite(prev).all():
            raise FrameError(f"previous_chunk must be finite numbers, got dtype {prev.dtype}")
        k = prev.shape[0]
        delay = _count(delay, "delay", 0, k, f"the previous chunk's {k} actions")
        s = c.action_horizon - k if execution_horizon is None else _count(
            execution_horizon, "execution_horizon", 0, c.action_horizon, "the horizon")
        stored = self.data.stored_actions(prev.astype(np.float32), np.asarray(state, np.float32))
        target = np.zeros((c.action_horizon, c.action_dim), np.float32)
        target[:, :dim] = np.concatenate([stored, np.repeat(stored[-1:], c.action_horizon - k, axis=0)])
        weights = rtc.soft_mask(delay, min(c.action_horizon - s, k), c.action_horizon)
        return rtc.Prefix(jnp.asarray(target[None]), weights[None])

    def infer(
        self,
        frame: Mapping[str, Any],
        previous_chunk: Float[np.ndarray, "k d"] | None = None,
        delay: int = 0,
        execution_horizon: int | None = None,
    ) -> Float[np.ndarray, "h d"]:
        """The action chunk [horizon, action_dim] in the dataset's units for one observation, absolute (delta
        dimensions turned back with the frame's state). With `previous_chunk` (the previous chunk's actions not
        yet executed, from the next one on; see `rtc_prefix`) the chunk is sampled with real-time chunking: its first
        `delay` actions match them and the rest joins them smoothly; without, plain sampling."""
        obs = self.prepare(frame)
        state = self.frame_state(frame)
        prefix = None if previous_chunk is None else self.rtc_prefix(previous_chunk, state, delay, execution_horizon)
        chunk = self.sample_normalized(obs, prefix=prefix)[0]
        return self.data.absolute_actions(chunk, state)

    def infer_fast(self, frame: Mapping[str, Any], *, constrained: bool = True) -> Float[np.ndarray, "h d"]:
        """The backbone alone as the policy (π0-FAST style): greedy FAST tokens decoded to an absolute chunk.
        Raises FrameError when unconstrained decoding breaks the grammar."""
        obs = self.prepare(frame)
        if constrained not in self._decode_fast:
            spec = self.fast_decode_spec()

            def decode(params: Any, rng: jax.Array, obs: Observation) -> jax.Array:
                model = nnx.merge(self._graphdef, params)
                return model.sample_fast_tokens(rng, obs, spec.max_decode_steps, 0.0, constrained, spec=spec).tokens

            self._decode_fast[constrained] = jax.jit(decode, compiler_options=self.compiler_options)
        tokens = np.asarray(self._decode_fast[constrained](self._params, self._key, obs))
        chunk, ok = self.data.prompt.decode_actions(tokens, self.config.action_horizon, self.manifest.action_dim)
        if not ok[0]:
            raise FrameError("the FAST tokens the backbone decoded do not form a chunk")
        return self.data.absolute_actions(chunk[0], self.frame_state(frame))

    def fast_decode_spec(self) -> FastDecodeSpec:
        # The FAST tokens are over the dataset's own action dimensions, whatever the model's.
        return FastDecodeSpec.from_grammar(self.data.prompt.grammar(), self.config.action_horizon, self.manifest.action_dim)

    @property
    def model(self) -> nnx.Module:
        return nnx.merge(self._graphdef, self._params)

    @property
    def params(self) -> Any:
        return self._params
