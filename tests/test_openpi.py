"""openpi π0.5 checkpoints in: `openpi_config` + `load_openpi` on a checkpoint made by openpi's own code reproduce
openpi's outputs (shared/openpi_reference: tiny sizes, every weight random, float32), the real π0.5 tree maps onto
`Pi05KIConfig.pi05`, and damaged or foreign trees (written here with orbax from the reference) are refused by name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from ki_model import Observation, Pi05KIConfig, attention, gemma
from ki_model.checkpoint import CheckpointError
from ki_model.config import ConfigError, GemmaConfig, SiglipConfig
from ki_model.weights import (
    PALIGEMMA_VOCAB_SIZE,
    load_openpi,
    map_openpi,
    openpi_config,
    openpi_config_from_shapes,
    openpi_shapes,
    parse_init,
)

REPO = Path(__file__).resolve().parents[1]
# shared/ lies beside the repository (CI: a copy beside the clone; a worktree: further up).
REFERENCE = next((p / "shared" / "openpi_reference" for p in REPO.parents
                  if (p / "shared" / "openpi_reference" / "io.npz").is_file()), None)
CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
TOL = 1e-4


def reference() -> Path:
    assert REFERENCE is not None, f"shared/openpi_reference not found beside {REPO} or above it"
    return REFERENCE


def reference_config(path: Path | None = None) -> Pi05KIConfig:
    return openpi_config(path or reference() / "checkpoint", action_horizon=5, max_token_len=16, max_text_len=16,
                         cameras=CAMERAS, dtype="float32")


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    with np.load(reference() / "io.npz") as f:
        return dict(f)


@pytest.fixture(scope="module")
def model():
    config = reference_config()
    m = config.create(nnx.Rngs(0))
    report = load_openpi(reference() / "checkpoint", config).apply_to(m)
    assert report.num_arrays == 51 and report.stored_dtypes == ("float32",) and not report.value_suffix
    return m


def observation(io: dict[str, np.ndarray]) -> Observation:
    """openpi's inputs in our layout: uint8 images (openpi's float images are x/255*2-1 of these), every prompt
    token in the prefix."""
    tokens, mask = jnp.asarray(io["tokenized_prompt"]), jnp.asarray(io["tokenized_prompt_mask"])
    return Observation(
        images={c: jnp.asarray(io[f"image_uint8.{c}"]) for c in CAMERAS},
        image_masks={c: jnp.asarray(io[f"image_mask.{c}"]) for c in CAMERAS},
        tokenized_prompt=tokens, tokenized_prompt_mask=mask, token_ar_mask=jnp.zeros_like(mask),
        token_loss_mask=jnp.zeros_like(mask), text_prompt=tokens, text_prompt_mask=mask,
    )


def max_diff(ours, theirs, where=None) -> float:
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    assert ours.shape == theirs.shape
    if where is not None:
        ours, theirs = ours[where], theirs[where]
    return float(np.max(np.abs(ours - theirs)))


def test_openpi_config_reads_the_architecture_from_the_shapes():
    made = json.loads((reference() / "config.json").read_text())
    config = reference_config()
    g, e, s = made["gemma_variants"]["dummy"], made["gemma_variants"]["dummy_expert"], made["siglip"]
    assert config.backbone == GemmaConfig(**g) and config.expert == GemmaConfig(**e)
    assert config.vision == SiglipConfig(width=s["width"], depth=s["depth"], mlp_dim=s["mlp_dim"],
                                         num_heads=s["num_heads"], patch_size=s["patch_size"][0])
    assert config.image_size == s["image_size"][0] and config.tokens_per_image == s["tokens_per_image"]
    assert config.action_dim == made["Pi0Config"]["action_dim"] and config.vocab_size == made["vocab_size"]
    assert (config.action_horizon, config.cameras, config.dtype) == (5, CAMERAS, "float32")
    # Explicit sizes survive the JSON a checkpoint directory keeps.
    assert Pi05KIConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["backbone_variant"] == g


def test_reproduces_openpi_prefix_outputs(model, io):
    obs = observation(io)
    valid = io["prefix_mask"]
    tokens, ours_valid = model.embed_prefix(obs)
    assert np.array_equal(np.asarray(ours_valid), valid)
    cache = model.prefix_cache(obs)
    kv_valid = np.broadcast_to(valid[None], io["prefix_kv_k"].shape[:3])
    diffs = {
        "prefix_embeddings": max_diff(tokens, io["prefix_embeddings"], valid),
        "prefix_hidden": max_diff(cache.out, io["prefix_hidden"], valid),
        "prefix_logits": max_diff(model.backbone.embedder.decode(cache.out), io["prefix_logits"], valid),
        "prefix_kv_k": max_diff(cache.kv[0], io["prefix_kv_k"], kv_valid),
        "prefix_kv_v": max_diff(cache.kv[1], io["prefix_kv_v"], kv_valid),
    }
    print("max |ours - openpi|:", diffs)
    assert max(diffs.values()) <= TOL, diffs


def test_reproduces_openpi_velocity_loss_and_sampling(model, io):
    obs = observation(io)
    x_t, time = jnp.asarray(io["x_t"]), jnp.asarray(io["time"])
    cache = model.prefix_cache(obs)
    tokens, cond = model.embed_actions(x_t, time[:, None])  # one flow time per chunk: cond [b, 1, width]
    layout = attention.suffix_layout(cache.valid, model.config.action_horizon)
    (_, suffix_hidden), _ = gemma.forward([model.backbone, model.action_expert], [None, tokens],
                                          positions=layout.positions, mask=layout.mask, conds=[None, cond],
                                          cache=cache.kv)
    velocity = model.velocity(cache, x_t, time)
    flow_loss = jnp.mean(jnp.square(velocity - io["u_t"]), axis=-1)
    sampled = model.sample_actions(jax.random.key(0), obs, 10, noise=jnp.asarray(io["noise"]))
    diffs = {
        "adarms_cond": max_diff(cond[:, 0], io["adarms_cond"]),
        "suffix_hidden": max_diff(suffix_hidden, io["suffix_hidden"]),
        "v_t": max_diff(velocity, io["v_t"]),
        # The training pass ([I | prompt | A] at once) predicts the same velocity.
        "v_t (training pass)": max_diff(model.train_forward(obs, x_t[:, None], time[:, None]).velocity[:, 0], io["v_t"]),
        "flow_loss": max_diff(flow_loss, io["flow_loss"]),
        "sample_actions": max_diff(sampled, io["sample_actions"]),
    }
    print("max |ours - openpi|:", diffs)
    assert max(diffs.values()) <= TOL, diffs
    # The comparison means something: the outputs are O(1) and far from what a fresh model gives.
    fresh = model.config.create(nnx.Rngs(1)).sample_actions(jax.random.key(0), obs, 10, noise=jnp.asarray(io["noise"]))
    assert max_diff(fresh, io["sample_actions"]) > 0.1 and np.abs(io["v_t"]).max() > 1.0


def test_apply_to_params_writes_what_apply_to_writes(model):
    config = model.config
    fresh = config.create(nnx.Rngs(3))
    params = nnx.to_pure_dict(nnx.state(fresh, nnx.Param))
    out = load_openpi(reference() / "checkpoint", config).apply_to_params(params)
    assert out is params
    loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)


def test_the_real_pi05_tree_maps_completely_onto_the_pi05_config():
    tree = json.loads((reference() / "param_shapes_pi05.json").read_text())
    shapes = {p["path"]: tuple(p["shape"]) for p in tree["params"]}
    config = Pi05KIConfig.pi05(action_dim=32)
    mapping = map_openpi(shapes, config)
    abstract = nnx.eval_shape(lambda: config.create(nnx.Rngs(0)))
    ours = [v.get_value().shape for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))]
    print(f"real π0.5 tree: {mapping.num_arrays} of {len(shapes)} arrays -> {mapping.num_params} of {len(ours)} "
          f"parameters, {sum(int(np.prod(s)) for s in ours):,} values")
    assert mapping.num_arrays == len(shapes) == tree["num_leaves"] == 51
    assert mapping.num_params == len(ours)
    assert sum(int(np.prod(s)) for s in ours) == tree["num_values"] == sum(int(np.prod(s)) for s in shapes.values())
    assert openpi_shapes(config) == shapes
    # And the sizes read from those shapes are π0.5's named variants.
    read = openpi_config_from_shapes(shapes)
    assert (read.backbone, read.expert, read.vision) == (config.backbone, config.expert, config.vision)
    assert (read.image_size, read.action_dim, read.vocab_size) == (224, 32, 257152)


def test_named_presets_keep_their_json_and_bad_sizes_are_refused():
    tiny = Pi05KIConfig.tiny(action_horizon=4, action_dim=3, vocab_size=64)
    d = json.loads(tiny.to_json())
    assert (d["backbone_variant"], d["expert_variant"], d["vision_variant"]) == (
        "gemma_tiny", "gemma_tiny_expert", "siglip_tiny")
    explicit = Pi05KIConfig.tiny(action_horizon=4, action_dim=3, vocab_size=64, backbone_variant=tiny.backbone)
    assert explicit.backbone == tiny.backbone and Pi05KIConfig.from_json(explicit.to_json()) == explicit
    with pytest.raises(ConfigError, match="backbone_variant: explicit sizes need exactly the fields"):
        Pi05KIConfig.from_dict({**d, "backbone_variant": {"width": 64}})


# ---------------------------------------------------------------------------------------------------------------
# Variants of the reference checkpoint written with orbax


@pytest.fixture(scope="module")
def reference_tree() -> dict:
    """The reference's {"params": P} as numpy arrays, read as openpi's restore_params reads it."""
    path = reference() / "checkpoint" / "params"
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(item=meta, restore_args=restore_args))


def flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def nested(arrays: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for name, v in arrays.items():
        *parents, leaf = name.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def write_checkpoint(root: Path, arrays: dict[str, np.ndarray], *, top: str = "params", value: bool = False) -> Path:
    """An openpi checkpoint directory: root/params holding {top: P} (P from `arrays`, each leaf under `value` as a
    training state saves it)."""
    if value:
        arrays = {f"{n}/value": a for n, a in arrays.items()}
    root.mkdir(parents=True)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(root / "params", {top: nested(arrays)})
    return root


def loaded_params(root: Path, config: Pi05KIConfig):
    ckpt = load_openpi(root, config)
    return ckpt, dict(ckpt.tensors())


def test_value_suffixed_and_bfloat16_trees_load(reference_tree, tmp_path):
    arrays = flat(reference_tree["params"])
    config = reference_config()
    _, expected = loaded_params(reference() / "checkpoint", config)

    ckpt, got = loaded_params(write_checkpoint(tmp_path / "state", arrays, value=True), config)
    assert ckpt.report.value_suffix and ckpt.report.num_arrays == 51
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in expected)
    assert reference_config(tmp_path / "state") == config

    bf16 = {n: a.astype(ml_dtypes.bfloat16) for n, a in arrays.items()}
    ckpt, got = loaded_params(write_checkpoint(tmp_path / "bf16", bf16), config)
    assert ckpt.report.stored_dtypes == ("bfloat16",)
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in expected.items()}
    assert all(got[k].dtype == np.float32 and np.array_equal(got[k], rounded[k]) for k in expected)
    assert any(not np.array_equal(rounded[k], expected[k]) for k in expected)  # the rounding is visible


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("time_mlp_in/bias"), r"missing arrays: time_mlp_in/bias"),
        (lambda a: a.update({"PaliGemma/llm/layers/attn/extra_einsum/w": np.zeros((4, 3), "f4")}),
         r"unexpected arrays: PaliGemma/llm/layers/attn/extra_einsum/w"),
        (lambda a: a.update({"action_out_proj/bias": np.zeros((7,), "f4")}),
         r"wrong shape: action_out_proj/bias \(7,\) \(expected \(8,\)\)"),
        (lambda a: a.update({"PaliGemma/llm/layers/mlp_1/linear": np.zeros((4, 64, 32), "i4")}),
         r"not floating point: PaliGemma/llm/layers/mlp_1/linear \(int32\)"),
    ],
    ids=["missing", "unexpected", "misshaped", "integer"],
)
def test_a_wrong_tree_is_refused_by_name(reference_tree, tmp_path, change, message):
    arrays = flat(reference_tree["params"])
    change(arrays)
    with pytest.raises(CheckpointError, match=message):
        load_openpi(write_checkpoint(tmp_path / "bad", arrays), reference_config())


def test_foreign_and_damaged_checkpoints_are_refused(reference_tree, tmp_path):
    arrays = flat(reference_tree["params"])
    config = reference_config()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_openpi(tmp_path / "nowhere", config)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an openpi checkpoint: it has no params/"):
        load_openpi(tmp_path / "empty", config)
    with pytest.raises(CheckpointError, match="no top-level 'params'"):
        load_openpi(write_checkpoint(tmp_path / "other_root", arrays, top="model"), config)
    pi0 = {**arrays, "state_proj/kernel": np.zeros((8, 32), "f4")}
    with pytest.raises(CheckpointError, match="π0 checkpoint .*state_proj/kernel.*not π0.5"):
        openpi_config(write_checkpoint(tmp_path / "pi0", pi0))
    with pytest.raises(CheckpointError, match="vocab_size is 257152 but .* embeds 1024 tokens.*PaliGemma's text"):
        openpi_config(reference() / "checkpoint", vocab_size=257152)
    with pytest.raises(CheckpointError, match="image_size = 224 but .* has image_size = 32"):
        openpi_config(reference() / "checkpoint", image_size=224)
    # openpi's action tokens have no step embedding: a config that asks for one is refused, not left half loaded.
    with pytest.raises(CheckpointError, match="action_positions = True but .* has action_positions = False"):
        openpi_config(reference() / "checkpoint", action_positions=True)
    with pytest.raises(CheckpointError, match="differs from the one this checkpoint was checked against"):
        load_openpi(reference() / "checkpoint", config).apply_to(
            Pi05KIConfig.tiny(action_horizon=5, action_dim=8, vocab_size=1024).create(nnx.Rngs(0)))
    # A parameter tree of another architecture is refused the same way, before anything is written.
    other = nnx.to_pure_dict(nnx.state(
        Pi05KIConfig.tiny(action_horizon=5, action_dim=8, vocab_size=1024).create(nnx.Rngs(0)), nnx.Param))
    before = jax.tree.map(np.asarray, other)
    with pytest.raises(CheckpointError, match=r"parameters differ from those of the model this checkpoint was "
                                              r"checked against: \('action_expert', 'layers', 'attn', "):
        load_openpi(reference() / "checkpoint", config).apply_to_params(other)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(other),
                                                                 strict=True))

    # Truncated data files: the metadata still reads, the first array read names itself.
    damaged = tmp_path / "truncated"
    shutil.copytree(reference() / "checkpoint", damaged)  # shared/ is read-only: make the copy writable
    for p in [damaged, *damaged.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    for f in (damaged / "params").glob("ocdbt.process_0/d/*"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    ckpt = load_openpi(damaged, config)
    with pytest.raises(CheckpointError, match=r"cannot read array \S+ from .*truncated"):
        ckpt.apply_to(config.create(nnx.Rngs(0)))


def test_fused_qkv_trees_load(tmp_path):
    """openpi stores Q, K and V as one `qkv_einsum` [depth, 3, heads, width, head_dim] when every head has its own
    K/V: Q is its first entry, K and V the other two."""
    g = GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=2, num_kv_heads=2, head_dim=8)
    config = Pi05KIConfig.tiny(action_horizon=3, action_dim=2, vocab_size=50, backbone_variant=g, expert_variant=g)
    shapes = openpi_shapes(config)
    assert shapes["PaliGemma/llm/layers/attn/qkv_einsum_1/w"] == (2, 3, 2, 32, 8)
    rng = np.random.default_rng(0)
    arrays = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
    root = write_checkpoint(tmp_path / "qkv", arrays)
    assert (openpi_config(root).backbone, openpi_config(root).expert) == (g, g)
    params = dict(load_openpi(root, config).tensors())
    qkv = arrays["PaliGemma/llm/layers/attn/qkv_einsum/w"]
    assert np.array_equal(params[("backbone", "layers", "attn", "q_einsum")], qkv[:, 0])
    assert np.array_equal(params[("backbone", "layers", "attn", "kv_einsum")], qkv[:, 1:])


def test_parse_init_accepts_openpi():
    assert parse_init("openpi:/ckpt/pi05_base") == Path("/ckpt/pi05_base")
    with pytest.raises(CheckpointError, match="openpi:PATH"):
        parse_init("openpi:")


# ---------------------------------------------------------------------------------------------------------------
# pipelines.train --init openpi:PATH


def test_train_cli_refuses_an_openpi_checkpoint_of_another_vocabulary(demo_shards, tmp_path):
    """The reference embeds 1024 tokens, the demo shards use their own small tokenizer: one error line, and the
    checkpoint directory is left as it was."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.train", "--shards", str(demo_shards), "--checkpoint-dir", str(out),
         "--overwrite", "--steps", "1", "--init", f"openpi:{reference() / 'checkpoint'}"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env=dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "embeds 1024 tokens" in errors[0] and "PaliGemma's text tokenizer" in errors[0]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def paligemma_sized_tokenizer(base: Path, out: Path) -> Path:
    """A SentencePiece model with PaliGemma's 257152 pieces: `base`'s pieces, then unused ones (never produced), so
    that preprocessing lays the vocabulary out as for PaliGemma's tokenizer (FAST ids overlaid at its top)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(base.read_bytes())
    for i in range(PALIGEMMA_VOCAB_SIZE - len(proto.pieces)):
        proto.pieces.add(piece=f"<unused{i}>", score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED)
    out.write_bytes(proto.SerializeToString())
    return out


def test_train_starts_from_an_openpi_checkpoint(demo_dataset, demo_shards, tmp_path):
    """Shards in PaliGemma's vocabulary layout and an openpi-layout tree of random weights sized for them (sizes unlike
    any preset, 4 more action dimensions than the data, as openpi's 32 against a robot's 7): the run takes the
    checkpoint's architecture, trains on zero-padded actions and, with a zero learning rate, saves exactly its
    weights after one step; the Policy answers in the data's own dimensions."""
    from conftest import DEMO_REPO_ID, DEMO_SHARD_OPTIONS

    from ki_data.preprocess import PreprocessConfig, run_preprocess
    from ki_model import checkpoint as ckpt
    from ki_model.train import OptimizerConfig, TrainConfig, train

    tokenizer = paligemma_sized_tokenizer(demo_shards / "tokenizer" / "text.model", tmp_path / "tokenizer.model")
    shards = run_preprocess(PreprocessConfig(repo_id=DEMO_REPO_ID, output=str(tmp_path / "shards"), progress=False,
                                             text_tokenizer=str(tokenizer), **DEMO_SHARD_OPTIONS)).out_dir
    manifest = json.loads((shards / "manifest.json").read_text())
    assert (manifest["vocab_size"], manifest["skip_tokens"]) == (PALIGEMMA_VOCAB_SIZE, 128)
    sizes = Pi05KIConfig(
        action_horizon=manifest["action_horizon"], action_dim=manifest["action_dim"] + 4,
        vocab_size=manifest["vocab_size"], image_size=manifest["image_size"], max_token_len=manifest["max_token_len"],
        max_text_len=manifest["max_text_len"],
        backbone_variant=GemmaConfig(width=48, depth=1, mlp_dim=96, num_heads=4, num_kv_heads=1, head_dim=8),
        expert_variant=GemmaConfig(width=24, depth=1, mlp_dim=40, num_heads=4, num_kv_heads=1, head_dim=8),
        vision_variant=SiglipConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=16),
    )
    rng = np.random.default_rng(0)
    arrays = {n: rng.normal(0, 0.3, s).astype(np.float32) for n, s in openpi_shapes(sizes).items()}
    init = write_checkpoint(tmp_path / "openpi", arrays)
    out = tmp_path / "run"
    train(TrainConfig(shards=str(shards), checkpoint_dir=str(out), config="tiny", steps=1, batch_size=4,
                      save_every=1, num_workers=0, progress=False, fast_compile=True, init=f"openpi:{init}",
                      optimizer=OptimizerConfig(peak_lr=0.0, warmup_steps=1, decay_steps=10, decay_lr=0.0)))
    saved = ckpt.load_model_config(out)
    assert (saved.backbone, saved.expert, saved.vision) == (sizes.backbone, sizes.expert, sizes.vision)
    assert saved.action_dim == manifest["action_dim"] + 4
    abstract = nnx.eval_shape(lambda: saved.create(nnx.Rngs(0)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    params, step, _ = ckpt.restore_params(out, target)
    assert step == 1
    expected = dict(load_openpi(init, saved).tensors())
    for path, value in expected.items():
        node = params
        for key in path:
            node = node[key]
        assert np.array_equal(np.asarray(node), value), path

    from ki_data import inspect as ki_inspect
    from ki_model.observation import Observation
    from ki_model.policy import Policy

    policy = Policy.load(out)
    row = ki_inspect.load_row(ki_inspect.open_shards(shards))
    chunk = policy.sample_normalized(Observation.from_batch(row.as_batch()))
    assert chunk.shape == (1, manifest["action_horizon"], manifest["action_dim"]) and np.isfinite(chunk).all()
    assert policy.fast_decode_spec().action_dim == manifest["action_dim"]  # FAST covers the data's dimensions


def test_actions_are_zero_padded_to_the_model_dimension():
    from ki_model.observation import ObservationError, pad_action_dim

    chunk = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    padded = pad_action_dim(chunk, 5)
    assert padded.shape == (2, 3, 5) and np.array_equal(padded[..., :2], chunk) and not padded[..., 2:].any()
    assert pad_action_dim(chunk, 2) is not None and np.array_equal(pad_action_dim(chunk, 2), chunk)
    with pytest.raises(ObservationError, match="more than the model's 1"):
        pad_action_dim(chunk, 1)
