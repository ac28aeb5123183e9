"""Training: optimizer, train state, the jitted step on a (data, fsdp) device mesh, and the loop over the shards.

The loop is `train(TrainConfig) -> final metrics`; `pipelines/train.py` only parses options into a `TrainConfig`.
Presets fix the architecture; everything the data decides (horizon, action dim, cameras, token lengths, image size,
vocabulary) comes from the shards' manifest, and an explicit value or a resumed checkpoint that disagrees is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float
from tqdm import tqdm

from ki_data.loader import LoaderConfig, ShardLoader
from ki_model import checkpoint as ckpt
from ki_model import sharding
from ki_model.config import Pi05KIConfig
from ki_model.observation import Observation
from ki_model.weights import CheckpointError, PaliGemmaCheckpoint, load_paligemma, parse_init

Params = dict[str, Any]  # nnx.to_pure_dict of the model's nnx.Param state

DATA_AXIS, FSDP_AXIS = "data", "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

# Fields the shards decide. Manifest key -> Pi05KIConfig field (the same names).
MANIFEST_FIELDS = ("action_horizon", "action_dim", "cameras", "image_size", "max_token_len", "max_text_len", "vocab_size")
# What a resumed run's shards must share with the checkpoint's manifest, beyond MANIFEST_FIELDS.
RESUME_FIELDS = MANIFEST_FIELDS + ("state_dim", "skip_tokens", "norm_mode")

PRESETS: dict[str, Callable[..., Pi05KIConfig]] = {
    "tiny": Pi05KIConfig.tiny,
    "small": Pi05KIConfig.small,
    "pi05": Pi05KIConfig.pi05,
}


class TrainError(ValueError):
    """Training cannot start as asked (shards contradict an option or a checkpoint, directory in the way, ...)."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + linear warm-up and cosine decay + global-norm clipping; the defaults are openpi's."""

    peak_lr: float = 2.5e-5
    warmup_steps: int = 1_000
    decay_steps: int = 30_000
    decay_lr: float = 2.5e-6
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 1e-10
    clip_norm: float = 1.0

    @classmethod
    def for_preset(cls, preset: str) -> OptimizerConfig:
        # openpi's schedule barely moves a from-scratch tiny model in a few minutes; the CPU demo runs a faster one
        # (on the pusht demo, 3e-3 starts reading the state tokens within ~600 steps, 1e-3 not within 1000).
        if preset == "tiny":
            return cls(peak_lr=3e-3, warmup_steps=100, decay_steps=1_500, decay_lr=3e-4)
        return cls()


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    # openpi starts the warm-up at peak / (warmup + 1), not at 0, so that step 0 already updates.
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.peak_lr / (cfg.warmup_steps + 1),
        peak_value=cfg.peak_lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.decay_steps,
        end_value=cfg.decay_lr,
    )


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Params
    opt_state: optax.OptState
    ema_params: Params | None


# ---------------------------------------------------------------------------------------------------------------
# Model config from a preset and the manifest


def model_config(preset: str, manifest: dict[str, Any], *, explicit: dict[str, Any] | None = None, **overrides: Any) -> Pi05KIConfig:
    """The preset's architecture with the data-dependent fields from the manifest.

    `explicit` holds values the user gave on the command line for MANIFEST_FIELDS; any that disagrees with the
    manifest is refused (a model trained on other shapes than its data would silently be wrong).
    """
    if preset not in PRESETS:
        raise TrainError(f"unknown config preset {preset!r}; choose one of {sorted(PRESETS)}")
    data = {k: manifest[k] for k in MANIFEST_FIELDS}
    data["cameras"] = tuple(data["cameras"])
    for key, value in (explicit or {}).items():
        if value is None:
            continue
        if key not in data:
            raise TrainError(f"{key} is not decided by the shards; the manifest cannot check it")
        want = tuple(value) if key == "cameras" else value
        if want != data[key]:
            raise TrainError(
                f"--{key.replace('_', '-')} {value} contradicts the shards: their manifest has {key} = {data[key]}"
            )
    return PRESETS[preset](**data, **overrides)


