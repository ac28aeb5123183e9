"""ki_data.lerobot_source: bulk episode reads agree with lerobot's own per-frame access."""

from __future__ import annotations

import numpy as np
import pytest

from ki_data.lerobot_source import DatasetNotFoundError, EpisodeReader, open_lerobot_dataset

CAMERAS = {"observation.images.wrist_left": (24, 32), "observation.images.Overhead_Cam": (32, 48)}


@pytest.fixture(scope="module", params=["video", "image"])
def made(request, make_lerobot_dataset):
    return make_lerobot_dataset(
        f"tests/source_{request.param}", lengths=(7, 5, 6), cameras=CAMERAS, storage=request.param,
        state_dim=3, action_dim=2, tasks=("Pick_Up the RED cube", "stack_blocks"),
    )


def test_spec_describes_the_dataset(made):
    spec = open_lerobot_dataset(made.repo_id)
    assert spec.root == made.root
    assert (spec.fps, spec.state_dim, spec.action_dim, spec.codebase_version) == (10, 3, 2, "v3.0")
    assert spec.cameras == {k: made.storage for k in CAMERAS}
    assert [e.length for e in spec.episodes] == made.lengths
    assert sorted(spec.tasks.values()) == ["Pick_Up the RED cube", "stack_blocks"]
    assert spec.num_frames == sum(made.lengths)
    if made.storage == "video":
        assert all(set(e.video_files) == set(CAMERAS) for e in spec.episodes)


def test_tabular_columns_equal_what_was_written(made):
    spec = open_lerobot_dataset(made.repo_id)
    reader = EpisodeReader(spec)
    start = 0
    for e, n in enumerate(made.lengths):
        cols = reader.read_episode(e)
        np.testing.assert_array_equal(cols.state, made.states[e])
        np.testing.assert_array_equal(cols.actions, made.actions[e])
        np.testing.assert_array_equal(cols.frame_index, np.arange(n))
        np.testing.assert_array_equal(cols.index, np.arange(start, start + n))
        np.testing.assert_allclose(cols.timestamp, np.arange(n) / 10, atol=1e-6)
        assert [spec.tasks[t] for t in cols.task_index] == made.tasks[e]
        assert (cols.state_lengths == 3).all() and (cols.action_lengths == 2).all()
        start += n


def test_frames_equal_lerobot_getitem_in_any_episode_order(made):
    """Sequential decode (with seeks when going back) gives exactly the frames LeRobotDataset[i] gives."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset(made.repo_id, video_backend="pyav", return_uint8=True)
    spec = open_lerobot_dataset(made.repo_id)
    reader = EpisodeReader(spec)
    starts = np.cumsum([0, *made.lengths])
    for e in (1, 2, 0, 2):  # backwards, forwards, repeated
        cols = reader.read_episode(e)
        for key in CAMERAS:
            frames = list(reader.iter_frames(e, key, cols.timestamp))
            assert len(frames) == made.lengths[e]
            for t, frame in enumerate(frames):
                ref = ds[int(starts[e] + t)][key]
                ref = ref.numpy() if ref.dtype.is_floating_point is False else (ref * 255).round().byte().numpy()
                np.testing.assert_array_equal(frame, ref.transpose(1, 2, 0), err_msg=f"episode {e} frame {t} {key}")
                if made.storage == "image":  # PNG in parquet: lossless, equals what was written
                    np.testing.assert_array_equal(frame, made.images[e][key][t])
    reader.close()


def test_missing_dataset_is_one_clear_sentence(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        open_lerobot_dataset("nobody/no_such_dataset")
    message = str(info.value)
    assert "nobody/no_such_dataset" in message and "offline" in message and "\n" not in message
    with pytest.raises(DatasetNotFoundError, match="not found"):
        open_lerobot_dataset("nobody/no_such_dataset", root=tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()  # nothing created on the way


def test_video_out_of_sync_with_the_data_is_a_clear_error(make_lerobot_dataset, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ki_data.lerobot_source import DatasetFormatError

    made = make_lerobot_dataset("tests/source_sync", lengths=(4, 5),
                                cameras={"observation.images.wrist_left": (24, 32)})
    root = tmp_path / "ds"
    shutil.copytree(made.root, root)
    path = next((root / "meta/episodes").rglob("*.parquet"))
    table = pq.read_table(path)
    column = "videos/observation.images.wrist_left/from_timestamp"
    shifted = table.column(column).to_numpy().copy()
    shifted[1] += 0.05  # half a frame at 10 fps
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, pa.array(shifted)), path)
    spec = open_lerobot_dataset(made.repo_id, root)
    reader = EpisodeReader(spec)
    assert len(list(reader.iter_frames(0, "observation.images.wrist_left"))) == 4
    message = r"episode 1, camera observation.images.wrist_left: video .* has no frame"
    with pytest.raises(DatasetFormatError, match=message):
        list(reader.iter_frames(1, "observation.images.wrist_left"))
