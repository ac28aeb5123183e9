"""Training: the train state, the jitted step on a (data, fsdp) device mesh, and the loop over the shards.

`train(TrainConfig) -> final metrics` is `setup(cfg) -> Run` (every check, then the state, loader, checkpoint
manager and log) followed by `loop(run)`; `pipelines/train.py` only parses options (or a recipe) into a `TrainConfig`.
Presets fix the architecture; everything the data decides (horizon, action dim, cameras, token lengths, image size,
vocabulary) comes from the shards' manifest, and an explicit value or a resumed checkpoint that disagrees is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import shutil
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float
from tqdm import tqdm

from ki_data.artifacts import DataArtifacts
from ki_data.loader import LoaderConfig, ShardLoader
from ki_data.manifest import Manifest
from ki_model import checkpoint as ckpt
from ki_model.checkpoint import CheckpointError
from ki_model.compile import compiler_options
from ki_model.config import COMPUTE_ONLY_FIELDS, ConfigError, Pi05KIConfig
from ki_model.lora import join_frozen, split_frozen
from ki_model.observation import Observation, pad_action_dim
from ki_model.optimizer import SIDES, OptimizerConfig, Params, make_optimizer, make_schedule
from ki_model.pi05_ki import param_group
from ki_model.sharding import MeshError, batch_sharding, make_mesh, param_shardings
from ki_model.tracking import Tracker, WandbError, format_losses, format_metrics, open_tracker
from ki_model.tracking import load_metrics as load_metrics  # re-exported: callers read a run's figures here
from ki_model.train_config import TrainConfig
from ki_model.warm_start import KiCheckpoint, is_ki_init
from ki_model.weights import PretrainedCheckpoint, init_model_config, load_init


class TrainError(ValueError):
    """Training cannot start as asked (shards contradict an option or a checkpoint, directory in the way, ...)."""


# Not checked at run time (see Observation): eval_shape and jit rebuild it with stand-in leaves (ShapeDtypeStruct,
# shardings).
@typing.no_type_check
@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Params
    opt_state: optax.OptState
    ema_params: Params | None


# ---------------------------------------------------------------------------------------------------------------
# Model config from a preset and the manifest


def model_config(preset: str, manifest: Manifest, *, explicit: dict[str, Any] | None = None, **overrides: Any) -> Pi05KIConfig:
    """The preset's architecture with the data-dependent fields from the manifest.

    `explicit` holds values the user gave on the command line for the manifest's model fields; any that disagrees
    with the manifest is refused (a model trained on other shapes than its data would silently be wrong).
    """
    data = manifest.model_fields()
    if overrides.get("action_dim", data["action_dim"]) < data["action_dim"]:
        raise TrainError(f"the model's action_dim {overrides['action_dim']} is smaller than the shards' "
                         f"{data['action_dim']} (it may be larger: actions are zero-padded to it)")
    data["action_dim"] = overrides.pop("action_dim", data["action_dim"])
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
    try:
        return Pi05KIConfig.preset(preset, **data, **overrides)
    except ConfigError as e:
        raise TrainError(str(e)) from None


def data_model_config(preset: str, data: DataArtifacts, **kw: Any) -> Pi05KIConfig:
    """`model_config` for these shards, with the FAST cross-entropy's logits only where some row can have a target
    (`fast_target_slots` from the manifest's summary; the trainer checks every batch against it)."""
    return model_config(preset, data.manifest, fast_target_slots=data.max_fast_targets(), **kw)


def check_resume_config(saved: Pi05KIConfig, wanted: Pi05KIConfig) -> None:
    a, b = saved.to_dict(), wanted.to_dict()
    for key in a:
        if a[key] != b[key] and key not in COMPUTE_ONLY_FIELDS:
            raise TrainError(f"cannot resume: the checkpoint's model has {key} = {a[key]!r}, this run asks {b[key]!r}")


# ---------------------------------------------------------------------------------------------------------------
# State and step


def abstract_model(config: Pi05KIConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract nnx.Param state) without allocating any weight."""
    model = nnx.eval_shape(lambda: config.create(nnx.Rngs(0)))
    return nnx.split(model, nnx.Param)


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
    p_shard = nnx.to_pure_dict(param_shardings(abstract_params, mesh))
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
    """Shardings for an optimizer state: a leaf whose key path ends with a parameter's path (Adam's moments, inside
    whatever wrappers the optimizer adds) gets that parameter's sharding; counters and the like get `default`."""
    by_path = {tuple(map(str, path)): s for path, s in jax.tree_util.tree_leaves_with_path(p_shard)}
    depth = max(len(k) for k in by_path)

    def one(path: tuple, leaf: Any) -> NamedSharding:
        keys = tuple(map(str, path))
        for n in range(min(depth, len(keys)), 0, -1):
            s = by_path.get(keys[-n:])
            if s is not None and len(s.spec) <= len(getattr(leaf, "shape", ())):
                return s
        return default

    return jax.tree_util.tree_map_with_path(one, tree)


