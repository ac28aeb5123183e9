"""Checkpoint directory layout, orbax save / restore, and what a checkpoint must share with the shards it reads.

```
<checkpoint_dir>/manifest.json  norm_stats.json  tokenizer/   copied from the shards at training start (the Policy needs them)
<checkpoint_dir>/model_config.json  train_config.json           what was trained, and how
<checkpoint_dir>/metrics.jsonl                                  one line per log step
<checkpoint_dir>/steps/<step>/{params, opt_state, ema_params, loader, meta}   orbax CheckpointManager
```

`meta` holds the step, the model config and the manifest the run trained on, so every step directory is
self-describing; `loader` is the `ki_data.loader.ShardLoader` state.

Layer stacks: the model's layers are stacked ([depth, ...] parameters under `layers` / `blocks`). Checkpoints written
before that hold one subtree per layer (`layers/0`, `layers/1`, ...); restoring refuses them with one line naming
`python -m ki_model.checkpoint stack-layers DIR`, which rewrites every step of DIR in the stacked layout.

orbax is imported where it is used: `import orbax.checkpoint` loads its whole checkpoint manager, and the inference
path (`ki_model.policy`, which reads this module's layout and errors) must stay light to import.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

from ki_data.artifacts import ARTIFACT_PATHS
from ki_data.manifest import Manifest, ManifestError
from ki_model.config import Pi05KIConfig

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

MODEL_CONFIG = "model_config.json"
TRAIN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
STEPS = "steps"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: a ki training directory missing something or not fitting the run,
    or pretrained weights (PaliGemma, openpi) with a missing file, tensor or config field, an unexpected tensor, a
    wrong shape, an unreadable file, or an architecture that differs from the model config."""


def _ocp():
    import absl.logging
    import orbax.checkpoint as ocp

    # orbax warns through absl on every read-only restore (no save interval, no metadata file): noise for our users.
    absl.logging.set_verbosity(absl.logging.ERROR)
    return ocp


# ---------------------------------------------------------------------------------------------------------------
# What travels with the weights


def copy_artifacts(shards_dir: str | Path, checkpoint_dir: str | Path) -> None:
    """Manifest, norm stats and tokenizers travel with the weights: inference must not need the shards."""
    src, dst = Path(shards_dir), Path(checkpoint_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ARTIFACT_PATHS:
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


def load_manifest(checkpoint_dir: str | Path) -> Manifest:
    try:
        return Manifest.load(checkpoint_dir)
    except ManifestError as e:
        raise CheckpointError(f"{checkpoint_dir}: not a ki training checkpoint directory ({e})") from None


def load_model_config(checkpoint_dir: str | Path) -> Pi05KIConfig:
    path = Path(checkpoint_dir) / MODEL_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir}: no {MODEL_CONFIG}; not a ki training checkpoint directory")
    return Pi05KIConfig.from_json(path.read_text())


def check_same_data(checkpoint_dir: str | Path, shards_dir: str | Path, *, doing: str) -> None:
    """A checkpoint only fits shards of the same shapes, token meanings, tokenizers and normalization as those it
    trained on; `doing` ("resume", "evaluate", ...) goes into the message."""
    saved, shards = load_manifest(checkpoint_dir), Manifest.load(shards_dir)
    differ = saved.data_differences(shards)
    if differ:
        raise CheckpointError(f"cannot {doing}: " + "; ".join(
            f"the checkpoint was trained with {k} = {a!r} but the shards in {shards_dir} have {k} = {b!r}"
            for k, a, b in differ))
    a = json.loads((Path(checkpoint_dir) / saved.norm_stats).read_text())
    b = json.loads((Path(shards_dir) / shards.norm_stats).read_text())
    if a != b:
        raise CheckpointError(
            f"cannot {doing}: norm_stats.json of the checkpoint {checkpoint_dir} differs from that of the shards "
            f"{shards_dir}"
        )


# ---------------------------------------------------------------------------------------------------------------
# orbax


def manager(checkpoint_dir: str | Path, *, max_to_keep: int | None = 2, read_only: bool = False) -> ocp.CheckpointManager:
    ocp = _ocp()
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
    ocp = _ocp()
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
    ocp = _ocp()
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def has_ema(mngr: ocp.CheckpointManager, step: int) -> bool:
    return (Path(mngr.directory) / str(step) / "ema_params").is_dir()


