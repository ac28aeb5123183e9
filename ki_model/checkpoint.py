"""Checkpoint directory layout and orbax save / restore.

```
<checkpoint_dir>/manifest.json  norm_stats.json  tokenizer/   copied from the shards at training start (the Policy needs them)
<checkpoint_dir>/model_config.json  train_config.json           what was trained, and how
<checkpoint_dir>/metrics.jsonl                                  one line per log step
<checkpoint_dir>/steps/<step>/{params, opt_state, ema_params, loader, meta}   orbax CheckpointManager
```

`meta` holds the step, the model config and the manifest the run trained on, so every step directory is
self-describing; `loader` is the `ki_data.loader.ShardLoader` state.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from ki_model.config import Pi05KIConfig

ARTIFACTS = ("manifest.json", "norm_stats.json", "tokenizer")
MODEL_CONFIG = "model_config.json"
TRAIN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
STEPS = "steps"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: a ki training directory missing something or not fitting the run,
    or pretrained weights (PaliGemma, openpi) with a missing file, tensor or config field, an unexpected tensor, a
    wrong shape, an unreadable file, or an architecture that differs from the model config."""


def copy_artifacts(shards_dir: str | Path, checkpoint_dir: str | Path) -> None:
    """Manifest, norm stats and tokenizers travel with the weights: inference must not need the shards."""
    src, dst = Path(shards_dir), Path(checkpoint_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ARTIFACTS:
        if not (src / name).exists():
            raise CheckpointError(f"{src}: {name} is missing (is this a pipelines.preprocess output directory?)")
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, dirs_exist_ok=True)
        else:
            shutil.copy2(src / name, dst / name)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)


def load_manifest(checkpoint_dir: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / "manifest.json"
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir}: no manifest.json; not a ki training checkpoint directory")
    return json.loads(path.read_text())


def load_model_config(checkpoint_dir: str | Path) -> Pi05KIConfig:
    path = Path(checkpoint_dir) / MODEL_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir}: no {MODEL_CONFIG}; not a ki training checkpoint directory")
    return Pi05KIConfig.from_json(path.read_text())


def manager(checkpoint_dir: str | Path, *, max_to_keep: int | None = 2, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(Path(checkpoint_dir).absolute() / STEPS, options=options)


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    *,
    params: Any,
    opt_state: Any,
    ema_params: Any | None,
    loader_state: dict[str, Any],
    meta: dict[str, Any],
) -> None:
    items: dict[str, Any] = {
        "params": ocp.args.StandardSave(params),
        "opt_state": ocp.args.StandardSave(opt_state),
        "loader": ocp.args.JsonSave(loader_state),
        "meta": ocp.args.JsonSave({**meta, "step": step}),
    }
    if ema_params is not None:
        items["ema_params"] = ocp.args.StandardSave(ema_params)
    mngr.save(step, args=ocp.args.Composite(**items))


def latest_step(mngr: ocp.CheckpointManager, checkpoint_dir: str | Path) -> int:
    step = mngr.latest_step()
    if step is None:
        raise CheckpointError(f"{checkpoint_dir}: no saved step under {STEPS}/")
    return step


def restore_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def has_ema(mngr: ocp.CheckpointManager, step: int) -> bool:
    return (Path(mngr.directory) / str(step) / "ema_params").is_dir()


def restore_train(
    mngr: ocp.CheckpointManager,
    step: int,
    *,
    abstract_params: Any,
    abstract_opt_state: Any,
    abstract_ema: Any | None,
) -> dict[str, Any]:
    """Everything a resumed run needs. Abstract trees (jax.ShapeDtypeStruct with shardings) say where arrays go."""
    if (abstract_ema is not None) != has_ema(mngr, step):
        saved = "with" if has_ema(mngr, step) else "without"
        asked = "with" if abstract_ema is not None else "without"
        raise CheckpointError(f"step {step} was saved {saved} EMA parameters but the resumed run is {asked} EMA")
    items: dict[str, Any] = {
        "params": ocp.args.StandardRestore(abstract_params),
        "opt_state": ocp.args.StandardRestore(abstract_opt_state),
        "loader": ocp.args.JsonRestore(),
        "meta": ocp.args.JsonRestore(),
    }
    if abstract_ema is not None:
        items["ema_params"] = ocp.args.StandardRestore(abstract_ema)
    out = mngr.restore(step, args=ocp.args.Composite(**items))
    return {k: out[k] for k in items}


def restore_params(checkpoint_dir: str | Path, abstract_params: Any, *, step: int | None = None, prefer_ema: bool = True) -> tuple[Any, int, bool]:
    """(params, step, used_ema) for inference: the EMA weights when the run kept them."""
    mngr = manager(checkpoint_dir, max_to_keep=None, read_only=True)
    try:
        step = latest_step(mngr, checkpoint_dir) if step is None else step
        item = "ema_params" if prefer_ema and has_ema(mngr, step) else "params"
        out = mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract_params)}))
        return out[item], step, item == "ema_params"
    finally:
        mngr.close()


def abstract_like(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