def _micro_batches(tree: Any, n: int) -> Any:
    """[b, ...] -> [n, b/n, ...], micro-batch i = rows i, i+n, i+2n, ...: strided, so that every device (which holds
    a contiguous block of the batch) contributes equally to every micro-batch and nothing moves between devices."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), tree)


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
    *,
    grad_accum: int = 1,
) -> tuple[TrainState, dict[str, Array]]:
    rng = jax.random.fold_in(base_key, state.step)
    # LoRA fine-tuning: no gradient for the frozen (bfloat16) base weights (ki_model.lora).
    trainable, frozen = split_frozen(state.params)

    def loss_fn(train_params: Params) -> tuple[Array, dict[str, Array]]:
        model = nnx.merge(graphdef, join_frozen(train_params, frozen))
        out = model.compute_loss(rng, obs, actions, action_is_pad)
        return out["total"], out

    if grad_accum == 1:
        grads, out = jax.grad(loss_fn, has_aux=True)(trainable)
    else:
        grads, out = _accumulated_grads(graphdef, trainable, frozen, rng, obs, actions, action_is_pad, grad_accum)
    grads = join_frozen(grads, jax.tree.map(jnp.zeros_like, frozen))  # the optimizer ignores these (set_to_zero)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = join_frozen(split_frozen(optax.apply_updates(state.params, updates))[0], frozen)
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
    for side in SIDES:  # the norm each side's clip sees
        metrics[f"grad_norm_{side}"] = optax.tree.norm({k: g for k, g in grads.items() if param_group((k,)) == side})
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics


def _accumulated_grads(
    graphdef: nnx.GraphDef, params: Params, frozen: Params, rng: jax.Array, obs: Observation,
    actions: Float[Array, "b h d"], action_is_pad: Bool[Array, "b h"], n: int,
) -> tuple[Params, dict[str, Array]]:
    """Gradients and losses averaged over n micro-batches, one at a time in a `lax.scan` (the activations of one
    micro-batch live at a time). The (noise, time) draws are those of the whole batch (as `compute_loss` draws
    them), cut like the rows, so the step equals one step on the whole batch whenever every micro-batch holds as
    many FAST targets and real action steps (each loss is a mean over those). `params`: the trainable ones."""
    noise, time = nnx.merge(graphdef, join_frozen(params, frozen))._draw_noise_time(rng, actions)

    def grads_of(batch: tuple) -> tuple[Params, dict[str, Array]]:
        def loss_fn(p: Params) -> tuple[Array, dict[str, Array]]:
            out = nnx.merge(graphdef, join_frozen(p, frozen)).losses_given_noise(*batch)
            return out["total"], out

        return jax.grad(loss_fn, has_aux=True)(params)

    def micro(acc: tuple[Params, dict[str, Array]], batch: tuple) -> tuple[tuple[Params, dict[str, Array]], None]:
        return jax.tree.map(lambda a, x: a + x / n, acc, grads_of(batch)), None

    batches = _micro_batches((obs, actions, noise, time, action_is_pad), n)
    shapes = jax.eval_shape(grads_of, jax.tree.map(lambda x: x[0], batches))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # None (frozen) leaves stay None
    (grads, out), _ = jax.lax.scan(micro, zeros, batches)
    return grads, out


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
    grad_accum: int = 1,
) -> Callable[[TrainState, Observation, Array, Array], tuple[TrainState, dict[str, Array]]]:
    """The jitted step; `grad_accum` > 1 averages the gradients of that many micro-batches of each batch (the
    optimizer, per-side clipping included, then sees the accumulated gradients)."""
    fn = functools.partial(
        _train_step, graphdef, make_optimizer(opt_cfg), make_schedule(opt_cfg), ema_decay, step_key(seed),
        grad_accum=grad_accum,
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


def check_fast_targets(batch: dict[str, np.ndarray], slots: int | None, shards: str) -> None:
    """Refuses a batch with a row of more FAST targets than the model computes logits for (`fast_target_slots`,
    from the manifest's summary): its loss would silently leave targets out."""
    if slots is None:
        return
    counts = np.asarray(batch["token_loss_mask"], bool)[:, 1:].sum(axis=1)
    if counts.max(initial=0) > slots:
        i = int(np.argmax(counts))
        raise TrainError(
            f"{shards}: the row of episode {int(batch['episode_index'][i])}, frame {int(batch['frame_index'][i])} "
            f"has {int(counts[i])} FAST targets (token_loss_mask), more than the {slots} its manifest's summary "
            f"allows (fast_tokens_per_chunk max); the manifest does not describe these shards: preprocess again"
        )


def device_batch(
    batch: dict[str, np.ndarray], mesh: Mesh, action_dim: int | None = None
) -> tuple[Observation, Array, Array]:
    """Host batch (this process's rows) -> global arrays sharded over the batch axes; actions zero-padded to the
    model's `action_dim` when it is larger than the dataset's."""
    sharding = batch_sharding(mesh)
    obs = Observation.from_batch(batch)
    put = lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x))  # noqa: E731
    actions = batch["actions"].astype(np.float32)
    return (
        jax.tree.map(put, obs),
        put(actions if action_dim is None else pad_action_dim(actions, action_dim)),
        put(batch["action_is_pad"].astype(bool)),
    )


