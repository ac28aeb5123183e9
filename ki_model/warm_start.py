"""`--init ki:DIR` / `--init ki-backbone:DIR`: a new training run that starts from one of our own checkpoints.

The KI recipe (docs/DESIGN.md §5): stage 1 trains the vision encoder and backbone on FAST tokens alone
(`--flow-loss-weight 0`, a π0-FAST-style policy); stage 2 starts from it (`ki-backbone:`: vision and backbone copied,
a freshly initialised action expert) and trains with insulation on, so the expert learns the flow while the backbone
keeps learning only from FAST cross-entropy. `ki:` copies every weight (the expert too), e.g. to fine-tune further.

The checkpoint must have read the same data (ki_model.checkpoint.check_same_data) and have the same architecture;
loss weights, insulation, flow samples and rematerialisation may differ (they change training, not the weights).
Nothing is written before every check has passed, and then one tensor at a time, each keeping its sharding.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from ki_model import checkpoint as ckpt
from ki_model.checkpoint import CheckpointError
from ki_model.config import COMPUTE_ONLY_FIELDS, Pi05KIConfig
from ki_model.pi05_ki import param_group

PREFIXES = {"ki:": "all", "ki-backbone:": "backbone"}
# Fields that change how a model trains, not the shapes or meaning of its weights.
TRAINING_FIELDS = ("fast_loss_weight", "flow_loss_weight", "insulation", "flow_samples", "flow_target", "num_flow_steps",
                   "remat", "dtype", *COMPUTE_ONLY_FIELDS)


def is_ki_init(spec: str | None) -> bool:
    return spec is not None and any(spec.startswith(p) for p in PREFIXES)


def parse(spec: str) -> tuple[Path, str]:
    """`ki:DIR` -> (DIR, "all"); `ki-backbone:DIR` -> (DIR, "backbone")."""
    for prefix, parts in sorted(PREFIXES.items(), key=lambda kv: -len(kv[0])):
        if spec.startswith(prefix) and len(spec) > len(prefix):
            return Path(spec[len(prefix):]), parts
    raise CheckpointError(f"--init must be ki:DIR (every weight) or ki-backbone:DIR (vision and backbone, a fresh "
                          f"action expert), got {spec!r}")


@dataclasses.dataclass(frozen=True)
class WarmStartReport:
    directory: Path
    parts: str
    step: int
    copied: int  # tensors
    fresh: int

    def summary(self) -> str:
        kept = "every weight" if self.parts == "all" else "the vision encoder and backbone; the action expert is fresh"
        return (f"--init: {kept} from {self.directory} (step {self.step}): {self.copied} tensors copied, "
                f"{self.fresh} freshly initialised")


class KiCheckpoint:
    """A checked training checkpoint of ours, ready to write into a fresh train state (the `--init` interface of
    ki_model.weights' loaders: `check_text_tokenizer`, `apply_to_params`, `report`)."""

    def __init__(self, spec: str, config: Pi05KIConfig, shards: str | Path):
        self.directory, self.parts = parse(spec)
        if not (self.directory / ckpt.MODEL_CONFIG).is_file():
            raise CheckpointError(f"{self.directory} is not a ki training checkpoint (no {ckpt.MODEL_CONFIG})")
        ckpt.check_same_data(self.directory, shards, doing="start from it")  # data first: it decides some shapes
        saved = ckpt.load_model_config(self.directory)
        a, b = saved.to_dict(), config.to_dict()
        differ = [k for k in a if k not in TRAINING_FIELDS and a[k] != b[k]]
        if differ:
            k = differ[0]
            raise CheckpointError(f"{self.directory} has another architecture: its {k} is {a[k]!r}, this run's "
                                  f"{b[k]!r}" + (f" (and {len(differ) - 1} more fields)" if len(differ) > 1 else ""))
        self.config = config
        self.report: WarmStartReport | None = None

    def check_text_tokenizer(self, path: Path) -> None:
        """Nothing to check beyond check_same_data: it compares the tokenizers' hashes."""

    def apply_to_params(self, params: dict, progress: bool = False) -> dict:
        """`params` (nnx.to_pure_dict of the fresh state) with the checkpoint's weights written in: every tensor, or
        those of the vision encoder and backbone (param_group 'backbone')."""
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
        saved, step, _ = ckpt.restore_params(self.directory, target, prefer_ema=False)
        copied = fresh = 0

        def pick(path: tuple, new: Any, old: Any) -> Any:
            nonlocal copied, fresh
            keys = tuple(getattr(k, "key", k) for k in path)
            if self.parts == "all" or param_group(keys) == "backbone":
                copied += 1
                return old
            fresh += 1
            return new

        out = jax.tree_util.tree_map_with_path(pick, params, saved)
        self.report = WarmStartReport(self.directory, self.parts, int(step), copied, fresh)
        return out

