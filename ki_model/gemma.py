"""Gemma decoder with several experts sharing attention (π0 / π0.5 style).

Each expert (the backbone, the action expert) has its own weights: norms, Q/K/V/output projections and a GeGLU MLP.
In every layer the experts project their own tokens, RoPE is applied, and ONE softmax spans the keys of all experts
(plus a KV cache of earlier tokens). An expert marked `insulated` reads every key/value that it did not produce itself
through `jax.lax.stop_gradient`: this is the knowledge-insulation cut, placed in every layer.

The layers are ONE stacked module (`layers`: every parameter with a leading [depth] axis, openpi's scanned
layout) run by `jax.lax.scan`, both experts' layer i in the same scan step; each step can be rematerialised.
Weight layouts follow big_vision/openpi Gemma (each maps to the HF PaliGemma weights by a reshape/transpose):
  embedder.input_embedding [vocab, width]
  layers.pre_attention_norm.scale [depth, width]  (adaptive: .modulation.kernel [depth, cond, 3*width], .bias)
  layers.attn.q_einsum [depth, heads, width, head_dim], .kv_einsum [depth, 2, kv_heads, width, head_dim],
              .attn_vec_einsum [depth, heads, head_dim, width]
  layers.pre_ffw_norm, layers.mlp.gating_einsum [depth, 2, width, mlp_dim], .mlp.linear [depth, mlp_dim, width]
  final_norm
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int

from ki_model import lora
from ki_model.config import GemmaConfig
from ki_model.nn import ZEROS, Dense, Init, fan_in_param, make_param, scan_layers, stack_layers

# Stacked over layers: keys and values after RoPE, in the compute dtype.
KVCache = tuple[Float[Array, "depth b _ kv hd"], Float[Array, "depth b _ kv hd"]]

# A large finite negative (not -inf) so that a fully masked row stays finite.
_MASK_VALUE = -2.3819763e38
_ROPE_MAX_WAVELENGTH = 10_000
_NORM_EPS = 1e-6


class Embedder(nnx.Module):
    """Token embedding, also the tied output head (logits = x @ input_embedding.T)."""

    def __init__(self, vocab_size: int, width: int, *, rngs: nnx.Rngs):
        init = Init("normal", width**-0.5)
        self.input_embedding = make_param(rngs, init, (vocab_size, width), ("vocab", "embed"))

    def encode(self, ids: Int[Array, "b l"], dtype: DTypeLike) -> Float[Array, "b l d"]:
        x = jnp.take(self.input_embedding[...], ids, axis=0).astype(dtype)
        # Gemma scales the input embeddings by sqrt(width).
        return x * jnp.sqrt(x.shape[-1]).astype(dtype)

    def decode(self, x: Float[Array, "b l d"]) -> Float[Array, "b l v"]:
        # In float32 against the float32 table (as openpi's jnp.dot promotes): casting the table to a bf16 compute
        # dtype would copy all of it (1 GiB at PaliGemma size) on every call. Training uses ki_model.losses instead.
        return jnp.einsum("bld,vd->blv", x.astype(jnp.float32), self.input_embedding[...])


def _rms_normalize(x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + _NORM_EPS)


class RMSNorm(nnx.Module):
    """Gemma RMSNorm: normalized * (1 + scale); returns no gate."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.scale = make_param(rngs, ZEROS, (width,), ("norm",))

    def __call__(self, x: Float[Array, "b l d"], cond: None = None) -> tuple[Float[Array, "b l d"], None]:
        y = _rms_normalize(x) * (1.0 + self.scale[...].astype(jnp.float32))  # float32 also when stored bf16 (LoRA)
        return y.astype(x.dtype), None


