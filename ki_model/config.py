"""Configurations: Gemma expert and SigLIP variants, and the π0.5-KI model config (JSON-serialisable)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flax import nnx

    from ki_model.pi05_ki import Pi05KI


class ConfigError(ValueError):
    """A model configuration that cannot work (unknown variant, experts that cannot share attention, ...)."""


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """One Gemma expert. Experts that attend jointly must agree on depth, num_heads, num_kv_heads and head_dim."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """A SigLIP ViT; the model adds a projection ("head") from `width` into the backbone width."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int


# PaliGemma / π0 numbers for the real sizes; the small and tiny ones are ours (report, tests, CPU demo).
GEMMA_VARIANTS: dict[str, GemmaConfig] = {
    "gemma_2b": GemmaConfig(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_300m": GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_small": GemmaConfig(width=256, depth=4, mlp_dim=1024, num_heads=4, num_kv_heads=1, head_dim=64),
    "gemma_small_expert": GemmaConfig(width=128, depth=4, mlp_dim=512, num_heads=4, num_kv_heads=1, head_dim=64),
    "gemma_tiny": GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=2, num_kv_heads=1, head_dim=32),
    "gemma_tiny_expert": GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=32),
    # The CPU demo: tiny widths with 8 heads, so the first layer can read each state number at its own position.
    "gemma_demo": GemmaConfig(width=64, depth=2, mlp_dim=256, num_heads=8, num_kv_heads=1, head_dim=16),
    "gemma_demo_expert": GemmaConfig(width=64, depth=2, mlp_dim=256, num_heads=8, num_kv_heads=1, head_dim=16),
}

SIGLIP_VARIANTS: dict[str, SiglipConfig] = {
    "so400m/14": SiglipConfig(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14),
    "siglip_small": SiglipConfig(width=256, depth=4, mlp_dim=1024, num_heads=4, patch_size=16),
    "siglip_tiny": SiglipConfig(width=64, depth=2, mlp_dim=128, num_heads=2, patch_size=16),
    "siglip_tiny_p8": SiglipConfig(width=64, depth=2, mlp_dim=128, num_heads=2, patch_size=8),
}

DTYPES = ("float32", "bfloat16")
FLOW_TARGETS = ("velocity", "clean")

# Per-layer rematerialisation of a scanned layer stack (ki_model.nn.remat_layer): what the backward pass may keep of
# a layer's forward. "none": everything (no remat); "nothing_saveable": only the layer inputs (the least memory);
# "dots": also the weight matmuls' outputs (not the attention logits), less recomputation.
REMAT_POLICIES = ("none", "nothing_saveable", "dots")

# Fields that decide where a step computes, not what it learns (fast_target_slots: which positions get FAST logits):
# a run resumes, or starts from a checkpoint, whatever their saved values.
COMPUTE_ONLY_FIELDS = ("fast_target_slots",)


# LoRA (ki_model.lora): the parts that can get it and openpi's ranks (π0 LoRA: rank 16 on the 2B backbone, 32 on
# the 300M expert).
LORA_PARTS = ("backbone", "expert")
DEFAULT_LORA_RANKS = {"backbone": 16, "expert": 32}


def parse_lora(spec: Any) -> tuple[tuple[str, int], ...]:
    """`"backbone=16,expert=32"`, `"backbone,expert"` (openpi's ranks), a dict or (part, rank) pairs -> sorted
    (part, rank) pairs; "" / () / None: no LoRA."""
    if not spec:
        return ()
    if isinstance(spec, str):
        pairs = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            part, _, rank = item.partition("=")
            try:
                pairs.append((part, int(rank) if rank else DEFAULT_LORA_RANKS.get(part, 0)))
            except ValueError:
                raise ConfigError(f"lora: the rank of {part!r} must be an integer, got {rank!r}") from None
    else:
        pairs = list(spec.items()) if isinstance(spec, dict) else [tuple(p) for p in spec]
    out: dict[str, int] = {}
    for part, rank in pairs:
        if part not in LORA_PARTS:
            raise ConfigError(f"lora: unknown part {part!r}; parts: {list(LORA_PARTS)}")
        if int(rank) <= 0:
            raise ConfigError(f"lora: the rank of {part!r} must be positive, got {rank}")
        out[part] = int(rank)
    return tuple(sorted(out.items()))


