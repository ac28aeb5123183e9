"""Pretrained weights into the π0.5-KI model: a Hugging Face PaliGemma directory, or an openpi π0.5 checkpoint.

openpi (`params/`, an orbax tree; see the section below): `openpi_config(path, **data_fields)` reads the
architecture from the stored shapes, `load_openpi(path, config)` checks every name and shape (metadata only) and
returns a checkpoint with the same `apply_to` / `apply_to_params` as PaliGemma's; it fills the whole model.

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Float
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ki_model.checkpoint import CheckpointError
from ki_model.config import ConfigError, GemmaConfig, Pi05KIConfig, SiglipConfig, gemma_config, siglip_config

logger = logging.getLogger(__name__)


def write_into_params(params: dict, tensors: Iterator[tuple[tuple, np.ndarray]]) -> None:
    """Put converted arrays into a `nnx.to_pure_dict` parameter tree in place, one at a time: each new array placed
    with the sharding of the one it replaces (so the old one is freed as it goes), its shape checked."""
    for target, value in tensors:
        *parents, leaf = target
        node = params
        for key in parents:
            node = node[key]
        old = node[leaf]
        if tuple(old.shape) != value.shape:
            raise CheckpointError(f"parameter {target} has shape {tuple(old.shape)}, converted {value.shape}")
        sharding = getattr(old, "sharding", None)
        node[leaf] = jax.device_put(value.astype(old.dtype), sharding) if sharding else value.astype(old.dtype)
        del old

ParamPath = tuple[str | int, ...]
EXPERT_INITS = ("fresh", "backbone")
INIT_PREFIX = "paligemma:"

# The PaliGemma tokenizer's vocabulary; some copies pad the embedding table to 257216 rows (64 unused rows). Rows past
# the model's vocabulary are dropped when there are at most this many of them; any other mismatch is an error.
PALIGEMMA_VOCAB_SIZE = 257152
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
_LIST_LIMIT = 12


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


def _heads_out(heads: int, head_dim: int) -> Callable[[Array], Array]:
    def f(w: Float[jax.Array, "d nh"]) -> Float[jax.Array, "n h d"]:
        return w.T.reshape(heads, head_dim, -1)

    return f


def _adaptive_from_rms(scale: Float[jax.Array, " d"]) -> Float[jax.Array, " 3d"]:
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
            _Rule((*ours, "attn", "out", "kernel"), (hf + "self_attn.out_proj.weight",), ((d, d),), _heads_out(n, h)),
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


def _listing(names: Sequence[str]) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else ""
    return ", ".join(names[:_LIST_LIMIT]) + more


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
            raise CheckpointError(f"{index} lists safetensors files that are missing: {_listing(missing)}")
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
            raise CheckpointError(f"tensors listed in {INDEX_FILE} are not in their file: {_listing(absent)}")
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
            f"(vocab_size {PALIGEMMA_VOCAB_SIZE}, skip_tokens 128)"
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
class PaliGemmaCheckpoint:
    """A checked checkpoint: `tensors()` converts lazily, `apply_to`/`apply_to_params` write one tensor at a time."""

    path: Path
    config: Pi05KIConfig
    expert_init: str
    report: LoadReport
    _tensors: dict[str, _Tensor]
    _rules: tuple[_Rule, ...]

    @property
    def vocab_size(self) -> int:
        """The vocabulary the loaded embedding covers (the model's vocab_size)."""
        return self.config.vocab_size

    def tensors(self, progress: bool = False) -> Iterator[tuple[ParamPath, Float[jax.Array, "..."]]]:
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
            with jax.default_device(_cpu()):
                value = rule.convert(*(read(s, rule.rows) for s in rule.sources))
            yield rule.target, value

    def apply_to(self, model: nnx.Module, progress: bool = False) -> LoadReport:
        """Write the weights into a `Pi05KI` in place (its other parameters are left as they are)."""
        config = getattr(model, "config", None)
        if not isinstance(config, Pi05KIConfig) or _architecture(config) != _architecture(self.config):
            raise CheckpointError(
                f"the model's architecture {None if config is None else _architecture(config)} differs from the one "
                f"this checkpoint was checked against {_architecture(self.config)}"
            )
        variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        for target, value in self.tensors(progress):
            var = variables[target]
            old = var.get_value()
            var.set_value(jax.device_put(value.astype(old.dtype), old.sharding))
            del value
            del old
        logger.info(self.report.summary())
        return self.report

    def apply_to_params(self, params: dict, progress: bool = False) -> dict:
        """Replace the leaves of a `nnx.to_pure_dict` parameter tree IN PLACE; returns the same dict."""
        write_into_params(params, self.tensors(progress))
        logger.info(self.report.summary())
        return params

    def check_text_tokenizer(self, text_model: str | os.PathLike) -> None:
        """The shards' text tokenizer must be the checkpoint's: same vocabulary size, and the very same file when
        the checkpoint directory ships its `tokenizer.model`."""
        from ki_data import TextTokenizer

        text_model = Path(text_model)
        try:
            tok = TextTokenizer.load(text_model)
        except (OSError, ValueError) as e:  # ValueError: not a SentencePiece model
            raise CheckpointError(f"cannot check the text tokenizer against {self.path}: {e}") from e
        if tok.vocab_size != self.vocab_size:
            raise CheckpointError(
                f"text tokenizer {text_model} has {tok.vocab_size} pieces but the PaliGemma checkpoint {self.path} "
                f"embeds {self.vocab_size}: preprocess with PaliGemma's tokenizer.model"
            )
        ref = self.path / TOKENIZER_FILE
        if ref.is_file() and ref.read_bytes() != text_model.read_bytes():
            raise CheckpointError(f"text tokenizer {text_model} differs from the checkpoint's {ref}")


def _architecture(config: Pi05KIConfig) -> tuple:
    """The config fields that decide the shapes of the parameters loaded here (sizes, whether named or explicit)."""
    return config.backbone, config.expert, config.vision, config.vocab_size, config.image_size


def _cpu() -> jax.Device:
    # Checkpoint tensors are read and converted on the host; only the final arrays go to the model's devices.
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return jax.devices()[0]


def _model_param_shapes(config: Pi05KIConfig) -> dict[ParamPath, tuple[int, ...]]:
    abstract = nnx.eval_shape(lambda: config.create(nnx.Rngs(0)))
    return {p: tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def _check_rules_against_model(rules: Sequence[_Rule], config: Pi05KIConfig, expert_init: str) -> None:
    """Our side of the mapping: every target exists with the converted shape, and no vision/backbone weight (nor,
    with expert_init='backbone', action-expert layer weight) is left without a source."""
    shapes = _model_param_shapes(config)
    problems = []
    for r in rules:
        read = [(r.rows, *s[1:]) if r.rows is not None else s for s in r.shapes]
        dummy = jax.eval_shape(r.convert, *(jax.ShapeDtypeStruct(s, jnp.float32) for s in read))
        if r.target not in shapes:
            problems.append(f"{r.target} does not exist in the model")
        elif shapes[r.target] != dummy.shape:
            problems.append(f"{r.target}: model {shapes[r.target]}, converted {dummy.shape}")
    covered = {r.target for r in rules}
    must = [p for p in shapes if p[0] in ("vision", "backbone")]
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
    with contextlib.ExitStack() as stack, jax.default_device(_cpu()):
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
    _check_rules_against_model(rules, config, expert_init)

    expected = {s for r in rules for s in r.sources}
    ignored = sorted(tensors[n].name for n in tensors if n.endswith(_IGNORED_SUFFIXES))
    missing = sorted(expected - set(tensors))
    unexpected = sorted(
        tensors[n].name for n in tensors if n not in expected and n != LM_HEAD and not n.endswith(_IGNORED_SUFFIXES)
    )
    if missing or unexpected:
        parts = [f"missing tensors: {_listing(missing)}"] if missing else []
        parts += [f"unexpected tensors: {_listing(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{path} is not a PaliGemma checkpoint for this config: " + "; ".join(parts))
    wrong = [
        f"{tensors[s].name} {tensors[s].shape} (expected {shape})"
        for r in rules
        for s, shape in zip(r.sources, r.shapes, strict=True)
        if tensors[s].shape != shape
    ]
    if wrong:
        raise CheckpointError(f"{path}: tensors with the wrong shape: {_listing(sorted(set(wrong)))}")
    not_float = [f"{tensors[s].name} ({tensors[s].dtype})" for s in expected if tensors[s].dtype not in _FLOAT_DTYPES]
    if not_float:  # e.g. a quantized copy
        raise CheckpointError(f"{path}: tensors that are not floating point: {_listing(not_float)}")
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



# ---------------------------------------------------------------------------------------------------------------
# openpi π0.5 checkpoints: an orbax PyTree `params/` directory holding {"params": P}
#
# P is openpi's nnx pure dict: `PaliGemma/img` (SigLIP, layers scanned under `Transformer/encoderblock`),
# `PaliGemma/llm` (both Gemma experts, layers scanned under `layers`; the action expert's arrays carry the suffix
# `_1`, its adaRMS modulation is `<norm>_1/Dense_0`), and the action expert's projections and time MLP at the top.
# Every array has our layout already (openpi's Gemma and SigLIP are big_vision's, as ours); loading un-stacks the
# scanned depth axis and drops the leading 1 of `pos_embedding`. Both experts share the `layers` arrays' depth.

OPENPI_PREFIX = "openpi:"
OPENPI_PARAMS = "params"
_LLM, _IMG = "PaliGemma/llm/", "PaliGemma/img/"
_ENCODER = _IMG + "Transformer/encoderblock/"
# π0 (not π0.5) feeds the state through a projection and mixes time into the action tokens.
_PI0_ONLY = ("state_proj", "action_time_mlp_in", "action_time_mlp_out")
_OPENPI_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _StoredArray:
    key: tuple[str, ...]  # the path in the stored tree (with the `params` root and any trailing `value`)
    shape: Shape
    dtype: str


@dataclasses.dataclass(frozen=True)
class _OpenpiRule:
    """One stored openpi array -> our parameters (one per layer for a scanned array)."""

    name: str  # openpi's path below `params`, e.g. "PaliGemma/llm/layers/attn/q_einsum/w"
    shape: Shape  # its expected stored shape
    targets: tuple[tuple[ParamPath, Shape], ...]  # our parameters and their shapes, in the order `unpack` yields
    unpack: Callable[[np.ndarray], Iterator[np.ndarray]]


def _whole(name: str, shape: Shape, target: ParamPath) -> _OpenpiRule:
    return _OpenpiRule(name, shape, ((target, shape),), lambda x: iter((x,)))


def _scanned(name: str, depth: int, shape: Shape, target: Callable[[int], ParamPath]) -> _OpenpiRule:
    return _OpenpiRule(
        name, (depth, *shape), tuple((target(i), shape) for i in range(depth)), lambda x: (x[i] for i in range(depth))
    )


def _openpi_gemma_rules(cfg: GemmaConfig, expert: int, ours: str, cond_dim: int | None, vocab: int) -> list[_OpenpiRule]:
    n, k, d, h, f, depth = cfg.num_heads, cfg.num_kv_heads, cfg.width, cfg.head_dim, cfg.mlp_dim, cfg.depth
    sfx = f"_{expert}" if expert else ""
    layers = _LLM + "layers/"

    def layer(*rest: str) -> Callable[[int], ParamPath]:
        return lambda i: (ours, "layers", i, *rest)

    if n == k:  # openpi fuses Q, K and V into one array when every head has its own K/V
        qkv = _OpenpiRule(
            f"{layers}attn/qkv_einsum{sfx}/w",
            (depth, 3, n, d, h),
            tuple(t for i in range(depth) for t in (((ours, "layers", i, "attn", "q_einsum"), (n, d, h)),
                                                   ((ours, "layers", i, "attn", "kv_einsum"), (2, k, d, h)))),
            lambda x: (w for i in range(depth) for w in (x[i, 0], x[i, 1:])),
        )
        rules = [qkv]
    else:
        rules = [
            _scanned(f"{layers}attn/q_einsum{sfx}/w", depth, (n, d, h), layer("attn", "q_einsum")),
            _scanned(f"{layers}attn/kv_einsum{sfx}/w", depth, (2, k, d, h), layer("attn", "kv_einsum")),
        ]
    rules += [
        _scanned(f"{layers}attn/attn_vec_einsum{sfx}/w", depth, (n, h, d), layer("attn", "attn_vec_einsum")),
        _scanned(f"{layers}mlp{sfx}/gating_einsum", depth, (2, d, f), layer("mlp", "gating_einsum")),
        _scanned(f"{layers}mlp{sfx}/linear", depth, (f, d), layer("mlp", "linear")),
    ]
    for norm in ("pre_attention_norm", "pre_ffw_norm"):
        if cond_dim is None:
            rules.append(_scanned(f"{layers}{norm}{sfx}/scale", depth, (d,), layer(norm, "scale")))
        else:  # adaRMS: openpi's Dense_0 is our modulation ([scale | shift | gate], the same split)
            rules += [
                _scanned(f"{layers}{norm}{sfx}/Dense_0/kernel", depth, (cond_dim, 3 * d), layer(norm, "modulation", "kernel")),
                _scanned(f"{layers}{norm}{sfx}/Dense_0/bias", depth, (3 * d,), layer(norm, "modulation", "bias")),
            ]
    if cond_dim is None:
        rules.append(_whole(f"{_LLM}final_norm{sfx}/scale", (d,), (ours, "final_norm", "scale")))
    else:
        rules += [
            _whole(f"{_LLM}final_norm{sfx}/Dense_0/kernel", (cond_dim, 3 * d), (ours, "final_norm", "modulation", "kernel")),
            _whole(f"{_LLM}final_norm{sfx}/Dense_0/bias", (3 * d,), (ours, "final_norm", "modulation", "bias")),
        ]
    if expert == 0:
        rules.append(_whole(f"{_LLM}embedder/input_embedding", (vocab, d), (ours, "embedder", "input_embedding")))
    return rules


def _openpi_siglip_rules(cfg: SiglipConfig, num_patches: int, out_width: int) -> list[_OpenpiRule]:
    w, m, heads, p, depth = cfg.width, cfg.mlp_dim, cfg.num_heads, cfg.patch_size, cfg.depth
    hd = w // heads

    def block(*rest: str) -> Callable[[int], ParamPath]:
        return lambda i: ("vision", "blocks", i, *rest)

    rules = [
        _whole(_IMG + "embedding/kernel", (p, p, 3, w), ("vision", "patch_embed", "kernel")),
        _whole(_IMG + "embedding/bias", (w,), ("vision", "patch_embed", "bias")),
        _OpenpiRule(_IMG + "pos_embedding", (1, num_patches, w), ((("vision", "pos_embedding"), (num_patches, w)),),
                    lambda x: iter((x[0],))),
        _whole(_IMG + "Transformer/encoder_norm/scale", (w,), ("vision", "encoder_norm", "scale")),
        _whole(_IMG + "Transformer/encoder_norm/bias", (w,), ("vision", "encoder_norm", "bias")),
        _whole(_IMG + "head/kernel", (w, out_width), ("vision", "head", "kernel")),
        _whole(_IMG + "head/bias", (out_width,), ("vision", "head", "bias")),
    ]
    for theirs, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
        rules += [_scanned(f"{_ENCODER}{theirs}/{leaf}", depth, (w,), block(ours, leaf)) for leaf in ("scale", "bias")]
    attn = _ENCODER + "MultiHeadDotProductAttention_0/"
    for theirs, ours in (("query", "q"), ("key", "k"), ("value", "v")):
        rules += [
            _scanned(f"{attn}{theirs}/kernel", depth, (w, heads, hd), block("attn", ours, "kernel")),
            _scanned(f"{attn}{theirs}/bias", depth, (heads, hd), block("attn", ours, "bias")),
        ]
    rules += [
        _scanned(attn + "out/kernel", depth, (heads, hd, w), block("attn", "out", "kernel")),
        _scanned(attn + "out/bias", depth, (w,), block("attn", "out", "bias")),
    ]
    for theirs, ours, (a, b) in (("Dense_0", "fc1", (w, m)), ("Dense_1", "fc2", (m, w))):
        rules += [
            _scanned(f"{_ENCODER}MlpBlock_0/{theirs}/kernel", depth, (a, b), block("mlp", ours, "kernel")),
            _scanned(f"{_ENCODER}MlpBlock_0/{theirs}/bias", depth, (b,), block("mlp", ours, "bias")),
        ]
    return rules


def _openpi_rules(config: Pi05KIConfig) -> list[_OpenpiRule]:
    """Every array an openpi π0.5 checkpoint of `config`'s sizes holds, and where each goes in our model."""
    bb, ex, a = config.backbone, config.expert, config.action_dim
    e = ex.width
    rules = _openpi_siglip_rules(config.vision, config.tokens_per_image, bb.width)
    rules += _openpi_gemma_rules(bb, 0, "backbone", None, config.vocab_size)
    rules += _openpi_gemma_rules(ex, 1, "action_expert", e, config.vocab_size)
    for name, (i, o) in (("action_in_proj", (a, e)), ("action_out_proj", (e, a)), ("time_mlp_in", (e, e)),
                         ("time_mlp_out", (e, e))):
        rules += [_whole(f"{name}/kernel", (i, o), (name, "kernel")), _whole(f"{name}/bias", (o,), (name, "bias"))]
    return rules


def openpi_shapes(config: Pi05KIConfig) -> dict[str, Shape]:
    """The arrays (openpi name -> stored shape) of an openpi π0.5 checkpoint with `config`'s sizes."""
    return {r.name: r.shape for r in _openpi_rules(config)}


def _check_openpi_rules_against_model(rules: Sequence[_OpenpiRule], config: Pi05KIConfig) -> int:
    """Our side: every target exists with its shape, and every parameter of the model is written exactly once.
    Returns the number of parameters written."""
    shapes = _model_param_shapes(config)
    targets = [t for r in rules for t in r.targets]
    problems = [f"{p} does not exist in the model" for p, _ in targets if p not in shapes]
    problems += [f"{p}: model {shapes[p]}, converted {s}" for p, s in targets if p in shapes and shapes[p] != s]
    written = [p for p, _ in targets]
    problems += [f"{p} is written twice" for p in sorted(set(written), key=written.index) if written.count(p) > 1]
    problems += [f"{p} has no checkpoint array" for p in shapes if p not in set(written)]
    if problems:  # a change in ki_model's layouts that this module does not follow yet
        raise RuntimeError("ki_model.weights is out of date with the model's parameters: " + "; ".join(problems))
    return len(written)


def _openpi_params_dir(path: str | os.PathLike) -> Path:
    """The orbax directory: PATH/params (PATH as `--init openpi:PATH` names it), or PATH itself if it is one."""
    path = Path(path)
    if (path / OPENPI_PARAMS).is_dir():
        return path / OPENPI_PARAMS
    if (path / "_METADATA").is_file() or (path / "_CHECKPOINT_METADATA").is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"openpi checkpoint directory {path} does not exist")
    raise CheckpointError(
        f"{path} is not an openpi checkpoint: it has no {OPENPI_PARAMS}/ directory (an orbax tree with _METADATA)"
    )


def _scan_openpi(params_dir: Path) -> dict[str, _StoredArray]:
    """openpi name (below `params`, without a trailing `value`) -> stored array, from orbax metadata (no data read)."""
    import orbax.checkpoint as ocp

    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            tree = ckptr.metadata(params_dir)
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for a damaged or foreign directory
        raise CheckpointError(f"cannot read the orbax metadata of {params_dir} (not an orbax checkpoint?): {e}") from e
    tree = getattr(tree, "item_metadata", tree)  # orbax >= 0.11.x wraps the tree in step metadata
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict) or OPENPI_PARAMS not in tree:
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise CheckpointError(f"{params_dir} is not an openpi params tree: no top-level {OPENPI_PARAMS!r} (has {keys})")
    leaves = jax.tree_util.tree_flatten_with_path(tree[OPENPI_PARAMS])[0]
    keys = [tuple(str(getattr(k, "key", k)) for k in path) for path, _ in leaves]
    # A tree saved from openpi's training state carries nnx.State's `value` below every leaf; openpi strips it too.
    strip = bool(keys) and all(len(k) > 1 and k[-1] == "value" for k in keys)
    found: dict[str, _StoredArray] = {}
    for key, (_, leaf) in zip(keys, leaves, strict=True):
        name = "/".join(key[:-1] if strip else key)
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if shape is None or dtype is None:
            raise CheckpointError(f"{params_dir}: {name} is not an array ({type(leaf).__name__})")
        found[name] = _StoredArray((OPENPI_PARAMS, *key), tuple(int(x) for x in shape), str(np.dtype(dtype)))
    pi0 = sorted(n for n in found if n.split("/")[0] in _PI0_ONLY)
    if pi0:
        raise CheckpointError(f"{params_dir} is a π0 checkpoint ({', '.join(pi0[:3])}), not π0.5: ki's model is π0.5")
    if not any(n.startswith(_LLM) for n in found):
        raise CheckpointError(f"{params_dir} is not an openpi π0.5 params tree: no {_LLM}* array")
    return found