class AdaptiveRMSNorm(nnx.Module):
    """π0.5's adaRMS: scale, shift and a residual gate computed from the conditioning (flow-time) vector.

    The modulation starts at zero (adaLN-Zero style), so at initialization the scale is 1, the shift 0 and the
    residual gate 0.
    """

    def __init__(self, width: int, cond_dim: int, *, rngs: nnx.Rngs):
        self.modulation = Dense(
            cond_dim, 3 * width, axes=("embed", "modulation"), rngs=rngs, kernel_init=ZEROS
        )

    def __call__(
        self, x: Float[Array, "b l d"], cond: Float[Array, "b g c"]
    ) -> tuple[Float[Array, "b l d"], Float[Array, "b _ d"]]:
        """cond: one conditioning vector per group of consecutive tokens (g divides l; g = 1 at inference, g = K
        action blocks when training draws K flow samples per pass)."""
        mod = self.modulation(cond, jnp.float32)  # [b, g, 3d]
        if mod.shape[1] > 1:
            mod = jnp.repeat(mod, x.shape[1] // mod.shape[1], axis=1)
        scale, shift, gate = jnp.split(mod, 3, axis=-1)
        y = _rms_normalize(x) * (1.0 + scale) + shift
        return y.astype(x.dtype), gate.astype(x.dtype)


def _gated_residual(
    x: Float[Array, "b l d"], y: Float[Array, "b l d"], gate: Float[Array, "b _ d"] | None
) -> Float[Array, "b l d"]:
    """gate: AdaptiveRMSNorm's, [b, 1, d] with one conditioning vector per sequence, [b, l, d] when several flow
    samples share a pass (their groups' gates repeated over their tokens); None after a plain RMSNorm."""
    return x + y if gate is None else x + y * gate


def apply_rope(x: Float[Array, "b l n h"], positions: Int[Array, "b l"]) -> Float[Array, "b l n h"]:
    """Rotary embedding, Gemma's half-split convention (first half / second half of head_dim)."""
    half = x.shape[-1] // 2
    timescale = _ROPE_MAX_WAVELENGTH ** (2.0 * jnp.arange(half, dtype=jnp.float32) / x.shape[-1])
    angle = positions.astype(jnp.float32)[..., None, None] / timescale  # [b, l, 1, half]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    """One expert's projections; the joint softmax lives in `attend`/`_layer`."""

    def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs, lora_rank: int | None = None):
        n, k, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.width, cfg.head_dim
        axes = {"q_einsum": ("heads", "embed", "head_dim"), "kv_einsum": (None, "kv_heads", "embed", "head_dim"),
                "attn_vec_einsum": ("heads", "head_dim", "embed")}
        self.q_einsum = fan_in_param(rngs, (n, d, h), [1], axes["q_einsum"])
        self.kv_einsum = fan_in_param(rngs, (2, k, d, h), [2], axes["kv_einsum"])
        self.attn_vec_einsum = fan_in_param(rngs, (n, h, d), [0, 1], axes["attn_vec_einsum"])
        if lora_rank:
            lora.add_lora(self, rngs, lora_rank, axes)

    def project(
        self, x: Float[Array, "b l d"]
    ) -> tuple[Float[Array, "b l n h"], Float[Array, "b l k h"], Float[Array, "b l k h"]]:
        q = jnp.einsum("bld,ndh->blnh", x, lora.weight(self, "q_einsum", x.dtype))
        k, v = jnp.einsum("bld,skdh->sblkh", x, lora.weight(self, "kv_einsum", x.dtype))
        return q, k, v

    def output(self, o: Float[Array, "b l n h"]) -> Float[Array, "b l d"]:
        return jnp.einsum("blnh,nhd->bld", o, lora.weight(self, "attn_vec_einsum", o.dtype))


class FeedForward(nnx.Module):
    """GeGLU: gelu_tanh(x W_gate) * (x W_up), then W_down."""

    def __init__(self, width: int, mlp_dim: int, *, rngs: nnx.Rngs, lora_rank: int | None = None):
        axes = {"gating_einsum": (None, "embed", "mlp"), "linear": ("mlp", "embed")}
        self.gating_einsum = fan_in_param(rngs, (2, width, mlp_dim), [1], axes["gating_einsum"])
        self.linear = fan_in_param(rngs, (mlp_dim, width), [0], axes["linear"])
        if lora_rank:
            lora.add_lora(self, rngs, lora_rank, axes)

    def __call__(self, x: Float[Array, "b l d"]) -> Float[Array, "b l d"]:
        gate, up = jnp.einsum("bld,sdf->sblf", x, lora.weight(self, "gating_einsum", x.dtype))
        return jnp.einsum("blf,fd->bld", jax.nn.gelu(gate, approximate=True) * up, lora.weight(self, "linear", x.dtype))