# ---------------------------------------------------------------------------------------------------------------
# Option checks and directory policy: each refuses before anything is computed or written.


def check_options(cfg: TrainConfig) -> None:
    """Options that contradict each other (`cfg` resolved; nothing read yet)."""
    opt = cfg.optimizer
    if opt.decay_steps <= opt.warmup_steps:
        raise TrainError(f"--decay-steps {opt.decay_steps} must exceed the {opt.warmup_steps} warm-up steps "
                         f"(--warmup-steps)")
    if cfg.number_embeddings and cfg.init:
        raise TrainError("--number-embeddings is a prior for a backbone trained from scratch; --init loads "
                         "the checkpoint's own embeddings")
    if cfg.eval_every and (cfg.eval_every < 0 or cfg.eval_every % cfg.log_every):
        raise TrainError(f"--eval-every {cfg.eval_every} must be a positive multiple of --log-every {cfg.log_every}")
    if cfg.grad_accum < 1:
        raise TrainError(f"--grad-accum {cfg.grad_accum} must be at least 1")


def check_data(cfg: TrainConfig, manifest: Manifest) -> None:
    """Options the shards cannot serve."""
    if cfg.eval_every and not manifest.splits.get("val"):
        raise TrainError(f"--eval-every: the shards in {cfg.shards} have no validation episodes")


def run_model_config(cfg: TrainConfig, manifest: Manifest) -> Pi05KIConfig:
    """The preset with the run's model options and the manifest's shapes; with `--init openpi:PATH` the checkpoint
    decides the architecture (also on resume, to match the saved one); `--init ki:DIR` must match this run's
    (checked when it is opened)."""
    model_cfg = data_model_config(cfg.config, DataArtifacts.open(cfg.shards, manifest), explicit=cfg.explicit(),
                                  **cfg.model.fields())
    if not cfg.init or is_ki_init(cfg.init):
        return model_cfg
    try:
        return init_model_config(cfg.init, model_cfg)
    except CheckpointError as e:
        raise TrainError(f"--init {cfg.init}: {e}") from e


def open_init(cfg: TrainConfig, model_cfg: Pi05KIConfig) -> PretrainedCheckpoint | KiCheckpoint:
    """The checked `--init` checkpoint (nothing read yet); its tokenizer must be the shards' text tokenizer."""
    try:
        if is_ki_init(cfg.init):
            return KiCheckpoint(cfg.init, model_cfg, cfg.shards)
        pretrained = load_init(cfg.init, model_cfg)
        pretrained.check_text_tokenizer(Path(cfg.shards) / "tokenizer" / "text.model")
    except CheckpointError as e:
        raise TrainError(f"--init {cfg.init}: {e}") from e
    return pretrained


def run_mesh(cfg: TrainConfig) -> Mesh:
    """The (data, fsdp) mesh over every device; the batch and its micro-batches must split over it."""
    try:
        mesh = make_mesh(cfg.fsdp_devices)
    except MeshError as e:
        raise TrainError(str(e)) from None
    if cfg.batch_size % mesh.size:
        raise TrainError(f"--batch-size {cfg.batch_size} is not divisible by the {mesh.size} devices")
    if cfg.batch_size % (cfg.grad_accum * mesh.size):
        raise TrainError(f"--grad-accum {cfg.grad_accum}: --batch-size {cfg.batch_size} must split into that many "
                         f"micro-batches, each divisible by the {mesh.size} devices")
    return mesh