def _need(found: dict[str, _StoredArray], name: str, ndim: int, where: Path) -> Shape:
    if name not in found:
        raise CheckpointError(f"{where}: array {name} is missing (needed to read the architecture)")
    shape = found[name].shape
    if len(shape) != ndim:
        raise CheckpointError(f"{where}: {name} has shape {shape}; an openpi π0.5 checkpoint has {ndim} axes there")
    return shape


def _gemma_sizes(found: dict[str, _StoredArray], sfx: str, where: Path) -> GemmaConfig:
    layers = _LLM + "layers/"
    if f"{layers}attn/qkv_einsum{sfx}/w" in found:
        depth, _, n, d, h = _need(found, f"{layers}attn/qkv_einsum{sfx}/w", 5, where)
        k = n
    else:
        depth, n, d, h = _need(found, f"{layers}attn/q_einsum{sfx}/w", 4, where)
        k = _need(found, f"{layers}attn/kv_einsum{sfx}/w", 5, where)[2]
    f = _need(found, f"{layers}mlp{sfx}/gating_einsum", 4, where)[3]
    return GemmaConfig(width=d, depth=depth, mlp_dim=f, num_heads=n, num_kv_heads=k, head_dim=h)


def _openpi_architecture(found: dict[str, _StoredArray], where: Path) -> dict[str, Any]:
    """The Pi05KIConfig fields that the stored shapes decide."""
    p, p2, channels, width = _need(found, _IMG + "embedding/kernel", 4, where)
    if p != p2 or channels != 3:
        raise CheckpointError(f"{where}: {_IMG}embedding/kernel {found[_IMG + 'embedding/kernel'].shape} is not a "
                              "square RGB patch embedding")
    num_patches = _need(found, _IMG + "pos_embedding", 3, where)[1]
    grid = int(round(num_patches**0.5))
    if grid * grid != num_patches:
        raise CheckpointError(f"{where}: {_IMG}pos_embedding has {num_patches} positions, not a square grid")
    depth, _, heads, head_dim = _need(found, _ENCODER + "MultiHeadDotProductAttention_0/query/kernel", 4, where)
    if heads * head_dim != width:
        raise CheckpointError(f"{where}: SigLIP with {heads} heads of {head_dim} != width {width} is not supported")
    mlp = _need(found, _ENCODER + "MlpBlock_0/Dense_0/kernel", 3, where)[2]
    return dict(
        backbone_variant=_gemma_sizes(found, "", where),
        expert_variant=_gemma_sizes(found, "_1", where),
        vision_variant=SiglipConfig(width=width, depth=depth, mlp_dim=mlp, num_heads=heads, patch_size=p),
        image_size=grid * p,
        action_dim=_need(found, "action_in_proj/kernel", 2, where)[0],
        vocab_size=_need(found, _LLM + "embedder/input_embedding", 2, where)[0],
    )


