"""Pretrained weights from a Hugging Face PaliGemma directory.

A PaliGemma directory (`config.json` + `model.safetensors`, or shards listed by `model.safetensors.index.json`,
e.g. a copy of `google/paligemma-3b-pt-224`) fills our SigLIP encoder with its projection (`vision`) and the Gemma
backbone (`backbone`). The action expert keeps its fresh initialisation, or (`expert_init="backbone"`, only when the
expert has the backbone's sizes) starts as an exact copy of the backbone's layers.

    ckpt = load_paligemma(path, config)     # reads config.json and the safetensors headers, checks everything
    ckpt.apply_to(model)                    # nnx model, in place      } one tensor at a time: read, convert,
    ckpt.apply_to_params(params)            # nnx.to_pure_dict params  } write, drop (never two full copies)

`load_paligemma` reads no tensor data; every name, shape and architecture field is checked before any weight is
written, so a wrong checkpoint fails with `CheckpointError` and leaves the model untouched.

Names: both the hub/transformers-4 naming (`language_model.model.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`) and the transformers-5 one (`model.language_model.*`, `model.vision_tower.*`, ...) are read.
Non-learned buffers some copies carry (`rotary_emb.inv_freq`, `embeddings.position_ids`) are skipped.

Equivalence with transformers' PaliGemma (proved in tests/test_weights.py):
- image tokens are the projector's output unscaled, text tokens are embeddings × sqrt(width): transformers 5 scales
  only the text embeddings (GemmaTextScaledWordEmbedding); transformers 4 divided the image features by
  sqrt(width) and then scaled the whole sequence, the same thing. Our `Siglip`/`Embedder` do exactly this, so no
  factor is folded into the weights.
- the output head is tied to the embedding (an `lm_head.weight` in the file must equal the embedding);
- transformers starts PaliGemma's RoPE positions at 1, ours at 0: attention depends only on position differences.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Float
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ki_data.prompt import PALIGEMMA_SKIP_TOKENS, PALIGEMMA_VOCAB_SIZE
from ki_model.checkpoint import CheckpointError
from ki_model.config import (
    ConfigError,
    GemmaConfig,
    Pi05KIConfig,
    SiglipConfig,
)
from ki_model.lora import is_lora_param
from ki_model.weights.common import (
    ParamPath,
    PretrainedCheckpoint,
    host_device,
    listing,
    model_param_shapes,
)

logger = logging.getLogger(__name__)

EXPERT_INITS = ("fresh", "backbone")
INIT_PREFIX = "paligemma:"

# Some copies pad the embedding table past the PaliGemma tokenizer's vocabulary (ki_data.prompt.PALIGEMMA_VOCAB_SIZE) to
# 257216 rows (64 unused rows). Rows past the model's vocabulary are dropped when there are at most this many of them;
# any other mismatch is an error.
MAX_VOCAB_PADDING = 64

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"

# Canonical names are the hub's (transformers 4) naming.
TEXT = "language_model.model."
VISION = "vision_tower.vision_model."
PROJECTOR = "multi_modal_projector."
LM_HEAD = "lm_head.weight"
# Checkpoint prefix -> canonical prefix; first match wins (longer prefixes first).
_PREFIX_ALIASES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", TEXT),
    ("language_model.model.", TEXT),
    ("model.vision_tower.vision_model.", VISION),
    ("model.vision_tower.", VISION),
    ("vision_tower.vision_model.", VISION),
    ("vision_tower.", VISION),
    ("model.multi_modal_projector.", PROJECTOR),
    ("multi_modal_projector.", PROJECTOR),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
)
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", "embeddings.position_ids")
# Activations that are the tanh approximation of GELU (what our model computes). Gemma's legacy "gelu" means tanh too.
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_fast", "gelu_new")
_FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")  # safetensors dtype names we convert to float32


# ---------------------------------------------------------------------------------------------------------------
# Conversions: Hugging Face (torch Linear [out, in]) -> our layouts (ki_model/gemma.py, ki_model/siglip.py)

Array = Float[jax.Array, "..."]


def _same(w: Array) -> Array:
    return w


def _linear(w: Float[jax.Array, "o i"]) -> Float[jax.Array, "i o"]:
    return w.T


def _gemma_q(heads: int, head_dim: int) -> Callable[[Array], Array]:
    def f(w: Float[jax.Array, "nh d"]) -> Float[jax.Array, "n d h"]:
        return w.reshape(heads, head_dim, -1).transpose(0, 2, 1)

    return f


def _gemma_kv(kv_heads: int, head_dim: int) -> Callable[[Array, Array], Array]:
    def f(k: Float[jax.Array, "kh d"], v: Float[jax.Array, "kh d"]) -> Float[jax.Array, "2 k d h"]:
        return jnp.stack([w.reshape(kv_heads, head_dim, -1).transpose(0, 2, 1) for w in (k, v)])

    return f


def _gemma_out(heads: int, head_dim: int) -> Callable[[Array], Array]:
    """An attention output projection [width, heads*head_dim] (HF) -> [heads, head_dim, width] (ours; SigLIP too)."""
    def f(w: Float[jax.Array, "d nh"]) -> Float[jax.Array, "n h d"]:
        return w.T.reshape(heads, head_dim, -1)

    return f


def _gemma_gating(gate: Float[jax.Array, "f d"], up: Float[jax.Array, "f d"]) -> Float[jax.Array, "2 d f"]:
    return jnp.stack([gate.T, up.T])


def _patch_kernel(w: Float[jax.Array, "d 3 p p"]) -> Float[jax.Array, "p p 3 d"]:
    return w.transpose(2, 3, 1, 0)


def _heads_in(heads: int, head_dim: int) -> Callable[[Array], Array]:
    def f(w: Float[jax.Array, "nh d"]) -> Float[jax.Array, "d n h"]:
        return w.T.reshape(-1, heads, head_dim)

    return f


def _heads_bias(heads: int, head_dim: int) -> Callable[[Array], Array]:
    def f(b: Float[jax.Array, " nh"]) -> Float[jax.Array, "n h"]:
        return b.reshape(heads, head_dim)

    return f


def _adaptive_from_rms(scale: Float[jax.Array, " d"]) -> Float[jax.Array, " 3*d"]:
    """An adaRMS modulation bias that reproduces a plain RMSNorm: scale = the norm's, shift 0, residual gate 1
    (`AdaptiveRMSNorm` splits the modulation as [scale | shift | gate]; its kernel stays at its zero init)."""
    return jnp.concatenate([scale, jnp.zeros_like(scale), jnp.ones_like(scale)])


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One parameter of ours from one or two checkpoint tensors (canonical names, their expected shapes)."""

    target: ParamPath
    sources: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    convert: Callable[..., Array]
    rows: int | None = None  # read only the first `rows` rows of the source (the embedding without its padding)


