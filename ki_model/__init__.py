"""π0.5 with knowledge insulation in Flax NNX: Gemma multi-expert transformer, SigLIP, the model, FAST decoding.

The package namespace holds the model and inference; training (`ki_model.train`, optax, grain, orbax's manager) is
imported only by those who train.
"""

from ki_model.config import GEMMA_VARIANTS, PRESETS, SIGLIP_VARIANTS, ConfigError, GemmaConfig, Pi05KIConfig, SiglipConfig
from ki_model.decoding import FastDecodeResult, FastDecodeSpec, FastSpecError
from ki_model.observation import Observation, ObservationError
from ki_model.pi05_ki import (
    ACTION_EXPERT_MODULES,
    BACKBONE_MODULES,
    ObservationShapeError,
    Pi05KI,
    PrefixCache,
    param_group,
)
from ki_model.policy import Policy
from ki_model.sharding import FSDP_RULES, param_partition_specs, param_shardings

__all__ = [
    "ACTION_EXPERT_MODULES",
    "BACKBONE_MODULES",
    "FSDP_RULES",
    "GEMMA_VARIANTS",
    "PRESETS",
    "SIGLIP_VARIANTS",
    "ConfigError",
    "FastDecodeResult",
    "FastDecodeSpec",
    "FastSpecError",
    "GemmaConfig",
    "Observation",
    "ObservationError",
    "ObservationShapeError",
    "Pi05KI",
    "Pi05KIConfig",
    "Policy",
    "PrefixCache",
    "SiglipConfig",
    "param_group",
    "param_partition_specs",
    "param_shardings",
]