def openpi_config_from_shapes(shapes: dict[str, Shape], where: str = "openpi checkpoint", **fields: Any) -> Pi05KIConfig:
    """`openpi_config` for a tree given as openpi name -> shape (e.g. the names and shapes of a released tree)."""
    found = {n: _StoredArray((n,), tuple(s), "float32") for n, s in shapes.items()}
    return _config_from_found(found, Path(where), fields)


def _config_from_found(found: dict[str, _StoredArray], where: Path, fields: dict[str, Any]) -> Pi05KIConfig:
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(Pi05KIConfig)})
    if unknown:
        raise ConfigError(f"unknown Pi05KIConfig fields {unknown}")
    arch = _openpi_architecture(found, where)
    if fields.get("vocab_size") not in (None, arch["vocab_size"]):  # the likeliest mismatch: say it first
        raise CheckpointError(
            f"the model's vocab_size is {fields['vocab_size']} but the openpi checkpoint {where} embeds "
            f"{arch['vocab_size']} tokens: initialising from openpi needs shards made with PaliGemma's text tokenizer "
            f"(vocab_size {PALIGEMMA_VOCAB_SIZE}, skip_tokens 128)"
        )
    for key, value in fields.items():
        if key not in arch or value is None:
            continue
        resolve = {"backbone_variant": gemma_config, "expert_variant": gemma_config, "vision_variant": siglip_config}
        try:
            given = resolve[key](value) if key in resolve else value
        except ConfigError as e:
            raise CheckpointError(f"{key}: {e}") from e
        if given != arch[key]:
            raise CheckpointError(f"{key} = {value} but the openpi checkpoint {where} has {key} = {arch[key]}")
    try:
        return Pi05KIConfig(**{**fields, **arch})
    except ConfigError as e:
        raise CheckpointError(f"{where}: the checkpoint's sizes with the given fields make no valid model config: "
                              f"{e}") from e