def check_output_dir(cfg: TrainConfig, model_cfg: Pi05KIConfig) -> None:
    """A new run needs an empty directory (or --overwrite); a resumed one a checkpoint of the same data and model."""
    out = Path(cfg.checkpoint_dir)
    if not cfg.resume:
        if out.exists() and any(out.iterdir()) and not cfg.overwrite:
            raise TrainError(f"{out} is not empty; pass --resume to continue it or --overwrite to start over")
        return
    if not (out / ckpt.STEPS).is_dir():
        raise TrainError(f"--resume: {out} holds no checkpoint")
    try:
        ckpt.check_same_data(out, cfg.shards, doing="resume")
    except CheckpointError as e:
        raise TrainError(str(e)) from None
    check_resume_config(ckpt.load_model_config(out), model_cfg)


def start_output_dir(cfg: TrainConfig, model_cfg: Pi05KIConfig) -> None:
    """(Re)makes the directory of a new run with what a policy needs besides the weights: the shards' artifacts and
    the two configs. Process 0 writes; the others wait for it."""
    if jax.process_index() == 0:
        out = Path(cfg.checkpoint_dir)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        ckpt.copy_artifacts(cfg.shards, out)
        (out / ckpt.MODEL_CONFIG).write_text(model_cfg.to_json())
        ckpt.write_json(out / ckpt.TRAIN_CONFIG, cfg.to_dict())
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("ki: checkpoint directory ready")


# ---------------------------------------------------------------------------------------------------------------
# The initial state: fresh (with --init weights) or restored


def fresh_state(
    cfg: TrainConfig, model_cfg: Pi05KIConfig, tx: optax.GradientTransformation, mesh: Mesh,
    pretrained: PretrainedCheckpoint | KiCheckpoint | None,
) -> tuple[TrainState, TrainState, nnx.GraphDef]:
    """(state, its shardings, graphdef) of a new run, with the `--init` weights in place."""
    state, shardings, graphdef = init_train_state(model_cfg, tx, mesh, seed=cfg.seed, ema=cfg.ema_decay is not None)
    if pretrained is not None:
        # In place, tensor by tensor, each keeping its sharding; the EMA starts from the loaded weights.
        try:
            params = pretrained.apply_to_params(state.params, progress=cfg.progress)
        except CheckpointError as e:
            raise TrainError(f"--init {cfg.init}: {e}") from e
        state = state.replace(params=params, ema_params=None)
        if cfg.ema_decay is not None:
            state = state.replace(ema_params=jax.device_put(jax.tree.map(jnp.copy, params), shardings.params))
        print(pretrained.report.summary())
    if cfg.number_embeddings:
        state = _with_number_embeddings(state, shardings, cfg.shards)
    return state, shardings, graphdef


def restored_state(
    cfg: TrainConfig, model_cfg: Pi05KIConfig, tx: optax.GradientTransformation, mesh: Mesh, mngr: Any,
    loader: ShardLoader,
) -> tuple[TrainState, TrainState, nnx.GraphDef, int]:
    """(state, shardings, graphdef, step) of the latest checkpoint; the loader continues where it was."""
    out = Path(cfg.checkpoint_dir)
    ema = cfg.ema_decay is not None
    start = ckpt.latest_step(mngr, out)
    shardings, graphdef = state_shardings(model_cfg, tx, mesh, ema=ema)
    target = abstract_train_state(model_cfg, tx, shardings, ema=ema)
    restored = ckpt.restore_train(mngr, start, abstract_params=target.params, abstract_opt_state=target.opt_state,
                                  abstract_ema=target.ema_params)
    loader.restore(restored["loader"])
    state = TrainState(step=jax.device_put(jnp.asarray(start, jnp.int32), shardings.step), params=restored["params"],
                       opt_state=restored["opt_state"], ema_params=restored.get("ema_params"))
    print(f"resumed from {out} at step {start}")
    return state, shardings, graphdef, start


