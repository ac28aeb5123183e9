"""ki_model.Policy: a LeRobot frame goes through the same ki_data code as preprocessing, and comes back as actions."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ki_data.images import decode_image
from ki_data.normalize import load_norm_stats, unnormalize
from ki_data.manifest import Manifest
from ki_data.schema import read_rows
from ki_model import Policy
from ki_model.checkpoint import CheckpointError
from ki_model.observation import Observation
from ki_model.policy import FrameError


@pytest.fixture(scope="module")
def policy(trained_checkpoint) -> Policy:
    return Policy.load(trained_checkpoint, fast_compile=True)


@pytest.fixture(scope="module")
def lerobot_frames(demo_shards):
    """(shard row, the same frame as LeRobotDataset returns it: CHW float images in [0, 1], torch tensors)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    m = Manifest.load(demo_shards)
    ds = LeRobotDataset(m.source["repo_id"], root=m.source["root"], video_backend="pyav")
    out = []
    for split in ("val", "train"):
        rows = read_rows(Manifest.load(demo_shards).shard_paths(demo_shards, split)[0])
        for r in (0, len(rows["index"]) // 2, len(rows["index"]) - 1):
            row = {k: v[r] for k, v in rows.items()}
            item = ds[int(row["index"])]
            assert int(item["episode_index"]) == row["episode_index"] and int(item["frame_index"]) == row["frame_index"]
            out.append((row, {k: v for k, v in item.items() if k.startswith("observation.") or k == "task"}))
    return out


def _hwc_uint8(frame: dict) -> dict:
    """The same frame in the other accepted layout: HxWx3 uint8 numpy images, numpy state."""
    out = {}
    for k, v in frame.items():
        if k.startswith("observation.image"):
            out[k] = np.rint(v.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
        elif k == "observation.state":
            out[k] = v.numpy()
        else:
            out[k] = v
    return out


def test_prepare_builds_the_shard_rows_tensors(policy, lerobot_frames, demo_shards):
    cams = Manifest.load(demo_shards).cameras
    for row, frame in lerobot_frames:
        for layout in (frame, _hwc_uint8(frame)):
            cols = policy.prepare_columns(layout)
            where = (row["episode_index"], row["frame_index"])
            assert np.array_equal(cols["text_prompt"][0], row["text_prompt"]), where
            assert np.array_equal(cols["text_prompt_mask"][0], row["text_prompt_mask"]), where
            assert np.array_equal(cols["state"][0], row["state"]), where  # bit-identical normalization
            for cam in cams:
                assert np.array_equal(cols[f"image.{cam}"][0], decode_image(row[f"image.{cam}"])), (where, cam)
            # Inference prompt: the text prefix only, identical to the start of the training prompt.
            n = int(row["text_prompt_mask"].sum())
            assert cols["tokenized_prompt_mask"][0].sum() == n
            assert np.array_equal(cols["tokenized_prompt"][0][:n], row["tokenized_prompt"][:n])
            assert not cols["token_ar_mask"][0].any() and not cols["token_loss_mask"][0].any()
        obs = policy.prepare(frame)
        assert obs.batch_size == 1 and np.array_equal(np.asarray(obs.text_prompt[0]), row["text_prompt"])


def test_infer_returns_the_chunk_in_dataset_units(policy, lerobot_frames, trained_checkpoint):
    _, frame = lerobot_frames[0]
    m = policy.manifest
    actions = policy.infer(frame)
    assert actions.shape == (m.action_horizon, m.action_dim) and actions.dtype == np.float32
    assert np.isfinite(actions).all()
    # infer = unnormalize(flow sample) with the checkpoint's norm stats, nothing else.
    rng = jax.random.key(5)
    normalized = policy.sample_normalized(policy.prepare(frame), rng)[0]
    expected = unnormalize(normalized, load_norm_stats(trained_checkpoint / "norm_stats.json")["actions"], mode=m.norm_mode)
    assert np.array_equal(policy.unnormalize_actions(policy.sample_normalized(policy.prepare(frame), rng))[0], expected)


def test_bad_frames_and_checkpoints_are_refused(policy, lerobot_frames, tmp_path):
    _, frame = lerobot_frames[0]
    cam_key = next(k for k in frame if k.startswith("observation.image"))
    with pytest.raises(FrameError, match="lacks cameras"):
        policy.prepare_columns({k: v for k, v in frame.items() if k != cam_key})
    with pytest.raises(FrameError, match="observation.state has"):
        policy.prepare_columns({**frame, "observation.state": np.zeros(7, np.float32)})
    with pytest.raises(FrameError, match="image must be"):
        policy.prepare_columns({**frame, cam_key: np.zeros((4, 4), np.uint8)})
    with pytest.raises(CheckpointError):
        Policy.load(tmp_path)


def test_flow_samples_give_each_observation_the_mean_of_its_own_draws(policy, lerobot_frames):
    """With flow_samples=N, observation i's chunk is the mean of the N draws made for it (rows i*N .. i*N+N-1 of one
    batch), not of another observation's: two frames in one batch, against the one-sample policy's draws on the
    repeated batch from the same key."""
    n = 4
    averaging = Policy(policy.model, policy.config, policy.data, fast_compile=True, flow_samples=n)
    assert averaging.flow_samples == n and policy.flow_samples == 1
    cols = [policy.prepare_columns(frame) for _, frame in (lerobot_frames[0], lerobot_frames[-1])]
    obs = Observation.from_batch({k: np.concatenate([c[k] for c in cols]) for k in cols[0]})
    rng = jax.random.key(7)
    mean = averaging.sample_normalized(obs, rng)
    draws = policy.sample_normalized(jax.tree.map(lambda x: np.repeat(x, n, axis=0), obs), rng)
    h, d = policy.config.action_horizon, policy.manifest.action_dim
    assert mean.shape == (2, h, d) and draws.shape == (2 * n, h, d)
    np.testing.assert_allclose(mean, draws.reshape(2, n, h, d).mean(axis=1), atol=1e-5)
    assert not np.allclose(draws[0], draws[1], atol=1e-3)  # each draw its own noise
    assert not np.allclose(mean[0], draws[n:].mean(axis=0), atol=1e-3)  # the grouping matters
    # infer: the mean, turned into the dataset's units like one sample.
    assert averaging.infer(lerobot_frames[0][1]).shape == (h, d)
    for bad in (0, True):  # (a float too; under the tests the type hint refuses it first)
        with pytest.raises(ValueError, match="flow_samples"):
            Policy(policy.model, policy.config, policy.data, flow_samples=bad)
