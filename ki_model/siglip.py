"""SigLIP vision encoder (pre-LayerNorm ViT, no pooling) plus the projection into the backbone width.

Layouts (HF SigLIP / PaliGemma names in brackets; each is a reshape/transpose away):
  patch_embed.kernel [p, p, 3, width], .bias [width]          (embeddings.patch_embedding, torch [w, 3, p, p])
  pos_embedding [num_patches, width]                           (embeddings.position_embedding)
  blocks.norm1, .attn.q/k/v.kernel [depth, width, heads, head_dim], .attn.out.kernel [depth, heads, head_dim, width],
  .norm2, .mlp.fc1 [depth, width, mlp], .mlp.fc2 [depth, mlp, width]
                                                   (encoder.layers[i].layer_norm1, self_attn.*_proj, ... stacked)
The blocks are one stacked module (a leading [depth] axis on every parameter, as openpi stores them) run by
`jax.lax.scan`, each block optionally rematerialised (`remat`, a ki_model.nn.REMAT_POLICIES name).
  encoder_norm                                                 (post_layernorm)
  head.kernel [width, backbone_width]                          (multi_modal_projector.linear)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike
from jaxtyping import Array, Float, UInt8

from ki_model.config import SiglipConfig
from ki_model.nn import ZEROS, Dense, Init, LayerNorm, fan_in_param, make_param, scan_layers, stack_layers


def to_unit_range(images: UInt8[Array, "b s s 3"]) -> Float[Array, "b s s 3"]:
    """uint8 [0, 255] -> float32 [-1, 1] (SigLIP's input range)."""
    return images.astype(jnp.float32) / 127.5 - 1.0


class HeadsDense(nnx.Module):
    """x [.., width] -> [.., heads, head_dim]."""

    def __init__(self, width: int, heads: int, head_dim: int, *, rngs: nnx.Rngs):
        self.kernel = fan_in_param(rngs, (width, heads, head_dim), [0], ("embed", "heads", "head_dim"))
        self.bias = make_param(rngs, ZEROS, (heads, head_dim), ("heads", "head_dim"))

    def __call__(self, x: Float[Array, "b l d"]) -> Float[Array, "b l n h"]:
        return jnp.einsum("bld,dnh->blnh", x, self.kernel[...].astype(x.dtype)) + self.bias[...].astype(x.dtype)


class HeadsOut(nnx.Module):
    def __init__(self, heads: int, head_dim: int, width: int, *, rngs: nnx.Rngs):
        self.kernel = fan_in_param(rngs, (heads, head_dim, width), [0, 1], ("heads", "head_dim", "embed"))
        self.bias = make_param(rngs, ZEROS, (width,), ("embed",))

    def __call__(self, x: Float[Array, "b l n h"]) -> Float[Array, "b l d"]:
        return jnp.einsum("blnh,nhd->bld", x, self.kernel[...].astype(x.dtype)) + self.bias[...].astype(x.dtype)


class SiglipAttention(nnx.Module):
    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs):
        head_dim = cfg.width // cfg.num_heads
        self.q = HeadsDense(cfg.width, cfg.num_heads, head_dim, rngs=rngs)
        self.k = HeadsDense(cfg.width, cfg.num_heads, head_dim, rngs=rngs)
        self.v = HeadsDense(cfg.width, cfg.num_heads, head_dim, rngs=rngs)
        self.out = HeadsOut(cfg.num_heads, head_dim, cfg.width, rngs=rngs)

    def __call__(self, x: Float[Array, "b l d"]) -> Float[Array, "b l d"]:
        q, k, v = self.q(x), self.k(x), self.v(x)
        q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
        logits = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.out(jnp.einsum("bnqk,bknh->bqnh", probs, v))


class SiglipMLP(nnx.Module):
    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs):
        self.fc1 = Dense(cfg.width, cfg.mlp_dim, axes=("embed", "mlp"), rngs=rngs)
        self.fc2 = Dense(cfg.mlp_dim, cfg.width, axes=("mlp", "embed"), rngs=rngs)

    def __call__(self, x: Float[Array, "b l d"]) -> Float[Array, "b l d"]:
        return self.fc2(jax.nn.gelu(self.fc1(x, x.dtype), approximate=True), x.dtype)


class EncoderBlock(nnx.Module):
    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(cfg.width, rngs=rngs)
        self.attn = SiglipAttention(cfg, rngs=rngs)
        self.norm2 = LayerNorm(cfg.width, rngs=rngs)
        self.mlp = SiglipMLP(cfg, rngs=rngs)

    def __call__(self, x: Float[Array, "b l d"]) -> Float[Array, "b l d"]:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nnx.Module):
    """A stride-p, VALID convolution written as patchify + matmul."""

    def __init__(self, patch: int, width: int, *, rngs: nnx.Rngs):
        self.kernel = fan_in_param(rngs, (patch, patch, 3, width), [0, 1, 2], (None, None, None, "embed"))
        self.bias = make_param(rngs, ZEROS, (width,), ("embed",))

    def __call__(self, images: Float[Array, "b s s 3"], dtype: DTypeLike) -> Float[Array, "b n d"]:
        p = self.kernel.shape[0]
        b, s = images.shape[0], images.shape[1]
        g = s // p
        patches = images.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * 3)
        kernel = self.kernel[...].reshape(p * p * 3, -1).astype(dtype)
        return jnp.einsum("bnc,cd->bnd", patches.astype(dtype), kernel) + self.bias[...].astype(dtype)


class Siglip(nnx.Module):
    """Images uint8 [b, S, S, 3] -> tokens [b, (S/p)^2, out_width]."""

    def __init__(self, cfg: SiglipConfig, image_size: int, out_width: int, *, rngs: nnx.Rngs, remat: bool | str = "none"):
        num_patches = (image_size // cfg.patch_size) ** 2
        self.image_size = image_size
        self.remat = remat
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width, rngs=rngs)
        self.pos_embedding = make_param(
            rngs, Init("normal", cfg.width**-0.5), (num_patches, cfg.width), (None, "embed")
        )
        self.blocks = stack_layers(lambda: EncoderBlock(cfg, rngs=rngs), cfg.depth)
        self.encoder_norm = LayerNorm(cfg.width, rngs=rngs)
        self.head = Dense(cfg.width, out_width, axes=("embed", "embed_out"), rngs=rngs)

    def __call__(self, images: UInt8[Array, "b s s 3"], dtype: DTypeLike, *, batch_chunks: int = 1
                 ) -> Float[Array, "b n o"]:
        """`batch_chunks`: each block runs on that many chunks of the images in turn (ki_model.nn.scan_layers)."""
        if images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"images must be [b, {self.image_size}, {self.image_size}, 3], got {images.shape}")
        x = self.patch_embed(to_unit_range(images), dtype) + self.pos_embedding[...].astype(dtype)
        x, _ = scan_layers([self.blocks], lambda blocks, x, _: (blocks[0](x), None), x, remat=self.remat,
                           batch_chunks=batch_chunks)
        return self.head(self.encoder_norm(x), dtype)