def check_same_data(saved: dict[str, Any], shards: dict[str, Any], shards_dir: str | Path, *, doing: str = "resume") -> None:
    """A checkpoint only fits shards of the same shapes and token meanings as those it trained on."""
    for key in RESUME_FIELDS:
        if saved.get(key) != shards.get(key):
            raise TrainError(
                f"cannot {doing}: the checkpoint was trained with {key} = {saved.get(key)!r} but the shards in "
                f"{shards_dir} have {key} = {shards.get(key)!r}"
            )
    for kind in ("text", "fast"):
        a, b = saved["tokenizers"][kind].get("sha256"), shards["tokenizers"][kind].get("sha256")
        if a != b:
            raise TrainError(
                f"cannot {doing}: the checkpoint's {kind} tokenizer (sha256 {a}) differs from the one of the shards "
                f"in {shards_dir} ({b})"
            )


def check_same_norm_stats(checkpoint_dir: str | Path, shards_dir: str | Path, *, doing: str = "resume") -> None:
    a = json.loads((Path(checkpoint_dir) / "norm_stats.json").read_text())
    b = json.loads((Path(shards_dir) / "norm_stats.json").read_text())
    if a != b:
        raise TrainError(
            f"cannot {doing}: norm_stats.json of the checkpoint {checkpoint_dir} differs from that of the shards {shards_dir}"
        )


def check_resume_config(saved: Pi05KIConfig, wanted: Pi05KIConfig) -> None:
    a, b = saved.to_dict(), wanted.to_dict()
    for key in a:
        if a[key] != b[key]:
            raise TrainError(f"cannot resume: the checkpoint's model has {key} = {a[key]!r}, this run asks {b[key]!r}")


# ---------------------------------------------------------------------------------------------------------------
# Mesh and shardings