class Block(nnx.Module):
    def __init__(self, cfg: GemmaConfig, cond_dim: int | None, *, rngs: nnx.Rngs, lora_rank: int | None = None):
        norm = (lambda: AdaptiveRMSNorm(cfg.width, cond_dim, rngs=rngs)) if cond_dim else (
            lambda: RMSNorm(cfg.width, rngs=rngs)
        )
        self.pre_attention_norm = norm()
        self.attn = Attention(cfg, rngs=rngs, lora_rank=lora_rank)
        self.pre_ffw_norm = norm()
        self.mlp = FeedForward(cfg.width, cfg.mlp_dim, rngs=rngs, lora_rank=lora_rank)


class Gemma(nnx.Module):
    """One expert: optional embedder (the backbone's; also its tied output head), layers and final norm.

    `cond_dim` set = adaptive RMSNorm everywhere (the action expert). `lora_rank`: LoRA factors on the attention
    and MLP weights (ki_model.lora).
    """

    def __init__(self, cfg: GemmaConfig, *, vocab_size: int | None, cond_dim: int | None, rngs: nnx.Rngs,
                 lora_rank: int | None = None):
        self.cfg = cfg
        self.embedder = Embedder(vocab_size, cfg.width, rngs=rngs) if vocab_size else None
        self.layers = stack_layers(lambda: Block(cfg, cond_dim, rngs=rngs, lora_rank=lora_rank), cfg.depth)
        self.final_norm = AdaptiveRMSNorm(cfg.width, cond_dim, rngs=rngs) if cond_dim else RMSNorm(cfg.width, rngs=rngs)


def attend(
    q: Float[Array, "b q n h"], k: Float[Array, "b s k h"], v: Float[Array, "b s k h"], mask: Bool[Array, "b q s"]
) -> Float[Array, "b q n h"]:
    """Grouped-query attention (num_kv_heads divides num_heads; MQA when it is 1); softmax in float32."""
    b, lq, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, lq, kv_heads, n // kv_heads, h) * jnp.asarray(h**-0.5, q.dtype)
    logits = jnp.einsum("bqkgh,bskh->bkgqs", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None, None, :, :], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskh->bqkgh", probs, v)
    return out.reshape(b, lq, n, h)


def _cut(x: Array, stop: bool) -> Array:
    return jax.lax.stop_gradient(x) if stop else x