def _gemma_rules(cfg: GemmaConfig, vocab_size: int, vocab_rows: int) -> list[_Rule]:
    n, k, d, h, f = cfg.num_heads, cfg.num_kv_heads, cfg.width, cfg.head_dim, cfg.mlp_dim
    rules = [
        _Rule(("backbone", "embedder", "input_embedding"), (TEXT + "embed_tokens.weight",), ((vocab_rows, d),),
              _same, rows=vocab_size),
        _Rule(("backbone", "final_norm", "scale"), (TEXT + "norm.weight",), ((d,),), _same),
    ]
    for i in range(cfg.depth):
        hf, ours = f"{TEXT}layers.{i}.", ("backbone", "layers", i)
        rules += [
            _Rule((*ours, "pre_attention_norm", "scale"), (hf + "input_layernorm.weight",), ((d,),), _same),
            _Rule((*ours, "attn", "q_einsum"), (hf + "self_attn.q_proj.weight",), ((n * h, d),), _gemma_q(n, h)),
            _Rule((*ours, "attn", "kv_einsum"), (hf + "self_attn.k_proj.weight", hf + "self_attn.v_proj.weight"),
                  ((k * h, d), (k * h, d)), _gemma_kv(k, h)),
            _Rule((*ours, "attn", "attn_vec_einsum"), (hf + "self_attn.o_proj.weight",), ((d, n * h),),
                  _gemma_out(n, h)),
            _Rule((*ours, "pre_ffw_norm", "scale"), (hf + "post_attention_layernorm.weight",), ((d,),), _same),
            _Rule((*ours, "mlp", "gating_einsum"), (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                  ((f, d), (f, d)), _gemma_gating),
            _Rule((*ours, "mlp", "linear"), (hf + "mlp.down_proj.weight",), ((d, f),), _linear),
        ]
    return rules


def _expert_from_backbone_rules(backbone_rules: Sequence[_Rule]) -> list[_Rule]:
    """The action expert's layers and final norm from the backbone's tensors (the expert has no embedder)."""
    out = []
    for r in backbone_rules:
        if r.target[1] == "embedder":
            continue
        target = ("action_expert", *r.target[1:])
        if target[-1] == "scale":  # RMSNorm scale -> adaRMS modulation bias
            out.append(_Rule((*target[:-1], "modulation", "bias"), r.sources, r.shapes, _adaptive_from_rms))
        else:
            out.append(dataclasses.replace(r, target=target))
    return out


def _stack_layer_rules(rules: Sequence[_Rule]) -> list[_Rule]:
    """The model stacks its layers ([depth, ...] parameters, `ki_model.nn.stack_layers`): per-layer rules, whose
    targets name a layer (part, "layers" | "blocks", i, ...), become one rule per stacked parameter that converts
    every layer's tensors as before and stacks the results in layer order. Other rules pass through."""
    out: list[_Rule] = []
    groups: dict[ParamPath, list[_Rule]] = {}
    for r in rules:
        if len(r.target) > 2 and isinstance(r.target[2], int):
            groups.setdefault((*r.target[:2], *r.target[3:]), []).append(r)
        else:
            out.append(r)
    for target, per_layer in groups.items():
        per_layer.sort(key=lambda r: r.target[2])
        if [r.target[2] for r in per_layer] != list(range(len(per_layer))):
            raise RuntimeError(f"{target}: per-layer rules for layers {[r.target[2] for r in per_layer]}")
        n = len(per_layer[0].sources)

        def convert(*xs: Array, convs: tuple = tuple(r.convert for r in per_layer), n: int = n) -> Array:
            return jnp.stack([c(*xs[i * n : (i + 1) * n]) for i, c in enumerate(convs)])

        out.append(_Rule(target, tuple(s for r in per_layer for s in r.sources),
                         tuple(sh for r in per_layer for sh in r.shapes), convert))
    return out


def _siglip_rules(cfg: SiglipConfig, num_patches: int, out_width: int) -> list[_Rule]:
    d, m, n, p = cfg.width, cfg.mlp_dim, cfg.num_heads, cfg.patch_size
    h = d // n
    rules = [
        _Rule(("vision", "patch_embed", "kernel"), (VISION + "embeddings.patch_embedding.weight",), ((d, 3, p, p),),
              _patch_kernel),
        _Rule(("vision", "patch_embed", "bias"), (VISION + "embeddings.patch_embedding.bias",), ((d,),), _same),
        _Rule(("vision", "pos_embedding"), (VISION + "embeddings.position_embedding.weight",), ((num_patches, d),),
              _same),
        _Rule(("vision", "encoder_norm", "scale"), (VISION + "post_layernorm.weight",), ((d,),), _same),
        _Rule(("vision", "encoder_norm", "bias"), (VISION + "post_layernorm.bias",), ((d,),), _same),
        _Rule(("vision", "head", "kernel"), (PROJECTOR + "linear.weight",), ((out_width, d),), _linear),
        _Rule(("vision", "head", "bias"), (PROJECTOR + "linear.bias",), ((out_width,),), _same),
    ]
    for i in range(cfg.depth):
        hf, ours = f"{VISION}encoder.layers.{i}.", ("vision", "blocks", i)
        for norm, hf_norm in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
            rules += [
                _Rule((*ours, norm, "scale"), (f"{hf}{hf_norm}.weight",), ((d,),), _same),
                _Rule((*ours, norm, "bias"), (f"{hf}{hf_norm}.bias",), ((d,),), _same),
            ]
        for ours_proj, hf_proj in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
            rules += [
                _Rule((*ours, "attn", ours_proj, "kernel"), (f"{hf}self_attn.{hf_proj}.weight",), ((d, d),),
                      _heads_in(n, h)),
                _Rule((*ours, "attn", ours_proj, "bias"), (f"{hf}self_attn.{hf_proj}.bias",), ((d,),),
                      _heads_bias(n, h)),
            ]
        rules += [
            _Rule((*ours, "attn", "out", "kernel"), (hf + "self_attn.out_proj.weight",), ((d, d),), _gemma_out(n, h)),
            _Rule((*ours, "attn", "out", "bias"), (hf + "self_attn.out_proj.bias",), ((d,),), _same),
            _Rule((*ours, "mlp", "fc1", "kernel"), (hf + "mlp.fc1.weight",), ((m, d),), _linear),
            _Rule((*ours, "mlp", "fc1", "bias"), (hf + "mlp.fc1.bias",), ((m,),), _same),
            _Rule((*ours, "mlp", "fc2", "kernel"), (hf + "mlp.fc2.weight",), ((d, m),), _linear),
            _Rule((*ours, "mlp", "fc2", "bias"), (hf + "mlp.fc2.bias",), ((d,),), _same),
        ]
    return rules


# ---------------------------------------------------------------------------------------------------------------
# Reading the directory: config.json, the safetensors files and their headers


def canonical_name(name: str) -> str:
    """A checkpoint tensor name in the hub naming (`language_model.model.*`, `vision_tower.vision_model.*`, ...)."""
    for prefix, canon in _PREFIX_ALIASES:
        if name.startswith(prefix):
            return canon + name[len(prefix) :]
    return name




def _read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"PaliGemma checkpoint directory {path} does not exist")
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: a Hugging Face PaliGemma checkpoint directory has a config.json")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e
    if cfg.get("model_type") != "paligemma":
        raise CheckpointError(f"{file}: model_type is {cfg.get('model_type')!r}, expected 'paligemma'")
    return cfg