def remat_policy_name(value: bool | str) -> str:
    """A `remat` config value as a policy name; the boolean of configs written before the policies: True is
    "nothing_saveable" (what it did), False "none"."""
    if isinstance(value, bool):
        return "nothing_saveable" if value else "none"
    if value not in REMAT_POLICIES:
        raise ConfigError(f"remat must be one of {REMAT_POLICIES} (or a boolean), got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + linear warm-up and cosine decay + per-side global-norm clipping (`ki_model.optimizer`); the defaults
    are openpi's. Plain numbers, so that a preset can name its schedule without importing optax."""

    #: learning rate at the end of the warm-up
    peak_lr: float = 2.5e-5
    #: linear warm-up steps (from peak_lr / (warmup_steps + 1))
    warmup_steps: int = 1_000
    #: cosine decay length in steps, warm-up included (None: the run's whole length, --steps)
    decay_steps: int | None = 30_000
    #: learning rate at the end of the decay
    decay_lr: float = 2.5e-6
    b1: float = 0.9  # Adam's first moment decay
    b2: float = 0.95  # Adam's second moment decay
    eps: float = 1e-8  # Adam's epsilon
    weight_decay: float = 1e-10  # AdamW's decoupled weight decay
    clip_norm: float = 1.0  # global gradient-norm clip, per side of the insulation cut


# Architectures by name: `Pi05KIConfig.preset(name, **fields)`, `pipelines.train --config NAME`; each preset's
# optimizer is in PRESET_OPTIMIZERS, just below.
PRESETS: dict[str, dict[str, Any]] = {
    # Tests (32-pixel images): a few hundred thousand parameters.
    "tiny": dict(max_token_len=64, max_text_len=32, image_size=32, backbone_variant="gemma_tiny",
                 expert_variant="gemma_tiny_expert", vision_variant="siglip_tiny", dtype="float32"),
    # The CPU demo (scripts/demo.sh): tiny, with 8 attention heads and 8-pixel patches.
    "demo": dict(max_token_len=64, max_text_len=40, image_size=32, backbone_variant="gemma_demo",
                 expert_variant="gemma_demo_expert", vision_variant="siglip_tiny_p8", dtype="float32",
                 action_positions=True),
    # Small but real: width 256, depth 4, 224-pixel images (reports and benchmarks on a CPU).
    "small": dict(max_token_len=96, max_text_len=48, image_size=224, backbone_variant="gemma_small",
                  expert_variant="gemma_small_expert", vision_variant="siglip_small", dtype="float32"),
    # π0.5: PaliGemma (Gemma 2B + SigLIP So400m/14 at 224) and a Gemma-300M action expert.
    "pi05": dict(backbone_variant="gemma_2b", expert_variant="gemma_300m", vision_variant="so400m/14",
                 dtype="bfloat16"),
}

# openpi's schedule barely moves a from-scratch tiny model in a few minutes; the CPU presets run a faster one (on the
# pusht demo, 3e-3 starts reading the state tokens within ~600 steps, 1e-3 not within 1000).
_CPU_SCHEDULE = OptimizerConfig(peak_lr=3e-3, warmup_steps=100, decay_steps=1_500, decay_lr=3e-4)

# The optimizer a run of each preset gets unless it names its own (`pipelines.train --peak-lr ...`, a recipe).
PRESET_OPTIMIZERS: dict[str, OptimizerConfig] = {
    "tiny": _CPU_SCHEDULE,
    "demo": _CPU_SCHEDULE,
    "small": OptimizerConfig(),
    "pi05": OptimizerConfig(),
}


def preset_optimizer(name: str) -> OptimizerConfig:
    if name not in PRESET_OPTIMIZERS:
        raise ConfigError(f"unknown config preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESET_OPTIMIZERS[name]


def gemma_config(variant: str | GemmaConfig) -> GemmaConfig:
    """A named variant's sizes, or the explicit sizes themselves."""
    if isinstance(variant, GemmaConfig):
        return variant
    if variant not in GEMMA_VARIANTS:
        raise ConfigError(f"unknown Gemma variant {variant!r}; known: {sorted(GEMMA_VARIANTS)}")
    return GEMMA_VARIANTS[variant]


def siglip_config(variant: str | SiglipConfig) -> SiglipConfig:
    """A named variant's sizes, or the explicit sizes themselves."""
    if isinstance(variant, SiglipConfig):
        return variant
    if variant not in SIGLIP_VARIANTS:
        raise ConfigError(f"unknown SigLIP variant {variant!r}; known: {sorted(SIGLIP_VARIANTS)}")
    return SIGLIP_VARIANTS[variant]


def _variant(value: Any, cls: type, field: str) -> Any:
    """A variant name as it is, explicit sizes as `cls` (from a dict when read from JSON)."""
    if isinstance(value, (str, cls)):
        return value
    if isinstance(value, dict):
        names = [f.name for f in dataclasses.fields(cls)]
        if sorted(value) != sorted(names):
            raise ConfigError(f"{field}: explicit sizes need exactly the fields {names}, got {sorted(value)}")
        return cls(**value)
    raise ConfigError(f"{field} must be a variant name or {cls.__name__} sizes, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Pi05KIConfig:
    """Everything needed to build a `Pi05KI`; `to_dict`/`from_dict` round-trip through JSON for checkpoints."""

    action_horizon: int = 50
    action_dim: int = 32
    vocab_size: int = 257152
    max_token_len: int = 256
    max_text_len: int = 128
    image_size: int = 224
    # Camera order of the image tokens; empty = the observation's cameras in sorted order.
    cameras: Sequence[str] = ()  # a tuple after __post_init__ (JSON gives a list)
    # λ of total = μ·flow + λ·FAST; λ = 0: flow-only training (FAST tokens not fed, no FAST loss).
    fast_loss_weight: float = 1.0
    # μ; 0 = FAST-only training (the action expert does not run: a π0-FAST-style policy, the KI recipe's first
    # stage, whose backbone a later `--init ki-backbone:DIR` run starts from).
    flow_loss_weight: float = 1.0
    # Knowledge insulation: the action expert reads the backbone's keys/values through stop_gradient. False = π0/π0.5
    # training without KI (the flow gradient reaches the backbone); an ablation switch.
    insulation: bool = True
    # (noise, time) draws per example in one training pass, each its own action block reading the same prefix.
    flow_samples: int = 1
    num_flow_steps: int = 10
    # Positions per row at which the FAST cross-entropy computes logits: at least the most FAST targets of any row
    # (pipelines.train takes it from the shards' manifest and checks every batch against it); None: all of them.
    fast_target_slots: int | None = None
    # What the action expert's output is: "velocity" (π0, π0.5 and openpi's checkpoints: noise - actions) or
    # "clean" (the clean chunk itself; its velocity for sampling is (x_t - chunk) / t, the same flow). With "clean"
    # the flow loss is the chunk's squared error, which a small model learns from far fewer rows
    # (docs/demo_random_start.md).
    flow_target: str = "velocity"
    # A learned embedding per chunk step added to the action tokens. Not in π0.5 (openpi's checkpoints have none):
    # there an action token knows its step only through RoPE, and a fresh expert gives every step of a chunk the same
    # output until its attention has learned to read it, which a model as small as the CPU demo's does slowly
    # (docs/demo_random_start.md: 1.02 -> 0.55 x hold still's error with the rows).
    action_positions: bool = False
    # A variant is a name from GEMMA_VARIANTS / SIGLIP_VARIANTS or explicit sizes (e.g. read from an openpi
    # checkpoint); explicit sizes are written as a dict by to_dict and read back by from_dict.
    backbone_variant: str | GemmaConfig | dict[str, int] = "gemma_2b"  # a GemmaConfig after __post_init__
    expert_variant: str | GemmaConfig | dict[str, int] = "gemma_300m"
    vision_variant: str | SiglipConfig | dict[str, int] = "so400m/14"
    # Compute dtype; parameters are always float32.
    dtype: str = "bfloat16"
    # Per-layer rematerialisation of the scanned layer stacks (backbone+expert and SigLIP) in the backward pass:
    # "none", "nothing_saveable" (keep only each layer's input) or "dots" (also the weight matmuls' outputs).
    # A boolean (configs written before the policies) reads as True -> "nothing_saveable", False -> "none".
    remat: bool | str = "none"
    # Training runs each layer (Gemma and SigLIP) on this many strided chunks of the batch in turn (the largest
    # divisor of the batch not above it): with remat, the backward pass holds one chunk's layer activations at a
    # time; the result is the same (rows never interact inside a layer). 1 = the whole batch at once.
    layer_chunks: int = 1
    # LoRA on the attention/MLP weights of these parts, ((part, rank), ...) with part "backbone" or "expert"
    # (ki_model.lora; also given as "backbone=16,expert=32"); a part with LoRA has its other weights frozen.
    lora: Sequence[Sequence[str | int]] | str = ()  # ((part, rank), ...) after __post_init__

    def __post_init__(self) -> None:
        object.__setattr__(self, "cameras", tuple(self.cameras))
        object.__setattr__(self, "remat", remat_policy_name(self.remat))
        object.__setattr__(self, "lora", parse_lora(self.lora))
        for name, cls in (("backbone_variant", GemmaConfig), ("expert_variant", GemmaConfig),
                          ("vision_variant", SiglipConfig)):
            object.__setattr__(self, name, _variant(getattr(self, name), cls, name))
        backbone, expert = gemma_config(self.backbone_variant), gemma_config(self.expert_variant)
        shared = ("depth", "num_heads", "num_kv_heads", "head_dim")
        differ = [f for f in shared if getattr(backbone, f) != getattr(expert, f)]
        if differ:
            raise ConfigError(
                f"backbone {self.backbone_variant!r} and action expert {self.expert_variant!r} must share "
                f"{', '.join(shared)} for joint attention; they differ in {differ}"
            )
        for cfg, name in ((backbone, self.backbone_variant), (expert, self.expert_variant)):
            if cfg.num_heads % cfg.num_kv_heads:
                raise ConfigError(f"{name}: num_heads {cfg.num_heads} not divisible by num_kv_heads {cfg.num_kv_heads}")
        vision = siglip_config(self.vision_variant)
        if self.image_size % vision.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of the patch size {vision.patch_size}")
        if self.flow_target not in FLOW_TARGETS:
            raise ConfigError(f"flow_target must be one of {FLOW_TARGETS}, got {self.flow_target!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_text_len > self.max_token_len:
            raise ConfigError(f"max_text_len {self.max_text_len} > max_token_len {self.max_token_len}")
        for name in ("fast_loss_weight", "flow_loss_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.fast_loss_weight == 0 and self.flow_loss_weight == 0:
            raise ConfigError("fast_loss_weight and flow_loss_weight are both 0: nothing to train")
        if self.fast_target_slots is not None and self.fast_target_slots <= 0:
            raise ConfigError(f"fast_target_slots must be positive or None, got {self.fast_target_slots}")
        for name in ("action_horizon", "action_dim", "vocab_size", "max_token_len", "max_text_len", "num_flow_steps",
                     "flow_samples", "layer_chunks"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def backbone(self) -> GemmaConfig:
        return gemma_config(self.backbone_variant)

    @property
    def expert(self) -> GemmaConfig:
        return gemma_config(self.expert_variant)

    @property
    def vision(self) -> SiglipConfig:
        return siglip_config(self.vision_variant)

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.vision.patch_size) ** 2

    @classmethod
    def preset(cls, name: str, **fields: Any) -> Pi05KIConfig:
        """A preset's architecture (`PRESETS`) with the given fields (the data-dependent ones come from the shards'
        manifest: `Manifest.model_fields()`)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown config preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **fields})

    @classmethod
    def tiny(cls, **fields: Any) -> Pi05KIConfig:
        return cls.preset("tiny", **fields)

    @classmethod
    def small(cls, **fields: Any) -> Pi05KIConfig:
        return cls.preset("small", **fields)

    @classmethod
    def pi05(cls, **fields: Any) -> Pi05KIConfig:
        return cls.preset("pi05", **fields)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cameras"] = list(self.cameras)
        d["lora"] = [list(p) for p in self.lora]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pi05KIConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown Pi05KIConfig fields {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Pi05KIConfig:
        return cls.from_dict(json.loads(text))

    def create(self, rngs: nnx.Rngs) -> Pi05KI:
        from ki_model.pi05_ki import Pi05KI

        return Pi05KI(self, rngs=rngs)
