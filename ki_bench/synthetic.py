"""Synthetic data for tests, reports and timing: real-format batches (ki_data's tokenizers and prompt builder on smooth
random action chunks, random images, any cameras) and action-chunk families for the FAST report."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float

from ki_data import FastTokenizer, PromptBuilder, TextTokenizer, schema
from ki_data.prompt import DEFAULT_LAYOUT, vocab_layout
from ki_model.observation import Observation

TASKS = ("push the t block", "pick up the cube", "open the drawer", "stack red on blue")


def smooth_chunks(rng: np.random.Generator, n: int, horizon: int, dim: int) -> Float[np.ndarray, "n h d"]:
    """Low-frequency chunks in [-1, 1] (a few sinusoids per dimension), so FAST compresses them like real actions."""
    t = np.linspace(0.0, 1.0, horizon)[None, :, None]
    freq = rng.uniform(0.2, 1.5, (n, 1, dim))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, dim))
    amp = rng.uniform(0.3, 0.9, (n, 1, dim))
    return (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def sinusoid_mix_chunks(
    rng: np.random.Generator, n: int, horizon: int, dim: int, noise: float
) -> Float[np.ndarray, "n h d"]:
    """Chunks in [-1, 1]: a sum of three random low-frequency sinusoids per dimension plus Gaussian `noise`."""
    t = np.linspace(0.0, 1.0, horizon)[None, :, None]
    out = np.zeros((n, horizon, dim))
    for _ in range(3):
        freq = rng.uniform(0.1, 2.0, (n, 1, dim))
        phase = rng.uniform(0.0, 2 * np.pi, (n, 1, dim))
        out += rng.uniform(0.0, 0.33, (n, 1, dim)) * np.sin(2 * np.pi * freq * t + phase)
    return np.clip(out + rng.normal(0.0, noise, out.shape), -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class SyntheticTokenizers:
    text: TextTokenizer
    fast: FastTokenizer
    layout: str = DEFAULT_LAYOUT

    @property
    def vocab_size(self) -> int:
        return vocab_layout(self.text, self.fast)[0]

    def builder(self, config) -> PromptBuilder:
        """The prompt builder for a model config's token lengths."""
        vocab_size, skip_tokens = vocab_layout(self.text, self.fast)
        return PromptBuilder(self.text, self.fast, layout=self.layout, max_token_len=config.max_token_len,
                             max_text_len=config.max_text_len, vocab_size=vocab_size, skip_tokens=skip_tokens)


def synthetic_tokenizers(horizon: int, dim: int, *, seed: int = 0, fast_vocab: int = 256) -> SyntheticTokenizers:
    rng = np.random.default_rng(seed)
    fast = FastTokenizer.fit(smooth_chunks(rng, 256, horizon, dim), vocab_size=fast_vocab)
    text = TextTokenizer.train([f"Task: {t}, State: 1 2 3;\nAction: " for t in TASKS], vocab_size=600)
    return SyntheticTokenizers(text, fast)


@dataclasses.dataclass(frozen=True)
class SyntheticBatch:
    obs: Observation
    actions: Float[Array, "b h d"]
    action_is_pad: Bool[Array, "b h"]


def synthetic_columns(
    config,  # Pi05KIConfig (not imported: keeps this module importable from the config's users)
    tokenizers: SyntheticTokenizers,
    batch_size: int,
    *,
    seed: int = 0,
    cameras: Sequence[str] = ("top", "wrist"),
    state_dim: int = 2,
    masked_cameras: dict[str, Sequence[bool]] | None = None,
    pad_steps: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """A host batch in the loader's format (decoded shard columns, `actions` [b, h, d], `action_is_pad`);
    `pad_steps[r]` trailing steps of row r are padding (the last real action repeated, as preprocessing does),
    `masked_cameras[cam][r]` False masks a camera."""
    rng = np.random.default_rng(seed)
    h, d, s = config.action_horizon, config.action_dim, config.image_size
    actions = smooth_chunks(rng, batch_size, h, d)
    is_pad = np.zeros((batch_size, h), bool)
    for r, n in enumerate(pad_steps or [0] * batch_size):
        if n:
            is_pad[r, h - n :] = True
            actions[r, h - n :] = actions[r, h - n - 1]
    columns: dict[str, np.ndarray] = {}
    builder = tokenizers.builder(config)
    prompts = [builder.build(TASKS[r % len(TASKS)], rng.uniform(-1, 1, state_dim), actions[r]).columns()
               for r in range(batch_size)]
    for name in prompts[0]:
        columns[name] = np.stack([p[name] for p in prompts])
    for cam in cameras:
        columns[schema.image_column(cam)] = rng.integers(0, 256, (batch_size, s, s, 3), dtype=np.uint8)
        mask = (masked_cameras or {}).get(cam)
        columns[schema.image_mask_column(cam)] = np.ones(batch_size, bool) if mask is None else np.asarray(mask, bool)
    columns[schema.STATE] = rng.uniform(-1, 1, (batch_size, state_dim)).astype(np.float32)
    columns[schema.ACTIONS], columns[schema.ACTION_IS_PAD] = actions, is_pad
    return columns


def synthetic_batch(config, tokenizers: SyntheticTokenizers, batch_size: int, **kw) -> SyntheticBatch:
    """`synthetic_columns` as model inputs (`Observation.from_batch`), same arguments."""
    columns = synthetic_columns(config, tokenizers, batch_size, **kw)
    return SyntheticBatch(Observation.from_batch(columns), jnp.asarray(columns[schema.ACTIONS]),
                          jnp.asarray(columns[schema.ACTION_IS_PAD]))


def perturb_params(model: nnx.Module, seed: int, scale: float = 0.05) -> None:
    """Add Gaussian noise to every weight (in place; drawn on the host). Tests use it so that zero-initialized
    weights (the adaRMS modulation, norm scales, biases) do not hide paths: a zero residual gate would cut the
    action expert off the backbone."""
    rng = np.random.default_rng(seed)
    params = nnx.state(model, nnx.Param)
    noisy = jax.tree.map(lambda x: x + scale * rng.standard_normal(x.shape).astype(np.float32), params)
    nnx.update(model, noisy)
