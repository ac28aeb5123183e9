"""The demo's KI recipe end to end on tiny data: the block's pose in the state (`--state-keys`), delta actions
(`--delta-actions`), stage 1 FAST-only (`--flow-loss-weight 0`), stage 2 from it (`--init ki-backbone:DIR`), and the
policy's two heads in closed loop (`pipelines.rollout --head fast`)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import DEMO_REPO_ID, DEMO_SHARD_OPTIONS

from ki_data.actions import DeltaSpecError, parse_delta_actions, to_absolute, to_relative
from ki_data.artifacts import DataArtifacts
from ki_data.manifest import Manifest
from ki_data.normalize import unnormalize
from ki_data.schema import read_rows

STATE_KEYS = ("observation.state", "observation.environment_state")


@pytest.fixture(scope="module")
def ki_shards(demo_dataset, tmp_path_factory) -> Path:
    """The demo recording with the block's pose in the state and the agent's x, y actions relative to its position."""
    from ki_data.preprocess import PreprocessConfig, run_preprocess

    out = tmp_path_factory.mktemp("ki_shards") / "out"
    cfg = PreprocessConfig(repo_id=DEMO_REPO_ID, output=str(out), progress=False, state_keys=STATE_KEYS,
                           delta_actions="x,y", **DEMO_SHARD_OPTIONS)
    return run_preprocess(cfg).out_dir


def _train(shards: Path, out: Path, **kw):
    from ki_model.optimizer import OptimizerConfig
    from ki_model.train import TrainConfig, train

    optimizer = OptimizerConfig(peak_lr=3e-3, warmup_steps=4, decay_steps=200, decay_lr=3e-4)
    cfg = TrainConfig(shards=str(shards), checkpoint_dir=str(out), steps=2, batch_size=8, log_every=1, save_every=2,
                      num_workers=0, progress=False, optimizer=optimizer, fast_compile=True, **kw)
    return train(cfg)


@pytest.fixture(scope="module")
def stage1(ki_shards, tmp_path_factory) -> tuple[Path, dict]:
    """Stage 1: the backbone trained on FAST tokens alone for 2 steps; (checkpoint, last metrics)."""
    from ki_model.compile import enable_compilation_cache

    enable_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache")
    out = tmp_path_factory.mktemp("stage1") / "ckpt"
    from ki_model.train_config import ModelOptions

    return out, _train(ki_shards, out, model=ModelOptions(flow_loss_weight=0.0))


@pytest.fixture(scope="module")
def stage2(ki_shards, stage1, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage2") / "ckpt"
    _train(ki_shards, out, init=f"ki-backbone:{stage1[0]}", seed=1)
    return out


# ------------------------------------------------------------------------------------------------ the data


def test_state_keys_and_delta_actions_are_in_the_manifest(ki_shards):
    m = Manifest.load(ki_shards)
    assert m.state_keys == STATE_KEYS and m.state_dim == 6
    assert m.state_names == ("x", "y", "block_x", "block_y", "block_sin", "block_cos")
    assert m.delta_actions == (0, 1)
    assert m.hold_still()[0] and m.action_state_dims() == (0, 1)
    rows = read_rows(m.shard_paths(ki_shards, "train")[0])
    assert rows["state"].shape[1] == 6


def test_stored_chunks_are_the_raw_chunks_minus_the_state(ki_shards, demo_dataset):
    data = DataArtifacts.open(ki_shards)
    m = data.manifest
    raw = pq.read_table(next((demo_dataset / "data").rglob("*.parquet"))).to_pydict()
    episode = np.asarray(raw["episode_index"])
    rows = read_rows(m.shard_paths(ki_shards, "train")[0])
    ep = int(rows["episode_index"][0])
    mine = np.flatnonzero(episode == ep)
    agent = np.asarray(raw["observation.state"], np.float32)[mine]
    action = np.asarray(raw["action"], np.float32)[mine]
    block = np.asarray(raw["observation.environment_state"], np.float32)[mine]
    horizon = m.action_horizon
    for r in np.flatnonzero(rows["episode_index"] == ep)[:5]:
        t = int(rows["frame_index"][r])
        want = action[np.minimum(np.arange(t, t + horizon), len(action) - 1)] - agent[t]
        stored = unnormalize(rows["actions"][r], data.norm_stats["actions"], m.norm_mode)
        np.testing.assert_allclose(stored, want, atol=1e-3)
        state = data.unnormalize_state(rows["state"][r])
        np.testing.assert_allclose(state, np.concatenate([agent[t], block[t]]), atol=1e-3)
        # Back to absolute units with the frame's state: the recorded actions.
        np.testing.assert_allclose(data.absolute_actions(rows["actions"][r], state),
                                   action[np.minimum(np.arange(t, t + horizon), len(action) - 1)], atol=1e-3)


def test_delta_transform_round_trip_and_masks():
    rng = np.random.default_rng(0)
    chunks, state = rng.normal(size=(4, 5, 3)).astype(np.float32), rng.normal(size=(4, 7)).astype(np.float32)
    spec = parse_delta_actions("2,-1", action_dim=3, state_dim=7, action_names=None, state_names=None)
    assert spec == (0, 1, -1)
    rel = to_relative(chunks, state, spec)
    np.testing.assert_array_equal(rel[..., 2], chunks[..., 2])
    np.testing.assert_allclose(rel[..., :2], chunks[..., :2] - state[:, None, :2], atol=1e-6)
    np.testing.assert_allclose(to_absolute(rel, state, spec), chunks, atol=1e-6)
    # Names map to the state dimension of the same name, wherever it sits.
    by_name = parse_delta_actions("y", action_dim=2, state_dim=3, action_names=("x", "y"), state_names=("y", "z", "x"))
    assert by_name == (-1, 0)
    assert parse_delta_actions(None, action_dim=2, state_dim=2, action_names=None, state_names=None) is None


@pytest.mark.parametrize(("mask", "message"), [
    ("1,1,1", "covers 3 action dimensions; the dataset's action has 2"),
    ("x,q", r"names \['q'\], which are not action dimensions"),
    ("3", "covers 3"),
])
def test_a_bad_delta_mask_is_refused_with_one_line(mask, message):
    with pytest.raises(DeltaSpecError, match=message):
        parse_delta_actions(mask, action_dim=2, state_dim=2, action_names=("x", "y"), state_names=("x", "y"))


def test_a_bad_mask_or_state_key_stops_preprocessing_before_writing(demo_dataset, tmp_path, capsys):
    from pipelines.preprocess import main

    out = tmp_path / "never"
    base = [DEMO_REPO_ID, "--output", str(out), "--no-progress"]
    assert main([*base, "--delta-actions", "1,1,1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ki/pusht_demo_tests" in err and "covers 3 action dimensions" in err
    assert main([*base, "--state-keys", "observation.state,observation.nope"]) == 2
    assert "'observation.nope'" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ the two stages


def test_stage1_trains_the_backbone_alone(stage1):
    out, last = stage1
    assert np.isnan(last["flow_loss"]) and np.isfinite(last["fast_loss"])
    assert last["grad_norm_action_expert"] == 0.0 and last["grad_norm_backbone"] > 0.0
    assert json.loads((out / "model_config.json").read_text())["flow_loss_weight"] == 0.0


def _params(directory: Path) -> dict:
    from ki_model import checkpoint as ckpt
    from ki_model.train import abstract_model

    config = ckpt.load_model_config(directory)
    _, abstract = abstract_model(config)
    from flax import nnx

    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(abstract))
    return ckpt.restore_params(directory, target, prefer_ema=False)[0]


def _fresh_and_loaded(ki_shards: Path, spec: str, seed: int):
    """(fresh params, the same with `--init spec` written in), at the stage-2 model config."""
    from ki_model import checkpoint as ckpt
    from ki_model.optimizer import OptimizerConfig, make_optimizer
    from ki_model.sharding import make_mesh
    from ki_model.train import init_train_state
    from ki_model.warm_start import KiCheckpoint

    config = ckpt.load_model_config(Path(spec.split(":", 1)[1]))
    config = type(config).from_dict({**config.to_dict(), "flow_loss_weight": 1.0})
    state, _, _ = init_train_state(config, make_optimizer(OptimizerConfig()), make_mesh(1), seed=seed, ema=False)
    fresh = jax.tree.map(np.asarray, state.params)
    loaded = KiCheckpoint(spec, config, ki_shards).apply_to_params(state.params)
    return fresh, jax.tree.map(np.asarray, loaded)


def _by_side(tree: dict) -> dict[str, list[np.ndarray]]:
    from ki_model.pi05_ki import param_group

    out: dict[str, list] = {"backbone": [], "action_expert": []}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[param_group(tuple(getattr(k, "key", k) for k in path))].append(np.asarray(leaf))
    return out


def test_init_ki_backbone_copies_vision_and_backbone_and_starts_a_fresh_expert(ki_shards, stage1):
    saved = _by_side(_params(stage1[0]))
    fresh, loaded = _fresh_and_loaded(ki_shards, f"ki-backbone:{stage1[0]}", seed=1)
    fresh, loaded = _by_side(fresh), _by_side(loaded)
    for a, b in zip(loaded["backbone"], saved["backbone"], strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(loaded["action_expert"], fresh["action_expert"], strict=True):
        np.testing.assert_array_equal(a, b)
    # Stage 1 moved the backbone: what was copied is not the fresh initialisation.
    assert any(not np.array_equal(a, b) for a, b in zip(saved["backbone"], fresh["backbone"], strict=True))


def test_init_ki_copies_every_weight(ki_shards, stage1):
    saved = jax.tree.leaves(_params(stage1[0]))
    _, loaded = _fresh_and_loaded(ki_shards, f"ki:{stage1[0]}", seed=1)
    for a, b in zip(jax.tree.leaves(loaded), saved, strict=True):
        np.testing.assert_array_equal(a, b)


def test_stage2_trains_with_insulation_from_stage1(stage2, stage1):
    train_cfg = json.loads((stage2 / "train_config.json").read_text())
    assert train_cfg["init"] == f"ki-backbone:{stage1[0]}"
    model = json.loads((stage2 / "model_config.json").read_text())
    assert model["insulation"] is True and model["flow_loss_weight"] == 1.0
    metrics = [json.loads(line) for line in (stage2 / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["flow_loss"]) and np.isfinite(m["fast_loss"]) for m in metrics)


def test_init_ki_is_refused_for_other_data_or_architecture(stage1, demo_shards, ki_shards, tmp_path, capsys):
    from pipelines.train import main

    out = tmp_path / "never"
    base = ["--checkpoint-dir", str(out), "--steps", "1", "--batch-size", "4", "--workers", "0"]
    # Other data: the stage-1 checkpoint read 6 state values, these shards 2 (and another state).
    assert main(["--shards", str(demo_shards), *base, "--init", f"ki-backbone:{stage1[0]}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "state_dim" in err and str(stage1[0]) in err
    # Another architecture: 8-px patches instead of the preset's 16.
    assert main(["--shards", str(ki_shards), *base, "--init", f"ki:{stage1[0]}",
                 "--vision-variant", "siglip_tiny_p8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "another architecture" in err and "vision_variant" in err
    assert main(["--shards", str(ki_shards), *base, "--init", f"ki:{tmp_path / 'nothing'}"]) == 2
    assert "not a ki training checkpoint" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ policy, server, rollout


def _frame(**drop) -> dict:
    frame = {"task": "Push the T-shaped block onto the T-shaped target.",
             "observation.image": np.zeros((96, 96, 3), np.uint8),
             "observation.state": np.array([100.0, 200.0], np.float32),
             "observation.environment_state": np.array([250.0, 260.0, 0.0, 1.0], np.float32)}
    return {k: v for k, v in frame.items() if k not in drop}


def test_the_policy_takes_the_state_keys_and_answers_in_absolute_units(stage2):
    from ki_model.policy import FrameError, Policy

    policy = Policy.load(stage2, seed=3, fast_compile=True)
    frame = _frame()
    np.testing.assert_array_equal(policy.frame_state(frame), [100, 200, 250, 260, 0, 1])
    # The policy's first draw is fold_in(key(seed), 0): sample it directly, then through infer.
    stored = policy.sample_normalized(policy.prepare(frame), jax.random.fold_in(jax.random.key(3), 0))[0]
    chunk = policy.infer(frame)
    relative = policy.data.unnormalize_actions(stored)
    np.testing.assert_allclose(chunk, relative + np.array([100.0, 200.0]), atol=1e-4)
    assert chunk.shape == (policy.config.action_horizon, 2)
    with pytest.raises(FrameError, match="observation.environment_state"):
        policy.infer(_frame(**{"observation.environment_state": None}))
    fast = policy.infer_fast(frame)
    assert fast.shape == chunk.shape and np.isfinite(fast).all()


def test_the_server_asks_for_every_state_key(stage2):
    from ki_model.policy import Policy
    from ki_model.serving import RequestError, frame_from_request, policy_metadata

    meta = policy_metadata(Policy.load(stage2, fast_compile=True))
    assert meta["state_keys"] == list(STATE_KEYS) and meta["state_dim"] == 6
    frame = _frame()
    assert set(frame_from_request(frame, meta)) == set(frame)
    with pytest.raises(RequestError, match="missing 'observation.environment_state'"):
        frame_from_request({k: v for k, v in frame.items() if k != "observation.environment_state"}, meta)
    short = frame | {"observation.environment_state": np.zeros(3, np.float32)}
    with pytest.raises(RequestError, match="has 5 values; the policy takes 6"):
        frame_from_request(short, meta)


@pytest.mark.parametrize("head", ["flow", "fast"])
def test_rollout_with_either_head(stage2, tmp_path, head):
    from ki_sim.rollout import RolloutConfig, format_table, run_rollout

    report = run_rollout(stage2, tmp_path / head, RolloutConfig(episodes=1, max_steps=6, video_episodes=0, head=head),
                         progress=False, fast_compile=True)
    assert report["setup"]["head"] == head and len(report["policy"]["episodes"]) == 1
    assert f"policy ({head} head)" in format_table(report)
    assert {"mean_distance_closed", "distance_closed_vs_expert"} <= set(report["policy"])