def openpi_config(params_dir: str | os.PathLike, **fields: Any) -> Pi05KIConfig:
    """The model config of an openpi π0.5 checkpoint: its architecture (Gemma backbone and action expert, SigLIP,
    image size, action dimension, vocabulary) read from the stored array shapes (orbax metadata; no weight is read),
    everything else from `fields` (action_horizon, max_token_len, max_text_len, cameras, dtype, ...).

    A shape-decided field given in `fields` (vocab_size, image_size, action_dim, a variant) must agree with the
    checkpoint, else CheckpointError naming both values."""
    params_dir = _openpi_params_dir(params_dir)
    return _config_from_found(_scan_openpi(params_dir), params_dir, fields)


@dataclasses.dataclass(frozen=True)
class OpenpiMapping:
    """The checked correspondence between an openpi tree and a model config."""

    rules: tuple[_OpenpiRule, ...]
    num_arrays: int  # openpi arrays read (each exactly once)
    num_params: int  # our parameters written (each exactly once)


def map_openpi(shapes: dict[str, Shape], config: Pi05KIConfig, where: str = "openpi checkpoint") -> OpenpiMapping:
    """Check an openpi tree (name -> shape) against `config` on both sides: every stored array is used once with its
    expected shape, and every parameter of the model is written once. Raises CheckpointError naming the missing,
    unexpected and mis-shaped arrays."""
    rules = _openpi_rules(config)
    num_params = _check_openpi_rules_against_model(rules, config)
    expected = {r.name: r.shape for r in rules}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        parts = [f"missing arrays: {_listing(missing)}"] if missing else []
        parts += [f"unexpected arrays: {_listing(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{where} is not an openpi π0.5 checkpoint for this config: " + "; ".join(parts))
    wrong = [f"{n} {tuple(shapes[n])} (expected {s})" for n, s in expected.items() if tuple(shapes[n]) != s]
    if wrong:
        raise CheckpointError(f"{where}: arrays with the wrong shape: {_listing(wrong)}")
    return OpenpiMapping(tuple(rules), len(rules), num_params)


