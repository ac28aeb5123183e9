"""What both checkpoint formats share: the checked-checkpoint base class (`PretrainedCheckpoint`: `apply_to`,
`apply_to_params`, `check_text_tokenizer`), the one writer of converted arrays into a model or its parameters, the
model's own parameter shapes, and error listings."""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
from flax import nnx

from ki_model.checkpoint import CheckpointError
from ki_model.config import Pi05KIConfig

_LIST_LIMIT = 12
ParamPath = tuple[str | int, ...]


def listing(names: Sequence[str]) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else ""
    return ", ".join(names[:_LIST_LIMIT]) + more


def architecture(config: Pi05KIConfig) -> tuple:
    """The config fields that decide the shapes of the parameters loaded here (sizes, whether named or explicit)."""
    return config.backbone, config.expert, config.vision, config.vocab_size, config.image_size


def host_device() -> jax.Device:
    # Checkpoint tensors are read and converted on the host; only the final arrays go to the model's devices.
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return jax.devices()[0]


def model_param_shapes(config: Pi05KIConfig) -> dict[ParamPath, tuple[int, ...]]:
    abstract = nnx.eval_shape(lambda: config.create(nnx.Rngs(0)))
    return {p: tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def _flat(params: dict, prefix: ParamPath = ()) -> Iterator[tuple[ParamPath, Any]]:
    for key, value in params.items():
        if isinstance(value, dict):
            yield from _flat(value, (*prefix, key))
        else:
            yield (*prefix, key), value


class PretrainedCheckpoint(abc.ABC):
    """A checked pretrained checkpoint (`PaliGemmaCheckpoint`, `OpenpiCheckpoint`): every name, shape and architecture
    field was checked against `config` when it was opened, and `tensors()` converts lazily, one array at a time.
    `apply_to` / `apply_to_params` write them through the one writer (`_write`), which first checks that the
    destination has the architecture the checkpoint was checked against."""

    KIND: ClassVar[str]  # "PaliGemma" / "openpi", in messages
    path: Path
    config: Pi05KIConfig
    report: Any  # the loader's report (its `summary()` is logged)

    @abc.abstractmethod
    def tensors(self, progress: bool = False) -> Iterator[tuple[ParamPath, Any]]:
        """(our parameter path, float32 array on the host) one at a time. Paths as in
        `nnx.to_flat_state(nnx.state(model, nnx.Param))`."""

    def architecture_fields(self, config: Pi05KIConfig) -> tuple:
        """The config fields that decide the shapes of the parameters this checkpoint writes."""
        return architecture(config)

    def shipped_tokenizer(self) -> Path | None:
        """The text tokenizer file the checkpoint ships, if any (the shards' must then be the very same file)."""
        return None

    @property
    def vocab_size(self) -> int:
        """The vocabulary the loaded embedding covers (the model's vocab_size)."""
        return self.config.vocab_size

    def apply_to(self, model: nnx.Module, progress: bool = False) -> Any:
        """Write the weights into a `Pi05KI` in place (parameters the checkpoint does not hold are left as they are);
        returns the report."""
        self._write(model, progress)
        return self.report

    def apply_to_params(self, params: dict, progress: bool = False) -> dict:
        """Replace the leaves of a `nnx.to_pure_dict` parameter tree IN PLACE; returns the same dict."""
        self._write(params, progress)
        return params

    def check_text_tokenizer(self, text_model: str | os.PathLike) -> None:
        """The shards' text tokenizer must be the checkpoint's: same vocabulary size, and the very same file when
        the checkpoint ships its tokenizer."""
        from ki_data import TextTokenizer

        text_model = Path(text_model)
        try:
            tok = TextTokenizer.load(text_model)
        except (OSError, ValueError) as e:  # ValueError: not a SentencePiece model
            raise CheckpointError(f"cannot check the text tokenizer against {self.path}: {e}") from e
        if tok.vocab_size != self.vocab_size:
            raise CheckpointError(
                f"text tokenizer {text_model} has {tok.vocab_size} pieces but the {self.KIND} checkpoint {self.path} "
                f"embeds {self.vocab_size}: preprocess with PaliGemma's tokenizer.model"
            )
        ref = self.shipped_tokenizer()
        if ref is not None and ref.is_file() and ref.read_bytes() != text_model.read_bytes():
            raise CheckpointError(f"text tokenizer {text_model} differs from the checkpoint's {ref}")

    def _write(self, dest: nnx.Module | dict, progress: bool) -> None:
        """The one writer: check the destination's architecture, then put each converted array in place of the one
        it replaces, with that one's dtype and sharding (so the old one is freed as it goes), its shape checked."""
        if isinstance(dest, dict):
            leaves = dict(_flat(dest))
            want = model_param_shapes(self.config)
            differ = [f"{p} {tuple(leaves[p].shape) if p in leaves else 'missing'} (expected {s})"
                      for p, s in want.items() if p not in leaves or tuple(leaves[p].shape) != s]
            differ += [f"{p} (not in the model)" for p in leaves if p not in want]
            if differ:
                raise CheckpointError(f"the parameters differ from those of the model this checkpoint was checked "
                                      f"against: {listing([str(d) for d in differ])}")

            def put(target: ParamPath, value: Any) -> None:
                *parents, leaf = target
                node = dest
                for key in parents:
                    node = node[key]
                node[leaf] = value

            get = leaves.__getitem__
        else:
            config = getattr(dest, "config", None)
            checked = self.architecture_fields(self.config)
            if not isinstance(config, Pi05KIConfig) or self.architecture_fields(config) != checked:
                raise CheckpointError(
                    f"the model's architecture {None if config is None else self.architecture_fields(config)} "
                    f"differs from the one this checkpoint was checked against {checked}"
                )
            variables = dict(nnx.to_flat_state(nnx.state(dest, nnx.Param)))

            def get(target: ParamPath) -> Any:
                return variables[target].get_value()

            def put(target: ParamPath, value: Any) -> None:
                variables[target].set_value(value)

        for target, value in self.tensors(progress):
            old = get(target)
            if tuple(old.shape) != value.shape:
                raise CheckpointError(f"parameter {target} has shape {tuple(old.shape)}, converted {value.shape}")
            sharding = getattr(old, "sharding", None)
            put(target, jax.device_put(value.astype(old.dtype), sharding) if sharding else value.astype(old.dtype))
            del old, value
        logging.getLogger(type(self).__module__).info(self.report.summary())