def make_mesh(fsdp_devices: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
    """(data, fsdp) mesh over all devices: parameters sharded over `fsdp`, the batch over both axes."""
    devices = list(jax.devices() if devices is None else devices)
    if fsdp_devices < 1 or len(devices) % fsdp_devices:
        raise TrainError(f"--fsdp-devices {fsdp_devices} does not divide the {len(devices)} devices")
    grid = np.asarray(devices).reshape(len(devices) // fsdp_devices, fsdp_devices)
    return Mesh(grid, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def abstract_model(config: Pi05KIConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract nnx.Param state) without allocating any weight."""
    model = nnx.eval_shape(lambda: config.create(nnx.Rngs(0)))
    return nnx.split(model, nnx.Param)


def param_shardings(params: nnx.State, mesh: Mesh) -> Params:
    """FSDP from each nnx.Param's logical axis names through ki_model.sharding's rules (works on abstract params).

    A mesh axis that does not divide its dimension leaves that dimension replicated.
    """

    def one(var: nnx.Variable) -> NamedSharding:
        shape = var.get_value().shape
        axes = var.get_metadata().get("out_sharding") or (None,) * len(shape)
        spec = list(sharding.logical_to_spec(axes, sharding.FSDP_RULES))
        for i, names in enumerate(spec):
            names = (names,) if isinstance(names, str) else tuple(names or ())
            if shape[i] % int(np.prod([mesh.shape[n] for n in names])):
                spec[i] = None
        return NamedSharding(mesh, PartitionSpec(*spec))

    return nnx.to_pure_dict(jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def compiler_options(fast_compile: bool) -> dict[str, Any] | None:
    """XLA options for jax.jit. fast_compile (CPU only): backend optimisation off, which compiles this model ~3x
    faster and runs it ~2x slower; worth it for runs of seconds to minutes (tests, the CPU demo)."""
    if fast_compile and jax.default_backend() == "cpu":
        return {"xla_backend_optimization_level": 0}
    return None


# ---------------------------------------------------------------------------------------------------------------
# State and step


def _init_fn(config: Pi05KIConfig, tx: optax.GradientTransformation, seed: int, ema: bool) -> Callable[[], TrainState]:
    def init() -> TrainState:
        params = nnx.to_pure_dict(nnx.split(config.create(nnx.Rngs(seed)), nnx.Param)[1])
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema_params=params if ema else None,
        )

    return init


def state_shardings(
    config: Pi05KIConfig, tx: optax.GradientTransformation, mesh: Mesh, *, ema: bool
) -> tuple[TrainState, nnx.GraphDef]:
    """(NamedShardings of every TrainState leaf on `mesh`, graphdef), without allocating anything."""
    graphdef, abstract_params = abstract_model(config)
    p_shard = param_shardings(abstract_params, mesh)
    abstract = jax.eval_shape(_init_fn(config, tx, 0, ema))
    replicated = NamedSharding(mesh, PartitionSpec())
    # Optimizer moments mirror the params' tree: give them the params' shardings, scalars replicated.
    opt_shard = _mirror_shardings(abstract.opt_state, p_shard, replicated)
    return TrainState(step=replicated, params=p_shard, opt_state=opt_shard, ema_params=p_shard if ema else None), graphdef


def abstract_train_state(
    config: Pi05KIConfig, tx: optax.GradientTransformation, shardings: TrainState, *, ema: bool
) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the train state: the restore target of a resumed run."""
    shapes = jax.eval_shape(_init_fn(config, tx, 0, ema))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def init_train_state(
    config: Pi05KIConfig, tx: optax.GradientTransformation, mesh: Mesh, *, seed: int, ema: bool
) -> tuple[TrainState, TrainState, nnx.GraphDef]:
    """(state placed on the mesh, its shardings tree, graphdef). Initialised under jit, already sharded."""
    shardings, graphdef = state_shardings(config, tx, mesh, ema=ema)
    # Runs once: on CPU, compiling the many random initialisers fully optimised costs far more than running them.
    init = jax.jit(_init_fn(config, tx, seed, ema), out_shardings=shardings, compiler_options=compiler_options(True))
    return init(), shardings, graphdef


def _mirror_shardings(tree: Any, p_shard: Params, default: NamedSharding) -> Any:
    p_struct = jax.tree.structure(p_shard)

    def is_params_like(x: Any) -> bool:
        try:
            return jax.tree.structure(x) == p_struct
        except Exception:
            return False

    return jax.tree.map(lambda x: p_shard if is_params_like(x) else default, tree, is_leaf=is_params_like)


def _train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    ema_decay: float | None,
    base_key: jax.Array,
    state: TrainState,
    obs: Observation,
    actions: Float[Array, "b h d"],
    action_is_pad: Bool[Array, "b h"],
) -> tuple[TrainState, dict[str, Array]]:
    rng = jax.random.fold_in(base_key, state.step)

    def loss_fn(params: Params) -> tuple[Array, dict[str, Array]]:
        model = nnx.merge(graphdef, params)
        out = model.compute_loss(rng, obs, actions, action_is_pad, train=True)
        return out["total"], out

    grads, out = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
    metrics = {
        "flow_loss": out["flow"],
        "fast_loss": out["fast"],
        "total_loss": out["total"],
        "fast_accuracy": out["fast_accuracy"],
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics


def make_train_step(
    graphdef: nnx.GraphDef,
    opt_cfg: OptimizerConfig,
    state_shardings: TrainState,
    mesh: Mesh,
    *,
    seed: int,
    ema_decay: float | None,
    donate: bool = True,
    fast_compile: bool = False,
) -> Callable[[TrainState, Observation, Array, Array], tuple[TrainState, dict[str, Array]]]:
    fn = functools.partial(
        _train_step, graphdef, make_optimizer(opt_cfg), make_schedule(opt_cfg), ema_decay, step_key(seed)
    )
    data = batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        fn,
        in_shardings=(state_shardings, data, data, data),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,) if donate else (),
        compiler_options=compiler_options(fast_compile),
    )


def step_key(seed: int) -> jax.Array:
    # Separate from the init stream (nnx.Rngs(seed)) so that noise/time draws do not repeat init draws.
    return jax.random.fold_in(jax.random.key(seed), 1)


def device_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> tuple[Observation, Array, Array]:
    """Host batch (this process's rows) -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    obs = Observation.from_batch(batch)
    put = lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x))  # noqa: E731
    return (
        jax.tree.map(put, obs),
        put(batch["actions"].astype(np.float32)),
        put(batch["action_is_pad"].astype(bool)),
    )


# ---------------------------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class TrainConfig:
    shards: str
    checkpoint_dir: str
    config: str = "tiny"
    steps: int = 1_000
    batch_size: int = 32  # global
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    ema_decay: float | None = None
    fsdp_devices: int = 1
    num_workers: int = 2  # grain loader processes
    shuffle_buffer: int = 2048
    augment: bool = True
    optimizer: OptimizerConfig | None = None  # None: the preset's
    # Explicit data-dependent values: checked against the manifest, never override it.
    action_horizon: int | None = None
    action_dim: int | None = None
    max_token_len: int | None = None
    max_text_len: int | None = None
    image_size: int | None = None
    vocab_size: int | None = None
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"remat": True}
    fast_compile: bool = False  # see compiler_options
    progress: bool = True
    # "paligemma:PATH": vision encoder + backbone from a Hugging Face PaliGemma checkpoint (not applied on resume).
    init: str | None = None
    # Every eval_every steps (a multiple of log_every; 0: never), score eval_batches fixed validation batches and log
    # the figures as val_* in metrics.jsonl (ki_model.validation).
    eval_every: int = 0
    eval_batches: int = 2
    # From scratch only: start the embeddings of number tokens (the state bins) from a code of their value
    # (ki_model.number_embeddings); a pretrained backbone knows its numbers.
    number_embeddings: bool = False

    def explicit(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in MANIFEST_FIELDS if k != "cameras" and hasattr(self, k)}

    def optimizer_config(self) -> OptimizerConfig:
        return self.optimizer or OptimizerConfig.for_preset(self.config)


def _check_init(cfg: TrainConfig, model_cfg: Pi05KIConfig) -> PaliGemmaCheckpoint:
    """The checked `--init` checkpoint (nothing read yet); its tokenizer must be the shards' text tokenizer."""
    try:
        pretrained = load_paligemma(parse_init(cfg.init), model_cfg)
        pretrained.check_text_tokenizer(Path(cfg.shards) / "tokenizer" / "text.model")
    except CheckpointError as e:
        raise TrainError(f"--init {cfg.init}: {e}") from e
    return pretrained


def _prepare_dir(cfg: TrainConfig) -> None:
    out = Path(cfg.checkpoint_dir)
    if cfg.resume:
        if not (out / ckpt.STEPS).is_dir():
            raise TrainError(f"--resume: {out} holds no checkpoint")
        return
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise TrainError(f"{out} is not empty; pass --resume to continue it or --overwrite to start over")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """A killed run may have logged past its last checkpoint; the resumed run logs those steps again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _format(m: dict[str, float]) -> str:
    return (
        f"step {m['step']:>6d}  flow {m['flow_loss']:.4f}  fast {m['fast_loss']:.4f}  acc {m['fast_accuracy']:.3f}  "
        f"|g| {m['grad_norm']:.3f}  lr {m['learning_rate']:.2e}  {m['steps_per_s']:.2f} it/s  "
        f"{m['samples_per_s']:.1f} samples/s"
    )


def _format_val(m: dict[str, float]) -> str:
    hold = f" (hold still {m['val_hold_still_mse']:.4g})" if "val_hold_still_mse" in m else ""
    return (
        f"\n  val: flow {m['val_flow_loss']:.4f} (another row's observation {m['val_flow_loss_shuffled']:.4f})  "
        f"fast {m['val_fast_loss']:.4f}  acc {m['val_fast_accuracy']:.3f}  flow-sample MSE {m['val_flow_mse']:.4g}{hold}"
    )


def _with_number_embeddings(state: TrainState, shardings: TrainState, shards: str) -> TrainState:
    """The fresh state with the number tokens' embeddings set from their values (EMA too), keeping the sharding."""
    from ki_data import TextTokenizer
    from ki_data.schema import TEXT_TOKENIZER_FILE
    from ki_model.number_embeddings import apply_number_embeddings

    text = TextTokenizer.load(Path(shards) / TEXT_TOKENIZER_FILE)
    path = ("backbone", "embedder", "input_embedding")

    def replace(params: Params) -> Params:
        table, changed = apply_number_embeddings(np.asarray(jax.device_get(params[path[0]][path[1]][path[2]])), text)
        sharding = shardings.params[path[0]][path[1]][path[2]]
        new = jax.tree.map(lambda x: x, params)  # a copy of the nesting; leaves shared
        new[path[0]][path[1]][path[2]] = jax.device_put(jnp.asarray(table), sharding)
        return new, changed

    params, changed = replace(state.params)
    print(f"--number-embeddings: {changed} number tokens start from a code of their value")
    ema = replace(state.ema_params)[0] if state.ema_params is not None else None
    return state.replace(params=params, ema_params=ema)


def _make_validator(cfg: TrainConfig, model_cfg: Pi05KIConfig, graphdef: nnx.GraphDef, manifest: dict[str, Any]):
    if not cfg.eval_every:
        return None
    if cfg.eval_every < 0 or cfg.eval_every % cfg.log_every:
        raise TrainError(f"--eval-every {cfg.eval_every} must be a positive multiple of --log-every {cfg.log_every}")
    if not manifest["splits"].get("val"):
        raise TrainError(f"--eval-every: the shards in {cfg.shards} have no validation episodes")
    from ki_model.validation import Validator  # imports the evaluation code only when asked

    return Validator(cfg.shards, model_cfg, graphdef, manifest, batches=cfg.eval_batches, batch_size=cfg.batch_size,
                     seed=cfg.seed, compiler_options=compiler_options(cfg.fast_compile))


def train(cfg: TrainConfig, *, on_log: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
    """Runs (or resumes) training up to `cfg.steps`; returns the last logged metrics.

    `on_log` is called with each logged metrics dict (tests use it to kill a run part-way).
    """
    from ki_data.schema import load_manifest

    manifest = load_manifest(cfg.shards)
    model_cfg = model_config(cfg.config, manifest, explicit=cfg.explicit(), **cfg.model_overrides)
    # Checked before anything is written, so a bad checkpoint leaves the output directory alone.
    pretrained = _check_init(cfg, model_cfg) if cfg.init and not cfg.resume else None
    if cfg.number_embeddings and cfg.init:
        raise TrainError("--number-embeddings is a prior for a backbone trained from scratch; --init loads "
                         "PaliGemma's own embeddings")
    mesh = make_mesh(cfg.fsdp_devices)
    if cfg.batch_size % mesh.size:
        raise TrainError(f"--batch-size {cfg.batch_size} is not divisible by the {mesh.size} devices")
    is_main = jax.process_index() == 0  # one process writes the files; orbax coordinates the checkpoint itself
    out = Path(cfg.checkpoint_dir)
    if cfg.resume or is_main:
        _prepare_dir(cfg)
    if cfg.resume:
        check_same_data(ckpt.load_manifest(out), manifest, cfg.shards)
        check_same_norm_stats(out, cfg.shards)
        check_resume_config(ckpt.load_model_config(out), model_cfg)
    elif is_main:
        ckpt.copy_artifacts(cfg.shards, out)
        (out / ckpt.MODEL_CONFIG).write_text(model_cfg.to_json())
        train_json = dataclasses.asdict(cfg) | {"optimizer": dataclasses.asdict(cfg.optimizer_config())}
        ckpt.write_json(out / ckpt.TRAIN_CONFIG, train_json)

    opt_cfg = cfg.optimizer_config()
    ema = cfg.ema_decay is not None
    tx = make_optimizer(opt_cfg)
    loader = ShardLoader(
        cfg.shards,
        "train",
        LoaderConfig(
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            shuffle_buffer=cfg.shuffle_buffer,
            augment=cfg.augment,
            num_workers=cfg.num_workers,
        ),
    )
    mngr = ckpt.manager(out, max_to_keep=cfg.keep_checkpoints)
    metrics_path = out / ckpt.METRICS
    try:
        if cfg.resume:
            start = ckpt.latest_step(mngr, out)
            shardings, graphdef = state_shardings(model_cfg, tx, mesh, ema=ema)
            target = abstract_train_state(model_cfg, tx, shardings, ema=ema)
            restored = ckpt.restore_train(
                mngr,
                start,
                abstract_params=target.params,
                abstract_opt_state=target.opt_state,
                abstract_ema=target.ema_params,
            )
            loader.restore(restored["loader"])
            state = TrainState(
                step=jax.device_put(jnp.asarray(start, jnp.int32), shardings.step),
                params=restored["params"],
                opt_state=restored["opt_state"],
                ema_params=restored.get("ema_params"),
            )
            if is_main:
                _truncate_metrics(metrics_path, start)
            print(f"resumed from {out} at step {start}")
        else:
            start = 0
            state, shardings, graphdef = init_train_state(model_cfg, tx, mesh, seed=cfg.seed, ema=ema)
            if pretrained is not None:
                # In place, tensor by tensor, each keeping its sharding; the EMA starts from the loaded weights.
                params = pretrained.apply_to_params(state.params, progress=cfg.progress)
                state = state.replace(params=params, ema_params=None)
                if ema:
                    ema_params = jax.device_put(jax.tree.map(jnp.copy, params), shardings.params)
                    state = state.replace(ema_params=ema_params)
                print(pretrained.report.summary())
            if cfg.number_embeddings:
                state = _with_number_embeddings(state, shardings, cfg.shards)
        step_fn = make_train_step(
            graphdef, opt_cfg, shardings, mesh, seed=cfg.seed, ema_decay=cfg.ema_decay, fast_compile=cfg.fast_compile
        )
        meta = {"model_config": model_cfg.to_dict(), "manifest": manifest, "preset": cfg.config}
        validator = _make_validator(cfg, model_cfg, graphdef, manifest)

        def save(step: int) -> None:
            ckpt.save(
                mngr,
                step,
                params=state.params,
                opt_state=state.opt_state,
                ema_params=state.ema_params,
                loader_state=loader.state(),
                meta=meta,
            )

        last: dict[str, float] = {}
        pending: list[dict[str, Array]] = []
        t_last, n_timed = None, 0
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress, desc="train")
        for step in bar:
            obs, actions, pad = device_batch(next(loader), mesh)
            state, m = step_fn(state, obs, actions, pad)
            pending.append(m)
            done = step + 1
            if t_last is None:  # the first step compiles; rates count from its end
                jax.block_until_ready(m)
                t_last, n_timed = time.perf_counter(), 0
            else:
                n_timed += 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                host = jax.device_get(pending)
                pending = []
                now = time.perf_counter()
                rate = n_timed / (now - t_last) if n_timed else float("nan")
                t_last, n_timed = now, 0
                last = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
                last["learning_rate"] = float(host[-1]["learning_rate"])
                last = {"step": done, **last, "steps_per_s": rate, "samples_per_s": rate * cfg.batch_size}
                if validator is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
                    last.update(validator(state.params))
                    t_last = time.perf_counter()  # validation time is not training time
                if is_main:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps({k: None if v != v else v for k, v in last.items()}) + "\n")  # NaN -> null
                text = _format(last) + (_format_val(last) if "val_flow_loss" in last else "")
                tqdm.write(text) if cfg.progress else print(text)
                if on_log is not None:
                    on_log(last)
            if done % cfg.save_every == 0 or done == cfg.steps:
                save(done)
        mngr.wait_until_finished()
        if last:
            print(f"trained to step {cfg.steps}: flow {last['flow_loss']:.4f}, fast {last['fast_loss']:.4f}, "
                  f"FAST accuracy {last['fast_accuracy']:.3f}; checkpoint and metrics.jsonl in {out}")
        return last
    finally:
        mngr.close()
        loader.close()


