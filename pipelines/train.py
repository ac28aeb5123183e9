"""Train the π0.5-KI model on token shards: `python -m pipelines.train --shards DIR --checkpoint-dir DIR`."""

from __future__ import annotations

import argparse
import sys

import jax

from ki_data.loader import LoaderError
from ki_data.manifest import ManifestError
from ki_model.checkpoint import CheckpointError
from ki_model.config import DTYPES, PRESETS, REMAT_POLICIES, SIGLIP_VARIANTS
from ki_model.optimizer import OptimizerConfig
from ki_model.train import TrainConfig, TrainError, train


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
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
    p.add_argument("--verify", action="store_true",
                   help="first check every shard's size and sha256 against manifest.json (reads all the shards)")
    p.add_argument("--no-augment", action="store_true", help="train without image augmentation")
    p.add_argument("--remat", action="store_true", help="rematerialise layers in the backward pass (less memory)")
    p.add_argument("--remat-policy", choices=REMAT_POLICIES, default=None,
                   help="per-layer remat policy (overrides --remat, which is nothing_saveable)")
    p.add_argument("--layer-chunks", type=int, default=1, metavar="N",
                   help="run each layer on N chunks of the batch in turn: with --remat, the backward pass holds one "
                        "chunk's layer activations (same result; the memory of a full π0.5 fine-tune at batch 32)")
    p.add_argument("--grad-accum", type=int, default=1, metavar="N",
                   help="average the gradients of N micro-batches of each batch (memory of batch/N, update of batch)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (weights stay float32): bfloat16 = mixed precision (default: the preset's)")
    p.add_argument("--lora", default="", metavar="PART=RANK,...",
                   help="LoRA fine-tuning: e.g. backbone=16,expert=32 (openpi's ranks: backbone,expert); the other "
                        "weights of those parts are frozen in bfloat16")
    p.add_argument("--flow-target", choices=("velocity", "clean"), default="velocity",
                   help="the action expert's output: the flow velocity (π0, openpi's checkpoints) or the clean chunk")
    p.add_argument("--flow-samples", type=int, default=1, metavar="K",
                   help="(noise, time) draws per example in one pass: K action blocks share the backbone (default: 1)")
    scratch = p.add_argument_group("training from scratch (README: what a pretrained backbone brings)")
    scratch.add_argument("--number-embeddings", action="store_true",
                         help="start the embeddings of number tokens (the state bins) from a code of their value")
    scratch.add_argument("--vision-variant", choices=sorted(SIGLIP_VARIANTS), default=None,
                         help="the vision encoder instead of the preset's (e.g. siglip_tiny_p8: 8-px patches)")
    ablation = p.add_argument_group("ablations (docs/DESIGN.md §5; the defaults are π0.5 with knowledge insulation)")
    ablation.add_argument("--insulation", choices=("on", "off"), default="on",
                          help="off: the flow gradient reaches the backbone and vision encoder (π0/π0.5 without KI)")
    ablation.add_argument("--fast-loss-weight", type=float, default=1.0,
                          help="λ in μ·flow + λ·FAST; 0 = flow only (FAST tokens not fed, no FAST loss)")
    ablation.add_argument("--flow-loss-weight", type=float, default=1.0,
                          help="μ in μ·flow + λ·FAST; 0 = FAST only, the action expert does not run (the KI recipe's "
                               "stage 1: a π0-FAST-style backbone for a later --init ki-backbone:DIR)")
    p.add_argument("--fast-compile", action="store_true",
                   help="CPU: compile the train step without XLA backend optimisation (~3x faster compile, ~2x slower steps)")
    p.add_argument("--init", metavar="{paligemma,openpi,ki,ki-backbone}:PATH",
                   help="paligemma:PATH starts the vision encoder and backbone from a Hugging Face PaliGemma directory; "
                   "openpi:PATH the whole model, architecture included, from an openpi pi0.5 checkpoint (the "
                   "directory holding params/); the shards must use the checkpoint's text tokenizer (PaliGemma's). "
                   "ki:DIR every weight of one of our training checkpoints; ki-backbone:DIR its vision encoder and "
                   "backbone with a fresh action expert (same data and architecture)")
    dist = p.add_argument_group("multi-host (jax.distributed): run the same command on every host")
    dist.add_argument("--coordinator-address", help="host:port of process 0's coordinator")
    dist.add_argument("--num-processes", type=int, default=1)
    dist.add_argument("--process-id", type=int, default=0)
    opt = p.add_argument_group("optimizer (default: the preset's schedule; pi05 = openpi's)")
    opt.add_argument("--peak-lr", type=float)
    opt.add_argument("--warmup-steps", type=int)
    opt.add_argument("--decay-steps", type=int)
    opt.add_argument("--decay-lr", type=float)
    data = p.add_argument_group("data-dependent values: taken from the manifest; given here, they must agree")
    for name in ("action-horizon", "action-dim", "max-token-len", "max-text-len", "image-size", "vocab-size"):
        data.add_argument(f"--{name}", type=int)
    a = p.parse_args(argv)

    if a.num_processes > 1 and not a.coordinator_address:
        p.error("--num-processes > 1 needs --coordinator-address")
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
        verify=a.verify,
        eval_every=a.eval_every,
        eval_batches=a.eval_batches,
        number_embeddings=a.number_embeddings,
        grad_accum=a.grad_accum,
    ), a


def model_overrides(a: argparse.Namespace) -> dict:
    out = {"remat": a.remat_policy or a.remat, "layer_chunks": a.layer_chunks, "flow_samples": a.flow_samples,
           "flow_target": a.flow_target,
           "insulation": a.insulation == "on",
           "fast_loss_weight": a.fast_loss_weight, "flow_loss_weight": a.flow_loss_weight}
    if a.vision_variant is not None:
        out["vision_variant"] = a.vision_variant
    if a.dtype is not None:
        out["dtype"] = a.dtype
    if a.lora:
        out["lora"] = a.lora
    return out


def main(argv: list[str] | None = None) -> int:
    cfg, dist = parse_args(argv)
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
