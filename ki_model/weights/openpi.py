"""Pretrained weights from an openpi π0.5 checkpoint (`params/`, an orbax tree): `openpi_config(path, **data_fields)`
reads the architecture from the stored shapes, `load_openpi(path, config)` checks every name and shape (metadata
only) and returns a checkpoint with the same `apply_to` / `apply_to_params` as PaliGemma's; it fills the whole model
(vision encoder, backbone, action expert)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
from jaxtyping import Float
from tqdm import tqdm

from ki_data.prompt import PALIGEMMA_SKIP_TOKENS, PALIGEMMA_VOCAB_SIZE
from ki_model.checkpoint import CheckpointError
from ki_model.config import (
    ConfigError,
    GemmaConfig,
    Pi05KIConfig,
    SiglipConfig,
    gemma_config,
    siglip_config,
)
from ki_model.weights.common import (
    ParamPath,
    PretrainedCheckpoint,
    architecture,
    listing,
    model_param_shapes,
)
from ki_model.lora import is_lora_param

# openpi π0.5 checkpoints: an orbax PyTree `params/` directory holding {"params": P}
#
# P is openpi's nnx pure dict: `PaliGemma/img` (SigLIP, layers scanned under `Transformer/encoderblock`),
# `PaliGemma/llm` (both Gemma experts, layers scanned under `layers`; the action expert's arrays carry the suffix
# `_1`, its adaRMS modulation is `<norm>_1/Dense_0`), and the action expert's projections and time MLP at the top.
# Every array has our layout already (openpi's Gemma and SigLIP are big_vision's, as ours, scanned layers stacked on
# a leading depth axis as ours): loading maps arrays 1:1, splits a fused `qkv_einsum` along its second axis and
# drops the leading 1 of `pos_embedding`. Both experts share the `layers` arrays' depth.

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
    """One stored openpi array -> our parameters (one, or two for a fused Q/K/V array)."""

    name: str  # openpi's path below `params`, e.g. "PaliGemma/llm/layers/attn/q_einsum/w"
    shape: Shape  # its expected stored shape
    targets: tuple[tuple[ParamPath, Shape], ...]  # our parameters and their shapes, in the order `unpack` yields
    unpack: Callable[[np.ndarray], Iterator[np.ndarray]]


def _whole(name: str, shape: Shape, target: ParamPath) -> _OpenpiRule:
    return _OpenpiRule(name, shape, ((target, shape),), lambda x: iter((x,)))


def _scanned(name: str, depth: int, shape: Shape, target: ParamPath) -> _OpenpiRule:
    """A scanned array [depth, ...] onto our stacked layer parameter of the same layout."""
    return _whole(name, (depth, *shape), target)


def _openpi_gemma_rules(cfg: GemmaConfig, expert: int, ours: str, cond_dim: int | None, vocab: int) -> list[_OpenpiRule]:
    n, k, d, h, f, depth = cfg.num_heads, cfg.num_kv_heads, cfg.width, cfg.head_dim, cfg.mlp_dim, cfg.depth
    sfx = f"_{expert}" if expert else ""
    layers = _LLM + "layers/"

    def layer(*rest: str) -> ParamPath:
        return (ours, "layers", *rest)

    if n == k:  # openpi fuses Q, K and V into one array when every head has its own K/V
        qkv = _OpenpiRule(
            f"{layers}attn/qkv_einsum{sfx}/w",
            (depth, 3, n, d, h),
            ((layer("attn", "q_einsum"), (depth, n, d, h)), (layer("attn", "kv_einsum"), (depth, 2, k, d, h))),
            lambda x: iter((x[:, 0], x[:, 1:])),
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

    def block(*rest: str) -> ParamPath:
        return ("vision", "blocks", *rest)

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
    shapes = model_param_shapes(config)
    targets = [t for r in rules for t in r.targets]
    problems = [f"{p} does not exist in the model" for p, _ in targets if p not in shapes]
    problems += [f"{p}: model {shapes[p]}, converted {s}" for p, s in targets if p in shapes and shapes[p] != s]
    written = [p for p, _ in targets]
    problems += [f"{p} is written twice" for p in sorted(set(written), key=written.index) if written.count(p) > 1]
    # LoRA factors (a LoRA fine-tune) keep their initialisation: B = 0, so the model starts as the checkpoint's.
    problems += [f"{p} has no checkpoint array" for p in shapes if p not in set(written) and not is_lora_param(p)]
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
    except Exception as e:
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
    # openpi's action tokens have no step embedding (Pi05KIConfig.action_positions).
    arch = {**_openpi_architecture(found, where), "action_positions": False}
    if fields.get("vocab_size") not in (None, arch["vocab_size"]):  # the likeliest mismatch: say it first
        raise CheckpointError(
            f"the model's vocab_size is {fields['vocab_size']} but the openpi checkpoint {where} embeds "
            f"{arch['vocab_size']} tokens: initialising from openpi needs shards made with PaliGemma's text tokenizer "
            f"(vocab_size {PALIGEMMA_VOCAB_SIZE}, skip_tokens {PALIGEMMA_SKIP_TOKENS})"
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
        parts = [f"missing arrays: {listing(missing)}"] if missing else []
        parts += [f"unexpected arrays: {listing(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{where} is not an openpi π0.5 checkpoint for this config: " + "; ".join(parts))
    wrong = [f"{n} {tuple(shapes[n])} (expected {s})" for n, s in expected.items() if tuple(shapes[n]) != s]
    if wrong:
        raise CheckpointError(f"{where}: arrays with the wrong shape: {listing(wrong)}")
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
class OpenpiCheckpoint(PretrainedCheckpoint):
    """A checked openpi π0.5 checkpoint: `tensors()` reads one stored array at a time; `apply_to`/`apply_to_params`
    write the whole model (vision, backbone, action expert) from it. Names and shapes were checked when the
    checkpoint was opened; a data file that turns out unreadable part-way raises CheckpointError with the model
    part-written."""

    KIND: ClassVar[str] = "openpi"

    path: Path  # the orbax params directory
    config: Pi05KIConfig
    report: OpenpiLoadReport
    _arrays: dict[str, _StoredArray]
    _rules: tuple[_OpenpiRule, ...]

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
        except Exception as e:
            raise CheckpointError(f"cannot read array {name} from {self.path} (truncated or damaged?): {e}") from e
        if tuple(out.shape) != a.shape:
            raise CheckpointError(f"{self.path}: array {name} read with shape {out.shape}, metadata says {a.shape}")
        return out

    def tensors(self, progress: bool = False) -> Iterator[tuple[ParamPath, Float[np.ndarray, ...]]]:
        """(our parameter path, float32 numpy array) one at a time (a scanned array whole, all its layers). Paths as
        in `nnx.to_flat_state(nnx.state(model, nnx.Param))`."""
        for rule in tqdm(self._rules, desc="openpi", unit="array", disable=not progress):
            stored = self._read(rule.name)
            for (target, shape), value in zip(rule.targets, rule.unpack(stored), strict=True):
                value = np.asarray(value, dtype=np.float32)
                if value.shape != shape:
                    raise CheckpointError(f"{rule.name} gives {value.shape} for {target}, expected {shape}")
                yield target, value
            del stored

    def architecture_fields(self, config: Pi05KIConfig) -> tuple:
        return (*architecture(config), config.action_dim)  # the whole model: the action projections too


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
        raise CheckpointError(f"{path}: arrays that are not floating point: {listing(not_float)}")
    report = OpenpiLoadReport(
        path=str(path),
        num_arrays=mapping.num_arrays,
        num_params=mapping.num_params,
        stored_dtypes=tuple(sorted({a.dtype for a in found.values()})),
        value_suffix=any(len(a.key) == len(n.split("/")) + 2 for n, a in found.items()),  # params/<name>/value
    )
    return OpenpiCheckpoint(path, config, report, found, mapping.rules)