@dataclasses.dataclass(frozen=True)
class OpenpiLoadReport:
    path: str
    num_arrays: int  # openpi arrays read
    num_params: int  # our parameters written
    stored_dtypes: tuple[str, ...]  # converted to float32 on reading
    value_suffix: bool  # saved from a training state (every leaf under `value`)

    def summary(self) -> str:
        suffix = " (training-state tree)" if self.value_suffix else ""
        return (f"openpi {self.path}{suffix}: {self.num_arrays} arrays ({', '.join(self.stored_dtypes)}) -> "
                f"{self.num_params} parameters (the whole model)")


@dataclasses.dataclass(frozen=True)
class OpenpiCheckpoint:
    """A checked openpi π0.5 checkpoint: `tensors()` reads one stored array at a time; `apply_to`/`apply_to_params`
    write the whole model (vision, backbone, action expert) from it."""

    path: Path  # the orbax params directory
    config: Pi05KIConfig
    report: OpenpiLoadReport
    _arrays: dict[str, _StoredArray]
    _rules: tuple[_OpenpiRule, ...]

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def _read(self, name: str) -> np.ndarray:
        """One stored array, as stored (bfloat16 stays bfloat16 until it is cut into layers)."""
        import orbax.checkpoint as ocp

        a = self._arrays[name]
        item: Any = jax.ShapeDtypeStruct(a.shape, np.dtype(a.dtype))
        for key in reversed(a.key):
            item = {key: item}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        try:
            with ocp.PyTreeCheckpointer() as ckptr:
                out = ckptr.restore(self.path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                           partial_restore=True))
            for key in a.key:
                out = out[key]
        except Exception as e:  # noqa: BLE001 - tensorstore/orbax errors for truncated or missing data files
            raise CheckpointError(f"cannot read array {name} from {self.path} (truncated or damaged?): {e}") from e
        if tuple(out.shape) != a.shape:
            raise CheckpointError(f"{self.path}: array {name} read with shape {out.shape}, metadata says {a.shape}")
        return out

    def tensors(self, progress: bool = False) -> Iterator[tuple[ParamPath, Float[np.ndarray, "..."]]]:
        """(our parameter path, float32 numpy array) one at a time; a scanned array is read once and handed out
        layer by layer. Paths as in `nnx.to_flat_state(nnx.state(model, nnx.Param))`."""
        for rule in tqdm(self._rules, desc="openpi", unit="array", disable=not progress):
            stored = self._read(rule.name)
            for (target, shape), value in zip(rule.targets, rule.unpack(stored), strict=True):
                value = np.asarray(value, dtype=np.float32)
                if value.shape != shape:
                    raise CheckpointError(f"{rule.name} gives {value.shape} for {target}, expected {shape}")
                yield target, value
            del stored

    def apply_to(self, model: nnx.Module, progress: bool = False) -> OpenpiLoadReport:
        """Write every parameter of a `Pi05KI` in place. Names and shapes were checked when the checkpoint was
        opened; a data file that turns out unreadable part-way raises CheckpointError with the model part-written."""
        config = getattr(model, "config", None)
        if not isinstance(config, Pi05KIConfig) or _openpi_fields(config) != _openpi_fields(self.config):
            raise CheckpointError(
                f"the model's architecture {None if config is None else _openpi_fields(config)} differs from the one "
                f"this checkpoint was checked against {_openpi_fields(self.config)}"
            )
        variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        for target, value in self.tensors(progress):
            var = variables[target]
            old = var.get_value()
            var.set_value(jax.device_put(value.astype(old.dtype), old.sharding))
            del value, old
        logger.info(self.report.summary())
        return self.report

    def apply_to_params(self, params: dict, progress: bool = False) -> dict:
        """Replace the leaves of a `nnx.to_pure_dict` parameter tree IN PLACE; returns the same dict."""
        write_into_params(params, self.tensors(progress))
        logger.info(self.report.summary())
        return params

    def check_text_tokenizer(self, text_model: str | os.PathLike) -> None:
        """The shards' text tokenizer must have the checkpoint's vocabulary (PaliGemma's, for openpi's models)."""
        from ki_data import TextTokenizer

        try:
            tok = TextTokenizer.load(Path(text_model))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot check the text tokenizer against {self.path}: {e}") from e
        if tok.vocab_size != self.vocab_size:
            raise CheckpointError(
                f"text tokenizer {text_model} has {tok.vocab_size} pieces but the openpi checkpoint {self.path} embeds "
                f"{self.vocab_size}: preprocess with PaliGemma's tokenizer.model"
            )


