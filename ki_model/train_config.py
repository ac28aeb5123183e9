"""What a training run is: `TrainConfig`, every option of `ki_model.train.train` with its one default and help text.

`pipelines.train`'s command line is derived from these dataclasses (tyro: a field `flow_samples` is `--flow-samples`,
its docstring the help), and named recipes (`ki_model.recipes`) are instances of them, so a default, a flag and a
recipe never disagree. The `Annotated` markers only shape that command line (flag names, on/off values, one flat
namespace); they change nothing for code that builds a `TrainConfig` directly.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

import tyro

from ki_data.manifest import MODEL_FIELDS
from ki_model.config import (
    DTYPES,
    FLOW_TARGETS,
    PRESETS,
    REMAT_POLICIES,
    SIGLIP_VARIANTS,
    OptimizerConfig,
    preset_optimizer,
)

# Choices as types, so that the command line lists and checks them (Literal of the tables' own names).
Preset = Literal[tuple(PRESETS)]  # type: ignore[valid-type]
VisionVariant = Literal[tuple(sorted(SIGLIP_VARIANTS))]  # type: ignore[valid-type]
Dtype = Literal[DTYPES]  # type: ignore[valid-type]
FlowTarget = Literal[FLOW_TARGETS]  # type: ignore[valid-type]
RematPolicy = Literal[REMAT_POLICIES]  # type: ignore[valid-type]

# `--insulation on|off` (a flag pair would read `--no-insulation`, which the README and scripts never used).
OnOff = Annotated[
    bool,
    tyro.constructors.PrimitiveConstructorSpec(
        nargs=1, metavar="{on,off}", choices=("on", "off"), instance_from_str=lambda args: args[0] == "on",
        is_instance=lambda x: isinstance(x, bool), str_from_instance=lambda b: ["on" if b else "off"],
    ),
    tyro.conf.FlagConversionOff,
]
# Nested options share the top-level namespace: `--layer-chunks`, not `--model.layer-chunks`.
Flat = tyro.conf.OmitArgPrefixes


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The model-config fields a run sets on top of its preset (recorded in the checkpoint's model_config.json)."""

    #: off: the flow gradient reaches the backbone and vision encoder (π0/π0.5 without KI; docs/DESIGN.md §5)
    insulation: OnOff = True
    #: λ in μ·flow + λ·FAST; 0 = flow only (FAST tokens not fed, no FAST loss)
    fast_loss_weight: float = 1.0
    #: μ in μ·flow + λ·FAST; 0 = FAST only, the action expert does not run (the KI recipe's stage 1: a π0-FAST-style
    #: backbone for a later --init ki-backbone:DIR)
    flow_loss_weight: float = 1.0
    #: (noise, time) draws per example in one pass: K action blocks share the backbone
    flow_samples: Annotated[int, tyro.conf.arg(metavar="K")] = 1
    #: the action expert's output: the flow velocity (π0, openpi's checkpoints) or the clean chunk
    flow_target: FlowTarget = "velocity"
    #: a learned embedding per chunk step on the action tokens (default: the preset's; the demo's has it, π0.5 not)
    action_positions: OnOff | None = None
    #: the vision encoder instead of the preset's (from scratch, e.g. siglip_tiny_p8: 8-px patches)
    vision_variant: VisionVariant | None = None
    #: compute dtype (weights stay float32): bfloat16 = mixed precision (default: the preset's)
    dtype: Dtype | None = None
    #: rematerialise layers in the backward pass (less memory; the nothing_saveable policy)
    remat: bool = False
    #: per-layer remat policy (overrides --remat)
    remat_policy: RematPolicy | None = None
    #: run each layer on N chunks of the batch in turn: with --remat, the backward pass holds one chunk's layer
    #: activations (same result; the memory of a full π0.5 fine-tune at batch 32)
    layer_chunks: Annotated[int, tyro.conf.arg(metavar="N")] = 1
    #: LoRA fine-tuning: e.g. backbone=16,expert=32 (openpi's ranks: backbone,expert); the other weights of those
    #: parts are frozen in bfloat16
    lora: Annotated[str, tyro.conf.arg(metavar="PART=RANK,...")] = ""

    def fields(self) -> dict[str, Any]:
        """Keyword arguments of `Pi05KIConfig.preset`: unset options (None, "") keep the preset's value."""
        out: dict[str, Any] = {
            "remat": self.remat_policy or self.remat, "layer_chunks": self.layer_chunks,
            "flow_samples": self.flow_samples, "flow_target": self.flow_target, "insulation": self.insulation,
            "fast_loss_weight": self.fast_loss_weight, "flow_loss_weight": self.flow_loss_weight,
        }
        optional = {"vision_variant": self.vision_variant, "dtype": self.dtype, "lora": self.lora,
                    "action_positions": self.action_positions}
        return out | {k: v for k, v in optional.items() if v is not None and v != ""}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run (`ki_model.train.train`); `pipelines.train` flags are these fields in kebab case."""

    #: pipelines.preprocess output directory (has manifest.json)
    shards: str
    #: where checkpoints, metrics.jsonl and the run's configs go
    checkpoint_dir: str
    #: architecture preset (ki_model/config.py PRESETS; with its optimizer, PRESET_OPTIMIZERS)
    config: Preset = "tiny"
    #: train until this many optimizer steps in total
    steps: int = 1_000
    #: global batch size
    batch_size: int = 32
    #: initialisation, data order and the flow draws
    seed: int = 0
    #: continue from the latest checkpoint in --checkpoint-dir
    resume: bool = False
    #: delete a non-empty --checkpoint-dir and start over
    overwrite: bool = False
    #: paligemma:PATH starts the vision encoder and backbone from a Hugging Face PaliGemma directory; openpi:PATH the
    #: whole model, architecture included, from an openpi π0.5 checkpoint (the directory holding params/); the shards
    #: must use the checkpoint's text tokenizer (PaliGemma's). ki:DIR every weight of one of our training checkpoints;
    #: ki-backbone:DIR its vision encoder and backbone with a fresh action expert (same data and architecture). Not
    #: applied on resume.
    init: Annotated[str | None, tyro.conf.arg(metavar="{paligemma,openpi,ki,ki-backbone}:PATH")] = None

    model: Annotated[ModelOptions, Flat] = dataclasses.field(default_factory=ModelOptions)
    #: None: the preset's (PRESET_OPTIMIZERS)
    optimizer: Annotated[OptimizerConfig | None, Flat] = None
    #: keep an EMA of the weights (openpi: 0.999)
    ema_decay: float | None = None
    #: average the gradients of N micro-batches of each batch (the memory of batch/N, the update of the batch)
    grad_accum: Annotated[int, tyro.conf.arg(metavar="N")] = 1
    #: from scratch only: start the embeddings of number tokens (the state bins) from a code of their value (a
    #: pretrained backbone knows its numbers)
    number_embeddings: bool = False

    #: average the training figures over N steps and log them (metrics.jsonl, the terminal, W&B)
    log_every: int = 10
    #: save a checkpoint every N steps (None: at the end only); the last step is always saved
    save_every: int | None = 500
    #: checkpoints kept (the latest N)
    keep_checkpoints: int = 2
    #: score a few fixed validation batches every N steps into metrics.jsonl (a multiple of --log-every; 0: never)
    eval_every: int = 0
    #: validation batches scored by --eval-every
    eval_batches: int = 2
    #: also log the run (config, losses, validation figures, plots it makes) to this Weights & Biases project;
    #: offline (under --checkpoint-dir/wandb, for `wandb sync`) when there is no network or WANDB_MODE=offline
    wandb: Annotated[str | None, tyro.conf.arg(metavar="PROJECT")] = None
    #: progress bars (off: plain log lines)
    progress: bool = True

    #: grain loader worker processes (0: in-process)
    num_workers: Annotated[int, tyro.conf.arg(name="workers")] = 2
    #: rows shuffled together
    shuffle_buffer: int = 2048
    #: image augmentation (--no-augment: none)
    augment: bool = True
    #: first check every shard's size and sha256 against manifest.json (reads all the shards; ki_data.verify)
    verify: bool = False
    #: devices each parameter is sharded over
    fsdp_devices: int = 1
    #: CPU: compile the train step without XLA backend optimisation (~3x faster compile, ~2x slower steps)
    fast_compile: bool = False

    # Data-dependent values come from the shards' manifest; given explicitly, they must agree with it.
    action_horizon: int | None = None  # must agree with the shards' manifest
    action_dim: int | None = None  # must agree with the shards' manifest
    max_token_len: int | None = None  # must agree with the shards' manifest
    max_text_len: int | None = None  # must agree with the shards' manifest
    image_size: int | None = None  # must agree with the shards' manifest
    vocab_size: int | None = None  # must agree with the shards' manifest

    def explicit(self) -> dict[str, Any]:
        """The data-dependent values given explicitly (None: not given), to check against the manifest."""
        return {k: getattr(self, k) for k in MODEL_FIELDS if k != "cameras" and hasattr(self, k)}

    def resolved(self) -> TrainConfig:
        """The values that follow others filled in: the preset's optimizer when none is named, and the run's length
        for a decay over the whole run (decay_steps None) and for a save at the end only (save_every None)."""
        optimizer = self.optimizer or preset_optimizer(self.config)
        if optimizer.decay_steps is None:
            optimizer = dataclasses.replace(optimizer, decay_steps=self.steps)
        return dataclasses.replace(self, optimizer=optimizer, save_every=self.save_every or self.steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