def _with_number_embeddings(state: TrainState, shardings: TrainState, shards: str) -> TrainState:
    """The fresh state with the number tokens' embeddings set from their values (EMA too), keeping the sharding."""
    from ki_data import TextTokenizer
    from ki_data.schema import TEXT_TOKENIZER_FILE
    from ki_model.number_embeddings import apply_number_embeddings

    text = TextTokenizer.load(Path(shards) / TEXT_TOKENIZER_FILE)
    path = ("backbone", "embedder", "input_embedding")

    def replace(params: Params) -> tuple[Params, int]:
        table, changed = apply_number_embeddings(np.asarray(jax.device_get(params[path[0]][path[1]][path[2]])), text)
        sharding = shardings.params[path[0]][path[1]][path[2]]
        new = jax.tree.map(lambda x: x, params)  # a copy of the nesting; leaves shared
        new[path[0]][path[1]][path[2]] = jax.device_put(jnp.asarray(table), sharding)
        return new, changed

    params, changed = replace(state.params)
    print(f"--number-embeddings: {changed} number tokens start from a code of their value")
    ema = replace(state.ema_params)[0] if state.ema_params is not None else None
    return state.replace(params=params, ema_params=ema)


def make_validator(
    cfg: TrainConfig, model_cfg: Pi05KIConfig, graphdef: nnx.GraphDef
) -> Callable[[Params], dict[str, float]] | None:
    """`params -> {val_*: figure}` for --eval-every (None: never): the one place training calls validation."""
    if not cfg.eval_every:
        return None
    from ki_model.validation import Validator  # imports the evaluation code only when asked

    return Validator(cfg.shards, model_cfg, graphdef, batches=cfg.eval_batches, batch_size=cfg.batch_size,
                     seed=cfg.seed, compiler_options=compiler_options(cfg.fast_compile))


# ---------------------------------------------------------------------------------------------------------------
# Setup and the loop


@dataclasses.dataclass
class Run:
    """Everything the loop touches, made by `setup`; closing it closes the loader, the checkpoint manager and the
    tracker (a context manager: `with setup(cfg) as run`)."""

    config: TrainConfig  # resolved
    model_config: Pi05KIConfig
    mesh: Mesh
    state: TrainState
    step_fn: Callable[[TrainState, Observation, Float[Array, "b h d"], Bool[Array, "b h"]],
                      tuple[TrainState, dict[str, Float[Array, ""]]]]
    start: int  # steps already taken (a resumed run's checkpoint)
    loader: ShardLoader
    manager: Any  # orbax CheckpointManager
    tracker: Tracker
    validator: Callable[[Params], dict[str, float]] | None
    meta: dict[str, Any]  # saved with every checkpoint
    _closing: contextlib.ExitStack

    def save(self, step: int) -> None:
        ckpt.save(self.manager, step, params=self.state.params, opt_state=self.state.opt_state,
                  ema_params=self.state.ema_params, loader_state=self.loader.state(), meta=self.meta)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._closing.__exit__(*exc)


def setup(cfg: TrainConfig) -> Run:
    """Checks every option against the others, the shards, `--init` and the output directory, then builds the run.
    The whole initial state (with `--init` weights) exists before the directory is touched: a refusal or failure up
    to there leaves it as it was."""
    cfg = cfg.resolved()
    check_options(cfg)
    if cfg.verify:  # damaged shards leave the checkpoint directory alone
        from ki_data.verify import check_shards

        print(check_shards(cfg.shards, progress=cfg.progress).one_line())
    manifest = Manifest.load(cfg.shards)
    check_data(cfg, manifest)
    model_cfg = run_model_config(cfg, manifest)
    pretrained = open_init(cfg, model_cfg) if cfg.init and not cfg.resume else None
    mesh = run_mesh(cfg)
    check_output_dir(cfg, model_cfg)
    tx = make_optimizer(cfg.optimizer)
    if not cfg.resume:
        state, shardings, graphdef = fresh_state(cfg, model_cfg, tx, mesh, pretrained)
        start_output_dir(cfg, model_cfg)

    with contextlib.ExitStack() as closing:
        loader = closing.enter_context(ShardLoader(cfg.shards, "train", LoaderConfig(
            batch_size=cfg.batch_size, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, augment=cfg.augment,
            num_workers=cfg.num_workers)))
        manager = ckpt.manager(cfg.checkpoint_dir, max_to_keep=cfg.keep_checkpoints)
        closing.callback(manager.close)
        start = 0
        if cfg.resume:
            state, shardings, graphdef, start = restored_state(cfg, model_cfg, tx, mesh, manager, loader)
        step_fn = make_train_step(graphdef, cfg.optimizer, shardings, mesh, seed=cfg.seed, ema_decay=cfg.ema_decay,
                                  fast_compile=cfg.fast_compile, grad_accum=cfg.grad_accum)
        validator = make_validator(cfg, model_cfg, graphdef)
        tracker = start_tracking(cfg, model_cfg, resume_step=start if cfg.resume else None)
        closing.push(lambda exc_type, *_: tracker.close(failed=exc_type is not None))
        run = Run(config=cfg, model_config=model_cfg, mesh=mesh, state=state, step_fn=step_fn, start=start,
                  loader=loader, manager=manager, tracker=tracker, validator=validator,
                  meta={"model_config": model_cfg.to_dict(), "manifest": manifest.to_dict(), "preset": cfg.config},
                  _closing=closing.pop_all())
    return run