def _openpi_fields(config: Pi05KIConfig) -> tuple:
    return (*_architecture(config), config.action_dim)


def load_openpi(params_dir: str | os.PathLike, config: Pi05KIConfig) -> OpenpiCheckpoint:
    """Open and check an openpi π0.5 checkpoint for `config` (orbax metadata only; no weight is read yet).

    `params_dir`: the checkpoint directory holding `params/`, or that `params/` directory. Accepts float32, bfloat16
    or float16 arrays and trees saved from a training state (a `value` key below every leaf). Raises CheckpointError
    naming what is wrong: no orbax tree / not an openpi π0.5 tree, missing, unexpected or mis-shaped arrays,
    arrays that are not floating point."""
    path = _openpi_params_dir(params_dir)
    found = _scan_openpi(path)
    mapping = map_openpi({n: a.shape for n, a in found.items()}, config, where=str(path))
    not_float = [f"{n} ({a.dtype})" for n, a in found.items() if a.dtype not in _OPENPI_FLOAT_DTYPES]
    if not_float:
        raise CheckpointError(f"{path}: arrays that are not floating point: {_listing(not_float)}")
    report = OpenpiLoadReport(
        path=str(path),
        num_arrays=mapping.num_arrays,
        num_params=mapping.num_params,
        stored_dtypes=tuple(sorted({a.dtype for a in found.values()})),
        value_suffix=any(len(a.key) == len(n.split("/")) + 2 for n, a in found.items()),  # params/<name>/value
    )
    return OpenpiCheckpoint(path, config, report, found, mapping.rules)


