"""Inference: a trained checkpoint as a policy on live LeRobot-layout observations.

`Policy.prepare(frame)` turns one observation into the model's input with the very code preprocessing used
(ki_data.normalize, ki_data.build_prompt with actions=None, ki_data.images.resize_with_pad + PNG round trip), so the
tensors are bit-identical to that frame's shard row; `Policy.infer(frame)` runs the action expert's flow and returns
the chunk in the dataset's own units.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jaxtyping import Float, UInt8

from ki_data import FastTokenizer, TextTokenizer, build_prompt
from ki_data.images import decode_image, encode_image, resize_with_pad
from ki_data.normalize import NormStats, load_norm_stats, normalize, unnormalize
from ki_data.schema import FAST_TOKENIZER_DIR, NORM_STATS_FILE, TEXT_TOKENIZER_FILE, camera_name
from ki_model import checkpoint as ckpt
from ki_model.config import Pi05KIConfig
from ki_model.decoding import FastDecodeSpec
from ki_model.observation import Observation
from ki_model.train import compiler_options


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


class Policy:
    def __init__(
        self,
        model: nnx.Module,
        config: Pi05KIConfig,
        manifest: dict[str, Any],
        norm_stats: dict[str, NormStats],
        text_tokenizer: TextTokenizer,
        fast_tokenizer: FastTokenizer,
        *,
        seed: int = 0,
        num_steps: int | None = None,
        fast_compile: bool = False,
    ):
        self.config = config
        self.manifest = manifest
        self.norm_stats = norm_stats
        self.text_tokenizer = text_tokenizer
        self.fast_tokenizer = fast_tokenizer
        self.norm_mode = manifest.get("norm_mode", "quantile")
        self.cameras = tuple(manifest["cameras"])
        self.num_steps = num_steps or config.num_flow_steps
        self._graphdef, self._params = nnx.split(model, nnx.Param)
        self._key = jax.random.key(seed)
        self._calls = 0
        self.compiler_options = compiler_options(fast_compile)
        self._sample = jax.jit(self._sample_fn, static_argnums=(3,), compiler_options=self.compiler_options)

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
    ) -> Policy:
        """The latest (or given) step of a training run; its EMA weights when it kept them and `use_ema`.

        fast_compile: see ki_model.train.compiler_options (CPU: quicker first call, slower calls)."""
        root = Path(checkpoint_dir)
        config = ckpt.load_model_config(root)
        manifest = ckpt.load_manifest(root)
        for name in (NORM_STATS_FILE, TEXT_TOKENIZER_FILE, FAST_TOKENIZER_DIR):
            if not (root / name).exists():
                raise ckpt.CheckpointError(f"{root}: {name} is missing; the checkpoint directory is incomplete")
        abstract = nnx.eval_shape(lambda: config.create(nnx.Rngs(0)))
        graphdef, abstract_params = nnx.split(abstract, nnx.Param)
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
            nnx.to_pure_dict(abstract_params),
        )
        params, _, _ = ckpt.restore_params(root, target, step=step, prefer_ema=use_ema)
        model = nnx.merge(graphdef, params)
        return cls(
            model,
            config,
            manifest,
            load_norm_stats(root / NORM_STATS_FILE),
            TextTokenizer.load(root / TEXT_TOKENIZER_FILE),
            FastTokenizer.load(root / FAST_TOKENIZER_DIR),
            seed=seed,
            fast_compile=fast_compile,
        )

    # ------------------------------------------------------------------ frame -> model input

    def prepare_columns(self, frame: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """One frame as shard-style columns with a batch axis of 1 (`image.<cam>` decoded, tokens with actions=None)."""
        if "task" not in frame:
            raise FrameError("frame has no 'task' string")
        if "observation.state" not in frame:
            raise FrameError("frame has no 'observation.state'")
        state = np.asarray(frame["observation.state"], dtype=np.float32).reshape(-1)
        if state.shape[0] != self.manifest["state_dim"]:
            raise FrameError(f"observation.state has {state.shape[0]} values; the policy was trained on {self.manifest['state_dim']}")
        images = frame_images(frame)
        missing = [c for c in self.cameras if c not in images]
        if missing:
            raise FrameError(f"frame lacks cameras {missing} (has {sorted(images)}); expected {list(self.cameras)}")
        state_n = normalize(state, self.norm_stats["state"], mode=self.norm_mode)
        tokens = build_prompt(
            str(frame["task"]),
            state_n,
            None,
            text_tokenizer=self.text_tokenizer,
            fast_tokenizer=self.fast_tokenizer,
            max_token_len=self.manifest["max_token_len"],
            max_text_len=self.manifest["max_text_len"],
            vocab_size=self.manifest["vocab_size"],
            skip_tokens=self.manifest["skip_tokens"],
        )
        cols: dict[str, np.ndarray] = {k: v[None] for k, v in tokens.columns().items()}
        size = self.manifest["image_size"]
        for cam in self.cameras:
            img = to_uint8_hwc(images[cam], where=f"camera {cam}")
            # The PNG round trip is lossless; it keeps inference on exactly the path the shards went through.
            cols[f"image.{cam}"] = decode_image(encode_image(resize_with_pad(img, size)))[None]
            cols[f"image_mask.{cam}"] = np.ones((1,), bool)
        cols["state"] = state_n[None]
        return cols

    def prepare(self, frame: Mapping[str, Any]) -> Observation:
        return Observation.from_batch(self.prepare_columns(frame))

    # ------------------------------------------------------------------ inference

    def _sample_fn(self, params: Any, rng: jax.Array, obs: Observation, num_steps: int) -> jax.Array:
        return nnx.merge(self._graphdef, params).sample_actions(rng, obs, num_steps)

    def sample_normalized(self, obs: Observation, rng: jax.Array | None = None) -> Float[np.ndarray, "b h d"]:
        if rng is None:
            rng = jax.random.fold_in(self._key, self._calls)
            self._calls += 1
        return np.asarray(self._sample(self._params, rng, obs, self.num_steps))

    def unnormalize_actions(self, actions: Float[np.ndarray, "*b h d"]) -> Float[np.ndarray, "*b h d"]:
        return unnormalize(actions, self.norm_stats["actions"], mode=self.norm_mode)

    def infer(self, frame: Mapping[str, Any]) -> Float[np.ndarray, "h d"]:
        """The action chunk [horizon, action_dim] in the dataset's units for one observation."""
        return self.unnormalize_actions(self.sample_normalized(self.prepare(frame)))[0]

    def fast_decode_spec(self) -> FastDecodeSpec:
        return FastDecodeSpec.from_tokenizers(
            self.text_tokenizer,
            self.fast_tokenizer,
            self.manifest["vocab_size"],
            self.manifest["skip_tokens"],
            self.config.action_horizon,
            self.config.action_dim,
        )

    @property
    def model(self) -> nnx.Module:
        return nnx.merge(self._graphdef, self._params)

    @property
    def params(self) -> Any:
        return self._params