def start_tracking(cfg: TrainConfig, model_cfg: Pi05KIConfig, *, resume_step: int | None) -> Tracker:
    """metrics.jsonl, and the W&B run of --wandb with the run's two configs (process 0 writes)."""
    try:
        return open_tracker(Path(cfg.checkpoint_dir), write=jax.process_index() == 0, wandb_project=cfg.wandb,
                            config={"train": cfg.to_dict(), "model": model_cfg.to_dict()}, resume_step=resume_step)
    except WandbError as e:
        raise TrainError(str(e)) from None


def train(cfg: TrainConfig, *, on_log: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
    """Runs (or resumes) training up to `cfg.steps`; returns the last logged metrics.

    `on_log` is called with each logged metrics dict (tests use it to kill a run part-way).
    """
    with setup(cfg) as run:
        return loop(run, on_log=on_log)


def loop(run: Run, *, on_log: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
    """Step through the batches; every log_every steps average the figures (+ validation every eval_every) and log
    them, every save_every steps save. Returns the last logged figures."""
    cfg = run.config
    last: dict[str, float] = {}
    pending: list[dict[str, Float[Array, ""]]] = []  # device figures since the last log: one fetch, no sync per step
    clock = StepClock()
    for step in tqdm(range(run.start, cfg.steps), initial=run.start, total=cfg.steps, disable=not cfg.progress,
                     desc="train"):
        batch = next(run.loader)
        check_fast_targets(batch, run.model_config.fast_target_slots, cfg.shards)
        obs, actions, pad = device_batch(batch, run.mesh, run.model_config.action_dim)
        run.state, metrics = run.step_fn(run.state, obs, actions, pad)
        pending.append(metrics)
        clock.tick(metrics)
        done = step + 1

        if _due(done, cfg.log_every, cfg.steps):
            means = _host_means(pending)
            pending = []
            last = {"step": done, **means, **clock.rates(cfg.batch_size)}
            if run.validator is not None and _due(done, cfg.eval_every, cfg.steps):
                last.update(run.validator(run.state.params))
                clock.restart()  # validation time is not training time
            run.tracker.log(last)
            tqdm.write(format_metrics(last)) if cfg.progress else print(format_metrics(last))
            if on_log is not None:
                on_log(last)

        if _due(done, cfg.save_every, cfg.steps):
            run.save(done)

    run.manager.wait_until_finished()
    run.tracker.log_plots(cfg.steps)
    if last:
        print(f"trained to step {cfg.steps}: {format_losses(last)}; "
              f"checkpoint and metrics.jsonl in {cfg.checkpoint_dir}")
    return last


def _due(done: int, every: int, steps: int) -> bool:
    """Every `every` steps, and at the last step."""
    return done % every == 0 or done == steps


def _host_means(pending: list[dict[str, Float[Array, ""]]]) -> dict[str, float]:
    """Each figure averaged over the steps since the last log; the learning rate is the last step's."""
    host = jax.device_get(pending)
    means = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
    return means | {"learning_rate": float(host[-1]["learning_rate"])}


class StepClock:
    """Training rates between log lines. The first step compiles: rates count from its end."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.steps = 0

    def tick(self, metrics: dict[str, Float[Array, ""]]) -> None:
        if self.since is None:
            jax.block_until_ready(metrics)
            self.restart()
        else:
            self.steps += 1

    def restart(self) -> None:
        self.since, self.steps = time.perf_counter(), 0

    def rates(self, batch_size: int) -> dict[str, float]:
        """Steps and samples per second since the last call (NaN before any timed step); called after the logged
        figures were fetched, so that the steps they come from have finished."""
        now = time.perf_counter()
        rate = self.steps / (now - self.since) if self.steps else float("nan")
        self.since, self.steps = now, 0
        return {"steps_per_s": rate, "samples_per_s": rate * batch_size}