def enable_compilation_cache(path: str | Path, min_compile_time_s: float = 0.5) -> None:
    """Keep compiled XLA programs under `path`: a later compile of the same program (another run, another
    process, or a re-created jitted function) loads it instead. CPU compiles of this model take tens of seconds."""
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    compilation_cache.reset_cache()  # the cache is set up once per process; pick up the new directory


def load_metrics(checkpoint_dir: str | Path) -> list[dict[str, float]]:
    path = Path(checkpoint_dir) / ckpt.METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measure_step_throughput(
    shards: str | Path, *, config: str = "tiny", batch_size: int = 32, steps: int = 10, fsdp_devices: int = 1, seed: int = 0
) -> dict[str, float]:
    """Samples/s the jitted train step consumes (compile excluded), on one fixed batch from the shards."""
    from ki_data.schema import load_manifest

    model_cfg = model_config(config, load_manifest(shards))
    opt_cfg = OptimizerConfig.for_preset(config)
    mesh = make_mesh(fsdp_devices)
    state, shardings, graphdef = init_train_state(model_cfg, make_optimizer(opt_cfg), mesh, seed=seed, ema=False)
    with ShardLoader(shards, "train", LoaderConfig(batch_size=batch_size, seed=seed), process_index=0, process_count=1) as ld:
        obs, actions, pad = device_batch(next(ld), mesh)
    step_fn = make_train_step(graphdef, opt_cfg, shardings, mesh, seed=seed, ema_decay=None)
    state, m = step_fn(state, obs, actions, pad)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step_fn(state, obs, actions, pad)
    jax.block_until_ready(m)
    dt = time.perf_counter() - t0
    return {"batch_size": batch_size, "steps": steps, "seconds": dt, "steps_per_s": steps / dt, "samples_per_s": steps * batch_size / dt}