def _safetensors_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The files to read and, for a sharded checkpoint, the index's tensor -> file map."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} has no readable `weight_map`: {e}") from e
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists safetensors files that are missing: {listing(missing)}")
        return files, weight_map
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors file (nor {INDEX_FILE}) in {path}")
    return files, None


@dataclasses.dataclass(frozen=True)
class _Tensor:
    file: Path
    name: str  # as stored
    shape: tuple[int, ...]
    dtype: str


def _scan(files: Sequence[Path], weight_map: dict[str, str] | None) -> dict[str, _Tensor]:
    """Canonical name -> where it is stored, from the safetensors headers only (no tensor data is read)."""
    found: dict[str, _Tensor] = {}
    for file in files:
        try:
            with safe_open(file, framework="flax") as f:
                headers = {n: f.get_slice(n) for n in f.keys()}
                stored = {n: _Tensor(file, n, tuple(s.get_shape()), s.get_dtype()) for n, s in headers.items()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {file} (truncated or not a safetensors file?): {e}") from e
        for name, t in stored.items():
            canon = canonical_name(name)
            if canon in found:
                raise CheckpointError(
                    f"tensor {name!r} in {file.name} duplicates {found[canon].name!r} in {found[canon].file.name}"
                )
            found[canon] = t
    if weight_map is not None:
        stored_in = {t.name: t.file.name for t in found.values()}
        absent = [f"{n} ({f})" for n, f in weight_map.items() if stored_in.get(n) != f]
        if absent:
            raise CheckpointError(f"tensors listed in {INDEX_FILE} are not in their file: {listing(absent)}")
    return found


# ---------------------------------------------------------------------------------------------------------------
# Architecture: config.json against our config


def _get(section: dict[str, Any], key: str, where: str, default: Any = None) -> Any:
    if key in section and section[key] is not None:
        return section[key]
    if default is None:
        raise CheckpointError(f"{where}: field {key!r} is missing")
    return default


def _rope_theta(text: dict[str, Any], where: str) -> float:
    rope = text.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or text.get("rope_scaling"):
        raise CheckpointError(f"{where}: RoPE scaling {rope or text.get('rope_scaling')} is not supported")
    return float(rope.get("rope_theta", text.get("rope_theta", 10_000.0)))


def _check_architecture(hf: dict[str, Any], config: Pi05KIConfig, file: Path) -> None:
    """Every number that shapes the computation must agree; shapes are checked again on the tensors."""
    text, vision = hf.get("text_config") or {}, hf.get("vision_config") or {}
    tw, vw = f"{file} text_config", f"{file} vision_config"
    bb, vis = config.backbone, config.vision
    for section, where, kind in ((text, tw, "gemma"), (vision, vw, "siglip_vision_model")):
        if section.get("model_type", kind) != kind:  # e.g. PaliGemma 2's gemma2 (soft-capping, sliding windows)
            raise CheckpointError(f"{where}: model_type {section['model_type']!r} is not supported (only {kind!r})")
    # HF class defaults where PaliGemma's config.json leaves a field out (head_dim, eps, act, rope, image size).
    pairs = [
        (f"{tw}.hidden_size", _get(text, "hidden_size", tw), f"{config.backbone_variant}.width", bb.width),
        (f"{tw}.num_hidden_layers", _get(text, "num_hidden_layers", tw), f"{config.backbone_variant}.depth", bb.depth),
        (f"{tw}.intermediate_size", _get(text, "intermediate_size", tw), f"{config.backbone_variant}.mlp_dim",
         bb.mlp_dim),
        (f"{tw}.num_attention_heads", _get(text, "num_attention_heads", tw), f"{config.backbone_variant}.num_heads",
         bb.num_heads),
        (f"{tw}.num_key_value_heads", _get(text, "num_key_value_heads", tw),
         f"{config.backbone_variant}.num_kv_heads", bb.num_kv_heads),
        (f"{tw}.head_dim", _get(text, "head_dim", tw, 256), f"{config.backbone_variant}.head_dim", bb.head_dim),
        (f"{tw}.rms_norm_eps", float(_get(text, "rms_norm_eps", tw, 1e-6)), "our RMSNorm eps", 1e-6),
        (f"{tw}.rope_theta", _rope_theta(text, tw), "our RoPE max wavelength", 10_000.0),
        (f"{vw}.hidden_size", _get(vision, "hidden_size", vw), f"{config.vision_variant}.width", vis.width),
        (f"{vw}.num_hidden_layers", _get(vision, "num_hidden_layers", vw), f"{config.vision_variant}.depth",
         vis.depth),
        (f"{vw}.intermediate_size", _get(vision, "intermediate_size", vw), f"{config.vision_variant}.mlp_dim",
         vis.mlp_dim),
        (f"{vw}.num_attention_heads", _get(vision, "num_attention_heads", vw), f"{config.vision_variant}.num_heads",
         vis.num_heads),
        (f"{vw}.patch_size", _get(vision, "patch_size", vw), f"{config.vision_variant}.patch_size", vis.patch_size),
        (f"{vw}.image_size", _get(vision, "image_size", vw, 224), "config.image_size", config.image_size),
        (f"{vw}.num_channels", _get(vision, "num_channels", vw, 3), "RGB channels", 3),
        (f"{vw}.layer_norm_eps", float(_get(vision, "layer_norm_eps", vw, 1e-6)), "our LayerNorm eps", 1e-6),
    ]
    differ = [f"{a} = {x} but {b} = {y}" for a, x, b, y in pairs if x != y]
    if differ:
        raise CheckpointError("checkpoint and model config disagree: " + "; ".join(differ))
    text_act = _get(text, "hidden_activation", tw, _get(text, "hidden_act", tw, "gelu_pytorch_tanh"))
    if text_act not in (*_TANH_GELU, "gelu"):
        raise CheckpointError(f"{tw}: activation {text_act!r} is not the tanh GELU our Gemma computes")
    vision_act = _get(vision, "hidden_act", vw, "gelu_pytorch_tanh")
    if vision_act not in _TANH_GELU:
        raise CheckpointError(f"{vw}: activation {vision_act!r} is not the tanh GELU our SigLIP computes")


def _vocab_rows_checked(tensors: dict[str, _Tensor], config: Pi05KIConfig) -> int:
    """Rows of the checkpoint's embedding; raises unless they equal the model's vocabulary or only pad it."""
    embed = tensors.get(TEXT + "embed_tokens.weight")
    if embed is None:
        raise CheckpointError(f"checkpoint has no embedding table ({TEXT}embed_tokens.weight)")
    rows = embed.shape[0]
    if not 0 <= rows - config.vocab_size <= MAX_VOCAB_PADDING:
        raise CheckpointError(
            f"the model's vocab_size is {config.vocab_size} but the checkpoint's embedding {embed.name} has {rows} "
            f"rows: initialising from PaliGemma needs shards made with PaliGemma's text tokenizer "
            f"(vocab_size {PALIGEMMA_VOCAB_SIZE}, skip_tokens {PALIGEMMA_SKIP_TOKENS})"
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The checked checkpoint


@dataclasses.dataclass(frozen=True)
class LoadReport:
    path: str
    files: tuple[str, ...]
    num_tensors: int  # checkpoint tensors used
    num_params: int  # our parameters written
    vocab_rows: int  # rows of the checkpoint's embedding table
    vocab_rows_dropped: int  # padding rows past the model's vocabulary
    expert_init: str
    ignored: tuple[str, ...]  # non-learned buffers skipped
    tied_lm_head: bool  # the file carried an lm_head.weight (equal to the embedding)

    def summary(self) -> str:
        dropped = (
            f"; dropped {self.vocab_rows_dropped} padding rows of the embedding ({self.vocab_rows} -> "
            f"{self.vocab_rows - self.vocab_rows_dropped})" if self.vocab_rows_dropped else ""
        )
        return (
            f"PaliGemma {self.path}: {self.num_tensors} tensors from {len(self.files)} file(s) -> {self.num_params} "
            f"parameters (vision + backbone{' + action expert' if self.expert_init == 'backbone' else ''}); "
            f"action expert: {self.expert_init}{dropped}"
        )


@dataclasses.dataclass(frozen=True)
class PaliGemmaCheckpoint(PretrainedCheckpoint):
    """A checked checkpoint: `tensors()` converts lazily, `apply_to`/`apply_to_params` write one tensor at a time
    (vision encoder, backbone, and with expert_init='backbone' the action expert's layers)."""

    KIND: ClassVar[str] = "PaliGemma"

    path: Path
    config: Pi05KIConfig
    expert_init: str
    report: LoadReport
    _tensors: dict[str, _Tensor]
    _rules: tuple[_Rule, ...]

    def tensors(self, progress: bool = False) -> Iterator[tuple[ParamPath, Float[jax.Array, ...]]]:
        """(our parameter path, float32 array on the CPU) one at a time; each source tensor is read from disk when
        needed and dropped after conversion. Paths as in `nnx.to_flat_state(nnx.state(model, nnx.Param))`."""
        def read(canon: str, rows: int | None) -> Array:
            t = self._tensors[canon]
            try:
                # Opened per tensor: the file's mapping (resident pages included) goes away with the tensor.
                with safe_open(t.file, framework="flax") as f:  # "flax": bfloat16 too (numpy has none)
                    x = f.get_tensor(t.name) if rows is None else f.get_slice(t.name)[:rows]
                    return x.astype(jnp.float32)
            except SafetensorError as e:
                raise CheckpointError(f"cannot read tensor {t.name!r} from {t.file}: {e}") from e

        for rule in tqdm(self._rules, desc="paligemma", unit="param", disable=not progress):
            # Only around the work: a context left entered across `yield` would leak into the caller.
            with jax.default_device(host_device()):
                value = rule.convert(*(read(s, rule.rows) for s in rule.sources))
            yield rule.target, value

    def shipped_tokenizer(self) -> Path:
        return self.path / TOKENIZER_FILE


def _check_rules_against_model(rules: Sequence[_Rule], config: Pi05KIConfig, expert_init: str) -> None:
    """Our side of the mapping: every target exists with the converted shape, and no vision/backbone weight (nor,
    with expert_init='backbone', action-expert layer weight) is left without a source."""
    shapes = model_param_shapes(config)
    problems = []
    for r in rules:
        read = [(r.rows, *s[1:]) if r.rows is not None else s for s in r.shapes]
        dummy = jax.eval_shape(r.convert, *(jax.ShapeDtypeStruct(s, jnp.float32) for s in read))
        if r.target not in shapes:
            problems.append(f"{r.target} does not exist in the model")
        elif shapes[r.target] != dummy.shape:
            problems.append(f"{r.target}: model {shapes[r.target]}, converted {dummy.shape}")
    covered = {r.target for r in rules}
    must = [p for p in shapes if p[0] in ("vision", "backbone") and not is_lora_param(p)]  # LoRA keeps its init
    if expert_init == "backbone":  # the adaRMS modulation kernels keep their (zero) init
        must += [p for p in shapes if p[0] == "action_expert" and p[-2:] != ("modulation", "kernel")]
    problems += [f"{p} has no checkpoint tensor" for p in must if p not in covered]
    if problems:  # a change in ki_model's layouts that this module does not follow yet
        raise RuntimeError("ki_model.weights is out of date with the model's parameters: " + "; ".join(problems))


def _check_lm_head(tensors: dict[str, _Tensor], rows: int, block: int = 16384) -> bool:
    """An lm_head in the file must be the tied embedding (compared block by block to bound memory)."""
    head, embed = tensors.get(LM_HEAD), tensors[TEXT + "embed_tokens.weight"]
    if head is None:
        return False
    if head.shape != embed.shape:
        raise CheckpointError(f"{head.name} has shape {head.shape}, the embedding {embed.shape}: it must be tied")
    with contextlib.ExitStack() as stack, jax.default_device(host_device()):
        a = stack.enter_context(safe_open(head.file, framework="flax")).get_slice(head.name)
        b = stack.enter_context(safe_open(embed.file, framework="flax")).get_slice(embed.name)
        for start in range(0, rows, block):
            stop = min(start + block, rows)
            if not np.array_equal(np.asarray(a[start:stop]), np.asarray(b[start:stop])):
                raise CheckpointError(
                    f"{head.name} differs from {embed.name}: our model ties the output head to the embedding"
                )
    return True


def load_paligemma(
    path: str | os.PathLike, config: Pi05KIConfig, *, expert_init: str = "fresh"
) -> PaliGemmaCheckpoint:
    """Open and check a Hugging Face PaliGemma checkpoint directory for `config` (no weight is read yet).

    Raises CheckpointError naming the file, tensor or field at fault: missing config.json / safetensors, unreadable
    (e.g. truncated) file, missing or unexpected tensor, wrong shape, an architecture other than the config's, or
    an embedding whose rows are not the model's vocab_size (up to MAX_VOCAB_PADDING extra rows are dropped).
    expert_init: "fresh" (the action expert keeps its initialisation) or "backbone" (a copy of the backbone's
    layers; needs an expert variant of the backbone's width and mlp_dim).
    """
    path = Path(path)
    if expert_init not in EXPERT_INITS:
        raise ConfigError(f"expert_init must be one of {EXPERT_INITS}, got {expert_init!r}")
    if expert_init == "backbone" and (config.expert.width, config.expert.mlp_dim) != (
        config.backbone.width,
        config.backbone.mlp_dim,
    ):
        raise ConfigError(
            f"expert_init='backbone' copies the backbone's layers, so the action expert {config.expert_variant!r} "
            f"(width {config.expert.width}, mlp_dim {config.expert.mlp_dim}) must have the backbone "
            f"{config.backbone_variant!r}'s width {config.backbone.width} and mlp_dim {config.backbone.mlp_dim}"
        )
    hf_config = _read_config(path)
    _check_architecture(hf_config, config, path / CONFIG_FILE)
    files, weight_map = _safetensors_files(path)
    tensors = _scan(files, weight_map)
    rows = _vocab_rows_checked(tensors, config)

    backbone = _gemma_rules(config.backbone, config.vocab_size, rows)
    rules = _siglip_rules(config.vision, config.tokens_per_image, config.backbone.width) + backbone
    if expert_init == "backbone":
        rules += _expert_from_backbone_rules(backbone)
    rules = _stack_layer_rules(rules)
    _check_rules_against_model(rules, config, expert_init)

    expected = {s for r in rules for s in r.sources}
    ignored = sorted(tensors[n].name for n in tensors if n.endswith(_IGNORED_SUFFIXES))
    missing = sorted(expected - set(tensors))
    unexpected = sorted(
        tensors[n].name for n in tensors if n not in expected and n != LM_HEAD and not n.endswith(_IGNORED_SUFFIXES)
    )
    if missing or unexpected:
        parts = [f"missing tensors: {listing(missing)}"] if missing else []
        parts += [f"unexpected tensors: {listing(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{path} is not a PaliGemma checkpoint for this config: " + "; ".join(parts))
    wrong = [
        f"{tensors[s].name} {tensors[s].shape} (expected {shape})"
        for r in rules
        for s, shape in zip(r.sources, r.shapes, strict=True)
        if tensors[s].shape != shape
    ]
    if wrong:
        raise CheckpointError(f"{path}: tensors with the wrong shape: {listing(sorted(set(wrong)))}")
    not_float = [f"{tensors[s].name} ({tensors[s].dtype})" for s in expected if tensors[s].dtype not in _FLOAT_DTYPES]
    if not_float:  # e.g. a quantized copy
        raise CheckpointError(f"{path}: tensors that are not floating point: {listing(not_float)}")
    tied = _check_lm_head(tensors, rows)

    if rows > config.vocab_size:
        logger.info("%s: dropping %d padding rows of the embedding (%d -> %d)", path, rows - config.vocab_size,
                       rows, config.vocab_size)
    report = LoadReport(
        path=str(path),
        files=tuple(f.name for f in files),
        num_tensors=len(expected) + int(tied),
        num_params=len(rules),
        vocab_rows=rows,
        vocab_rows_dropped=rows - config.vocab_size,
        expert_init=expert_init,
        ignored=tuple(ignored),
        tied_lm_head=tied,
    )
    return PaliGemmaCheckpoint(path, config, expert_init, report, tensors, tuple(rules))


def init_from_paligemma(
    model: nnx.Module, path: str | os.PathLike, *, expert_init: str = "fresh", progress: bool = True
) -> LoadReport:
    """Load a PaliGemma checkpoint into `model` (a `Pi05KI`) in place; returns what was loaded."""
    return load_paligemma(path, model.config, expert_init=expert_init).apply_to(model, progress=progress)