def _layer(
    blocks: Sequence[Block],
    xs: Sequence[Float[Array, "b _ _"]],  # one per active expert: token counts and widths differ
    conds: Sequence[Float[Array, "b g c"] | None],
    positions: Int[Array, "b n"],
    mask: Bool[Array, "b n s"],
    cache: tuple[Float[Array, "b m k h"], Float[Array, "b m k h"]] | None,  # m cached tokens
    *,
    insulated: Sequence[bool],
) -> tuple[list[Float[Array, "b _ _"]], tuple[Float[Array, "b n k h"], Float[Array, "b n k h"]]]:
    """One decoder layer over the tokens of the active experts (concatenated in expert order)."""
    bounds = [0]
    for x in xs:
        bounds.append(bounds[-1] + x.shape[1])
    qs, ks, vs, gates = [], [], [], []
    for e, (blk, x, cond) in enumerate(zip(blocks, xs, conds, strict=True)):
        pos = positions[:, bounds[e] : bounds[e + 1]]
        h, gate = blk.pre_attention_norm(x, cond)
        q, k, v = blk.attn.project(h)
        qs.append(apply_rope(q, pos))
        ks.append(apply_rope(k, pos))
        vs.append(v)
        gates.append(gate)

    outs = []
    for e, (blk, x, cond) in enumerate(zip(blocks, xs, conds, strict=True)):
        # Key/value sources in mask order: cache, then each expert's new tokens. An insulated expert reads all
        # sources it did not produce through stop_gradient (its own K/V keep their gradient).
        cut = [insulated[e] and f != e for f in range(len(ks))]
        k_src = ([_cut(cache[0], insulated[e])] if cache is not None else []) + list(map(_cut, ks, cut))
        v_src = ([_cut(cache[1], insulated[e])] if cache is not None else []) + list(map(_cut, vs, cut))
        rows = mask[:, bounds[e] : bounds[e + 1]]
        o = attend(qs[e], jnp.concatenate(k_src, axis=1), jnp.concatenate(v_src, axis=1), rows)
        x = _gated_residual(x, blk.attn.output(o), gates[e])
        h, gate = blk.pre_ffw_norm(x, cond)
        outs.append(_gated_residual(x, blk.mlp(h), gate))
    return outs, (jnp.concatenate(ks, axis=1), jnp.concatenate(vs, axis=1))


def forward(
    experts: Sequence[Gemma],
    xs: Sequence[Float[Array, "b _ _"] | None],  # one per expert: token counts and widths differ
    *,
    positions: Int[Array, "b n"],
    mask: Bool[Array, "b n s"],
    conds: Sequence[Float[Array, "b g c"] | None] | None = None,
    cache: KVCache | None = None,
    insulated: Sequence[bool] | None = None,
    remat: bool | str = "none",
    batch_chunks: int = 1,
) -> tuple[list[Float[Array, "b _ _"] | None], KVCache]:
    """Run the experts jointly over their (already embedded) tokens.

    xs[e] is expert e's token block or None when it has no tokens in this call; the new tokens are ordered by expert
    (n = sum of lengths). `mask[:, i, j]`: new token i may read key j, keys ordered [cache (c) | new tokens (n)].
    Returns each expert's final-normed outputs (None where it had no tokens) and the K/V of the new tokens, stacked
    over layers (callers append them to a cache). `remat`: the per-layer policy (ki_model.nn.REMAT_POLICIES);
    `batch_chunks`: each layer runs on that many chunks of the batch in turn (`ki_model.nn.scan_layers`).
    """
    conds = list(conds) if conds is not None else [None] * len(experts)
    insulated = list(insulated) if insulated is not None else [False] * len(experts)
    active = [e for e, x in enumerate(xs) if x is not None]
    if not active:
        raise ValueError("forward needs tokens for at least one expert")
    depth = experts[active[0]].cfg.depth
    n_new = sum(xs[e].shape[1] for e in active)
    n_cache = 0 if cache is None else cache[0].shape[2]
    if positions.shape[1] != n_new or mask.shape[1:] != (n_new, n_cache + n_new):
        raise ValueError(
            f"positions {positions.shape} / mask {mask.shape} do not fit {n_new} new tokens after {n_cache} cached"
        )

    if cache is not None and cache[0].shape[0] != depth:
        raise ValueError(f"the KV cache holds {cache[0].shape[0]} layers, the experts have {depth}")
    active_insulated = [insulated[e] for e in active]
    act_conds = [conds[e] for e in active]

    def layer_fn(blocks, h, layer_cache, positions, mask, act_conds):
        return _layer(blocks, h, act_conds, positions, mask, layer_cache, insulated=active_insulated)

    h, (ks, vs) = scan_layers([experts[e].layers for e in active], layer_fn, [xs[e] for e in active], cache,
                              remat=remat, per_example=(positions, mask, act_conds), batch_chunks=batch_chunks)
    outs: list[Float[Array, "b _ _"] | None] = [None] * len(experts)
    for j, e in enumerate(active):
        outs[e], _ = experts[e].final_norm(h[j], conds[e])
    return outs, (ks, vs)