# ---------------------------------------------------------------------------------------------------------------
# Per-layer checkpoints (written before the layers were stacked)

_STACKED = ("layers", "blocks")  # the modules whose layers are stacked (Gemma experts, SigLIP)


def _is_per_layer(node: Any) -> bool:
    return isinstance(node, dict) and bool(node) and all(str(k).isdigit() for k in node)


def stack_per_layer(tree: Any) -> Any:
    """An old per-layer tree ({..., "layers": {"0": {...}, "1": {...}}}) in the stacked layout: each layer stack's
    leaves stacked on a new leading axis in layer order. Works on params, EMA params and Adam's moments (which mirror
    the params); trees already stacked come back unchanged."""
    import numpy as np

    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, node in tree.items():
        if str(key) in _STACKED and _is_per_layer(node):
            layers = [node[k] for k in sorted(node, key=int)]
            out[key] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
        else:
            out[key] = stack_per_layer(node)
    return out


def _has_per_layer(tree: Any) -> bool:
    if not isinstance(tree, dict):
        return False
    return any((str(k) in _STACKED and _is_per_layer(v)) or _has_per_layer(v) for k, v in tree.items())


def _check_stacked(mngr: ocp.CheckpointManager, step: int, checkpoint_dir: str | Path) -> None:
    """Refuse a step saved with per-layer parameters, in one line that says how to convert it."""
    ocp = _ocp()
    with ocp.PyTreeCheckpointer() as reader:
        params = reader.metadata(Path(mngr.directory) / str(step) / "params")
    params = getattr(params, "item_metadata", params)
    params = getattr(params, "tree", params)
    if _has_per_layer(params):
        raise CheckpointError(
            f"{checkpoint_dir} step {step} stores one parameter subtree per layer (written before the layers were "
            f"stacked); convert it with `python -m ki_model.checkpoint stack-layers {checkpoint_dir}`"
        )


def convert_to_stacked_layers(checkpoint_dir: str | Path) -> list[int]:
    """Rewrite every step of a ki checkpoint directory with per-layer parameters in the stacked layout (params,
    EMA params and optimizer state; loader and meta as they were). Returns the steps converted."""
    ocp = _ocp()
    mngr = manager(checkpoint_dir, max_to_keep=None)
    done = []
    try:
        for step in mngr.all_steps():
            items = ["params", "opt_state", "loader", "meta"] + (["ema_params"] if has_ema(mngr, step) else [])
            args = {k: ocp.args.JsonRestore() if k in ("loader", "meta") else ocp.args.StandardRestore()
                    for k in items}
            out = mngr.restore(step, args=ocp.args.Composite(**args))
            if not _has_per_layer(out["params"]):
                continue
            converted = {k: ocp.args.JsonSave(out[k]) if k in ("loader", "meta")
                         else ocp.args.StandardSave(stack_per_layer(out[k])) for k in items}
            mngr.delete(step)
            mngr.save(step, args=ocp.args.Composite(**converted), force=True)
            mngr.wait_until_finished()
            done.append(step)
    finally:
        mngr.close()
    return done


def restore_train(
    mngr: ocp.CheckpointManager,
    step: int,
    *,
    abstract_params: Any,
    abstract_opt_state: Any,
    abstract_ema: Any | None,
) -> dict[str, Any]:
    """Everything a resumed run needs. Abstract trees (jax.ShapeDtypeStruct with shardings) say where arrays go."""
    ocp = _ocp()
    _check_stacked(mngr, step, Path(mngr.directory).parent)
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
    ocp = _ocp()
    mngr = manager(checkpoint_dir, max_to_keep=None, read_only=True)
    try:
        step = latest_step(mngr, checkpoint_dir) if step is None else step
        _check_stacked(mngr, step, checkpoint_dir)
        item = "ema_params" if prefer_ema and has_ema(mngr, step) else "params"
        out = mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract_params)}))
        return out[item], step, item == "ema_params"
    finally:
        mngr.close()


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m ki_model.checkpoint", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("stack-layers", help="rewrite a checkpoint written with per-layer parameters in the "
                                               "stacked layout (in place)")
    conv.add_argument("checkpoint_dir")
    a = p.parse_args(argv)
    steps = convert_to_stacked_layers(a.checkpoint_dir)
    print(f"{a.checkpoint_dir}: converted steps {steps}" if steps else f"{a.checkpoint_dir}: already stacked")


if __name__ == "__main__":
    main()
