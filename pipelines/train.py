"""Train the π0.5-KI model on token shards: `python -m pipelines.train --shards DIR --checkpoint-dir DIR`."""

from __future__ import annotations

import argparse
import sys

from ki_data.loader import LoaderError
from ki_data.manifest import ManifestError
from ki_model.checkpoint import CheckpointError
from ki_model.config import PRESETS
from ki_model.optimizer import OptimizerConfig
from ki_model.train import TrainConfig, TrainError, train


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m pipelines.train", description=__doc__)
    p.add_argument("--shards", required=True, help="pipelines.preprocess output directory (has manifest.json)")
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument("--config", default="tiny", choices=sorted(PRESETS), help="architecture preset")
    p.add_argument("--steps", type=int, default=1000, help="train until this many optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    p.add_argument("--overwrite", action="store_true", help="delete a non-empty --checkpoint-dir and start over")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of the weights (openpi: 0.999)")
    p.add_argument("--fsdp-devices", type=int, default=1, help="devices each parameter is sharded over")
    p.add_argument("--workers", type=int, default=2, help="grain loader worker processes (0: in-process)")
    p.add_argument("--shuffle-buffer", type=int, default=2048, help="rows shuffled together")
    p.add_argument("--verify", action="store_true",
                   help="first check every shard's size and sha256 against manifest.json (reads all the shards)")
    p.add_argument("--no-augment", action="store_true", help="train without image augmentation")
    p.add_argument("--remat", action="store_true", help="rematerialise layers in the backward pass (less memory)")
    p.add_argument("--fast-compile", action="store_true",
                   help="CPU: compile the train step without XLA backend optimisation (~3x faster compile, ~2x slower steps)")
    p.add_argument("--init", metavar="{paligemma,openpi}:PATH",
                   help="paligemma:PATH starts the vision encoder and backbone from a Hugging Face PaliGemma directory; "
                   "openpi:PATH the whole model, architecture included, from an openpi pi0.5 checkpoint (the "
                   "directory holding params/). The shards must use the checkpoint's text tokenizer (PaliGemma's)")
    opt = p.add_argument_group("optimizer (default: the preset's schedule; pi05 = openpi's)")
    opt.add_argument("--peak-lr", type=float)
    opt.add_argument("--warmup-steps", type=int)
    opt.add_argument("--decay-steps", type=int)
    opt.add_argument("--decay-lr", type=float)
    data = p.add_argument_group("data-dependent values: taken from the manifest; given here, they must agree")
    for name in ("action-horizon", "action-dim", "max-token-len", "max-text-len", "image-size", "vocab-size"):
        data.add_argument(f"--{name}", type=int)
    a = p.parse_args(argv)

    base = OptimizerConfig.for_preset(a.config)
    changes = {k: v for k, v in (("peak_lr", a.peak_lr), ("warmup_steps", a.warmup_steps),
                                 ("decay_steps", a.decay_steps), ("decay_lr", a.decay_lr)) if v is not None}
    return TrainConfig(
        shards=a.shards,
        checkpoint_dir=a.checkpoint_dir,
        config=a.config,
        steps=a.steps,
        batch_size=a.batch_size,
        seed=a.seed,
        resume=a.resume,
        overwrite=a.overwrite,
        log_every=a.log_every,
        save_every=a.save_every,
        keep_checkpoints=a.keep_checkpoints,
        ema_decay=a.ema_decay,
        fsdp_devices=a.fsdp_devices,
        num_workers=a.workers,
        shuffle_buffer=a.shuffle_buffer,
        augment=not a.no_augment,
        optimizer=OptimizerConfig(**{**base.__dict__, **changes}) if changes else None,
        action_horizon=a.action_horizon,
        action_dim=a.action_dim,
        max_token_len=a.max_token_len,
        max_text_len=a.max_text_len,
        image_size=a.image_size,
        vocab_size=a.vocab_size,
        model_overrides={"remat": True} if a.remat else {},
        fast_compile=a.fast_compile,
        init=a.init,
        verify=a.verify,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (TrainError, LoaderError, CheckpointError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
