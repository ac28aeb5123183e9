"""Pretrained weights into the π0.5-KI model: a Hugging Face PaliGemma directory (`paligemma.py`), or an openpi π0.5
checkpoint (`openpi.py`). Both check every name, shape and architecture field before any weight is written, so a
wrong checkpoint fails with `CheckpointError` and leaves the model untouched. Both are `PretrainedCheckpoint`s
(`common.py`): one writer, which first checks that the model (or parameter tree) has the architecture the checkpoint
was checked against, then writes one tensor at a time:

    ckpt = load_paligemma(path, config)     # or load_openpi(path, config): reads metadata only, checks everything
    ckpt.apply_to(model)                    # nnx model, in place
    ckpt.apply_to_params(params)            # nnx.to_pure_dict params

This module also reads the `--init paligemma:PATH | openpi:PATH` option of pipelines.train.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ki_data.prompt import PALIGEMMA_VOCAB_SIZE
from ki_model.checkpoint import CheckpointError
from ki_model.config import Pi05KIConfig
from ki_model.weights.common import PretrainedCheckpoint
from ki_model.weights.openpi import (
    OPENPI_PREFIX,
    OpenpiCheckpoint,
    OpenpiLoadReport,
    OpenpiMapping,
    load_openpi,
    map_openpi,
    openpi_config,
    openpi_config_from_shapes,
    openpi_shapes,
)
from ki_model.weights.paligemma import (
    EXPERT_INITS,
    INIT_PREFIX,
    LoadReport,
    PaliGemmaCheckpoint,
    canonical_name,
    init_from_paligemma,
    load_paligemma,
)

__all__ = [
    "EXPERT_INITS",
    "INIT_PREFIX",
    "OPENPI_PREFIX",
    "PALIGEMMA_VOCAB_SIZE",
    "CheckpointError",
    "LoadReport",
    "OpenpiCheckpoint",
    "OpenpiLoadReport",
    "OpenpiMapping",
    "PaliGemmaCheckpoint",
    "PretrainedCheckpoint",
    "canonical_name",
    "init_from_paligemma",
    "init_model_config",
    "load_init",
    "load_openpi",
    "load_paligemma",
    "map_openpi",
    "openpi_config",
    "openpi_config_from_shapes",
    "openpi_shapes",
    "parse_init",
]

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


def load_init(spec: str, config: Pi05KIConfig) -> PretrainedCheckpoint:
    """The checked `--init` checkpoint for `config` (nothing read yet)."""
    path = parse_init(spec)
    return load_openpi(path, config) if spec.startswith(OPENPI_PREFIX) else load_paligemma(path, config)

