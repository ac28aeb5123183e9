"""Train the π0.5-KI model on token shards: `python -m pipelines.train --shards DIR --checkpoint-dir DIR [options]`,
or a named recipe with changes: `python -m pipelines.train --recipe NAME [options]` (ki_model/recipes.py).

Every option is a field of `ki_model.train_config.TrainConfig` (or of the multi-host `Distributed` below): the
command line is derived from those dataclasses, with their defaults and help.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Annotated, Literal

import tyro

from ki_model.config import PRESETS, preset_optimizer
from ki_model.recipes import RECIPES
from ki_model.train_config import Flat, TrainConfig

RecipeName = Literal[tuple(RECIPES)]  # type: ignore[valid-type]


@dataclasses.dataclass(frozen=True)
class Distributed:
    """Multi-host (jax.distributed): run the same command on every host."""

    coordinator_address: str | None = None
    """host:port of process 0's coordinator"""
    num_processes: int = 1
    process_id: int = 0


@dataclasses.dataclass(frozen=True)
class Command:
    train: Annotated[TrainConfig, Flat]
    recipe: RecipeName | None = None
    """start from this named recipe (ki_model/recipes.py); the other options change its fields"""
    print_config: bool = False
    """print the resolved training config as JSON (what train_config.json will hold) and exit"""
    dist: Annotated[Distributed, Flat] = Distributed()


def _defaults(argv: list[str]) -> TrainConfig:
    """The config the flags change: the recipe's (or the plain defaults), with the optimizer of the preset that
    `--config` names, so that `--peak-lr` alone keeps the rest of that preset's schedule."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--recipe")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    base = RECIPES.get(known.recipe) or TrainConfig(shards=tyro.MISSING, checkpoint_dir=tyro.MISSING)
    if known.config in PRESETS:  # anything else is refused, with the choices, by the parser proper
        base = dataclasses.replace(base, config=known.config)
    return base if base.optimizer else dataclasses.replace(base, optimizer=preset_optimizer(base.config))


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Command]:
    """(the training config, the whole command: recipe, --print-config, multi-host options); exits 2 on a bad flag."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = tyro.cli(
        Command, args=argv, prog="python -m pipelines.train", description=__doc__,
        default=Command(train=_defaults(argv)),
        # A default optimizer is given, so its fields are plain flags (--peak-lr), not a choice between None and it.
        config=(tyro.conf.AvoidSubcommands,),
    )
    if command.dist.num_processes > 1 and not command.dist.coordinator_address:
        print("error: --num-processes > 1 needs --coordinator-address", file=sys.stderr)
        raise SystemExit(2)
    return command.train, command


def main(argv: list[str] | None = None) -> int:
    cfg, command = parse_args(argv)
    if command.print_config:
        print(json.dumps(cfg.resolved().to_dict(), indent=2, sort_keys=True))
        return 0
    import jax

    from ki_data.loader import LoaderError
    from ki_data.manifest import ManifestError
    from ki_model.checkpoint import CheckpointError
    from ki_model.train import TrainError, train

    dist = command.dist
    if dist.num_processes > 1:
        # One process per host (or per local accelerator group); process 0 writes the files.
        jax.distributed.initialize(dist.coordinator_address, dist.num_processes, dist.process_id)
    try:
        train(cfg)
    except (TrainError, LoaderError, CheckpointError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
