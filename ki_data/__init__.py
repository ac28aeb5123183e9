"""ki_data: LeRobot datasets -> token shards (tokenizers, prompt building, normalization, shards).

Importing the package stays light (no lerobot, torch or PyAV): preprocessing lives in `ki_data.preprocess`.
"""

from ki_data.artifacts import DataArtifacts
from ki_data.fast_tokenizer import FastDecodeError, FastEncodeError, FastTokenizer
from ki_data.manifest import Manifest, ManifestError
from ki_data.normalize import NormStats, compute_stats, load_norm_stats, normalize, save_norm_stats, unnormalize
from ki_data.prompt import LAYOUTS, PromptBuilder, PromptTokens, PromptTooLongError
from ki_data.text_tokenizer import TextTokenizer

__all__ = [
    "LAYOUTS",
    "DataArtifacts",
    "FastDecodeError",
    "FastEncodeError",
    "FastTokenizer",
    "Manifest",
    "ManifestError",
    "NormStats",
    "PromptBuilder",
    "PromptTokens",
    "PromptTooLongError",
    "TextTokenizer",
    "compute_stats",
    "load_norm_stats",
    "normalize",
    "save_norm_stats",
    "unnormalize",
]