# ---------------------------------------------------------------------------------------------------------------
# `--init` of pipelines.train

INIT_KINDS = {INIT_PREFIX: "a Hugging Face PaliGemma directory", OPENPI_PREFIX: "an openpi checkpoint holding params/"}


def parse_init(spec: str) -> Path:
    """`paligemma:PATH` or `openpi:PATH` (the `--init` option of pipelines.train) -> PATH."""
    for prefix in INIT_KINDS:
        if spec.startswith(prefix) and len(spec) > len(prefix):
            return Path(spec[len(prefix) :])
    kinds = " or ".join(f"`{p}PATH` ({what})" for p, what in INIT_KINDS.items())
    raise CheckpointError(f"--init must be {kinds}, got {spec!r}")


def init_model_config(spec: str, config: Pi05KIConfig) -> Pi05KIConfig:
    """The model config a run with `--init spec` trains: `config` itself for PaliGemma (checked against it on
    loading); for openpi the checkpoint's architecture with `config`'s other fields, whose data-decided values
    (vocabulary, image size, action dimension) must agree with the checkpoint."""
    path = parse_init(spec)
    if not spec.startswith(OPENPI_PREFIX):
        return config
    # The checkpoint decides the architecture and its action dimension (32 for the released π0.5 checkpoints): a
    # dataset with fewer dimensions trains with zero-padded actions (docs/DESIGN.md §3).
    decided = ("backbone_variant", "expert_variant", "vision_variant", "action_dim")
    out = openpi_config(path, **{k: v for k, v in dataclasses.asdict(config).items() if k not in decided})
    if out.action_dim < config.action_dim:
        raise CheckpointError(f"{path}: the checkpoint's action_dim {out.action_dim} is smaller than the data's "
                              f"{config.action_dim}")
    return out


def load_init(spec: str, config: Pi05KIConfig) -> PaliGemmaCheckpoint | OpenpiCheckpoint:
    """The checked `--init` checkpoint for `config` (nothing read yet)."""
    path = parse_init(spec)
    return load_openpi(path, config) if spec.startswith(OPENPI_PREFIX) else load_paligemma(path, config)
