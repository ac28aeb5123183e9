"""Train the π0.5-KI model on token shards: `python -m pipelines.train --shards DIR --checkpoint-dir DIR`."""

from __future__ import annotations

import argparse
import sys

from ki_data.loader import LoaderError
from ki_data.schema import ManifestError
from ki_model.checkpoint import CheckpointError
from ki_model.config import SIGLIP_VARIANTS
from ki_model.train import PRESETS, OptimizerConfig, TrainConfig, TrainError, train


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
    p.add_argument("--eval-every", type=int, default=0,
                   help="score a few fixed validation batches every N steps into metrics.jsonl (0: never)")
    p.add_argument("--eval-batches", type=int, default=2, help="validation batches scored by --eval-every")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of the weights (openpi: 0.999)")
    p.add_argument("--fsdp-devices", type=int, default=1, help="devices each parameter is sharded over")
    p.add_argument("--workers", type=int, default=2, help="grain loader worker processes (0: in-process)")
    p.add_argument("--shuffle-buffer", type=int, default=2048, help="rows shuffled together")
    p.add_argument("--no-augment", action="store_true", help="train without image augmentation")
    p.add_argument("--remat", action="store_true", help="rematerialise layers in the backward pass (less memory)")
    p.add_argument("--number-embeddings", action="store_true",
                   help="from scratch: start the embeddings of number tokens (the state bins) from a code of their "
                        "value (README: training from scratch)")
    p.add_argument("--vision-variant", choices=sorted(SIGLIP_VARIANTS), default=None,
                   help="the vision encoder instead of the preset's (e.g. siglip_tiny_p8: 8-px patches)")
    abl = p.add_argument_group("ablations (README: what knowledge insulation buys)")
    abl.add_argument("--insulation", choices=("on", "off"), default="on",
                     help="off: the flow gradient reaches the backbone and vision encoder (π0/π0.5 without KI)")
    abl.add_argument("--fast-loss-weight", type=float, default=None,
                     help="weight of the FAST cross-entropy in the total loss (default: the model config's, 1.0; 0 "
                          "with insulation on trains no backbone weight)")
    p.add_argument("--fast-compile", action="store_true",
                   help="CPU: compile the train step without XLA backend optimisation (~3x faster compile, ~2x slower steps)")
    p.add_argument("--init", metavar="paligemma:PATH", help="start the vision encoder and backbone from a Hugging Face "
                   "PaliGemma checkpoint directory (the shards must use its text tokenizer)")
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
        model_overrides=model_overrides(a),
        fast_compile=a.fast_compile,
        init=a.init,
        eval_every=a.eval_every,
        number_embeddings=a.number_embeddings,
        eval_batches=a.eval_batches,
    )


def model_overrides(a: argparse.Namespace) -> dict:
    out: dict = {"remat": True} if a.remat else {}
    if a.insulation == "off":
        out["insulation"] = False
    if a.fast_loss_weight is not None:
        out["fast_loss_weight"] = a.fast_loss_weight
    if a.vision_variant is not None:
        out["vision_variant"] = a.vision_variant
    return out


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
