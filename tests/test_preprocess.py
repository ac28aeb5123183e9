"""Preprocessing (issue 3): every shard column against the raw LeRobot dataset, prompts, determinism, resume,
and every bad-input error."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ki_data import schema
from ki_data.artifacts import DataArtifacts
from ki_data.fast_tokenizer import FastTokenizer, dct_coefficients
from ki_data.images import decode_image, encode_image, resize_with_pad
from ki_data.manifest import Manifest
from ki_data.normalize import load_norm_stats, normalize, unnormalize
from ki_data.prompt import prefix_text
from ki_data.preprocess import (
    BadInputError,
    FitChunkCollector,
    OutputExistsError,
    PreprocessConfig,
    describe_rows,
    run_preprocess,
    split_episodes,
)
from ki_data.preprocess import resume
from ki_data.preprocess.executors import job_file, load_job
from ki_data.text_tokenizer import TextTokenizer
from pipelines import preprocess as cli

from conftest import interrupt_after_shards

REPO = Path(__file__).resolve().parents[1]
CAMERAS = {"observation.images.wrist_left": (24, 32), "observation.images.Overhead_Cam": (32, 48)}
TASKS = ("Pick_Up the RED cube", "stack_blocks_NOW", "Open The Drawer")
LENGTHS = (12, 9, 4, 10, 7)  # episode 2 is shorter than the horizon
H = 6
OPTIONS = dict(action_horizon=H, image_size=32, max_token_len=64, max_text_len=40, shard_rows=15,
               val_fraction=0.25, progress=False)


@pytest.fixture(scope="module")
def rich(make_lerobot_dataset):
    """Video, two cameras with non-openpi names, three tasks, state dim 3 != action dim 2, a short episode."""
    return make_lerobot_dataset("tests/rich", lengths=LENGTHS, cameras=CAMERAS, storage="video", state_dim=3,
                                action_dim=2, tasks=TASKS)


@pytest.fixture(scope="module")
def rich_out(rich, tmp_path_factory):
    out = tmp_path_factory.mktemp("rich") / "out"
    return run_preprocess(PreprocessConfig(rich.repo_id, output=str(out), **OPTIONS))


def _all_rows(out: Path) -> dict[str, np.ndarray]:
    parts = [schema.read_rows(p) for p in Manifest.load(out).shard_paths(out)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _shas(out: Path) -> list[str]:
    return [s.sha256 for s in Manifest.load(out).shards]


# --------------------------------------------------------------------------------------------------- manifest


def test_manifest_records_the_run(rich, rich_out):
    m, out = rich_out.manifest, rich_out.out_dir
    assert m == Manifest.load(out)
    assert m.source["repo_id"] == rich.repo_id and m.source["codebase_version"] == "v3.0"
    assert m.cameras == ("wrist_left", "Overhead_Cam") and m.prompt_layout == "pi05"
    assert (m.state_dim, m.action_dim, m.action_horizon, m.image_size, m.fps) == (3, 2, H, 32, 10)
    text = TextTokenizer.load(out / m.tokenizers["text"].path)
    fast = FastTokenizer.load(out / m.tokenizers["fast"].path)
    assert m.skip_tokens == 0 and m.vocab_size == text.vocab_size + fast.vocab_size
    assert m.tokenizers["text"].kind == "trained" and m.tokenizers["text"].sha256 == text.sha256
    assert (out / "norm_stats.json").is_file() and (out / "tokenizer/fast/processor_config.json").is_file()
    train, val = m.splits["train"], m.splits["val"]
    assert sorted(train + val) == list(range(len(LENGTHS))) and len(val) == 1
    assert (list(train), list(val)) == split_episodes(list(range(len(LENGTHS))), 0.25, 0)
    for shard in m.shards:
        path = out / shard.path
        assert path.name.startswith(shard.split + "-")
        assert set(shard.episodes) <= set(m.splits[shard.split])
        assert pq.read_metadata(path).num_rows == shard.rows
        import hashlib

        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard.sha256
    s = m.summary
    assert s["frames"] == s["rows"] == sum(LENGTHS) and s["rows_rejected"] == {}
    assert s["shards"] == len(m.shards) > 2 and s["episodes"] == len(LENGTHS)
    assert 0 < s["fast_tokens_per_chunk"]["mean"] <= s["fast_tokens_per_chunk"]["max"]
    assert s["fast_values_clipped"] == 0
    assert not (out / ".ki_progress").exists()
    assert not [p for p in out.rglob("*") if ".tmp." in p.name]


# --------------------------------------------------------------------------------------------------- columns


def test_every_column_matches_the_raw_dataset(rich, rich_out):
    out = rich_out.out_dir
    rows = _all_rows(out)
    stats = load_norm_stats(out / "norm_stats.json")
    starts = np.cumsum([0, *LENGTHS])
    assert len(rows["index"]) == sum(LENGTHS)
    assert sorted(rows["index"].tolist()) == list(range(sum(LENGTHS)))
    for r in range(len(rows["index"])):
        e, t = int(rows["episode_index"][r]), int(rows["frame_index"][r])
        n = LENGTHS[e]
        assert rows["index"][r] == starts[e] + t
        assert rows["task"][r] == TASKS[e % len(TASKS)]  # as the dataset has it
        np.testing.assert_allclose(unnormalize(rows["state"][r], stats["state"]), rich.states[e][t], atol=1e-4)
        steps = np.arange(t, t + H)
        expected = rich.actions[e][np.minimum(steps, n - 1)]  # padded with the last action
        np.testing.assert_allclose(unnormalize(rows["actions"][r], stats["actions"]), expected, atol=1e-4)
        np.testing.assert_array_equal(rows["action_is_pad"][r], steps >= n)
        for cam in ("wrist_left", "Overhead_Cam"):
            assert rows[f"image_mask.{cam}"][r]
    assert rows["actions"].shape == (sum(LENGTHS), H, 2) and rows["actions"].dtype == np.float32
    short = rows["episode_index"] == 2
    assert rows["action_is_pad"][short].any(axis=1).all()  # shorter than the horizon: every chunk padded


def test_shard_rows_are_frame_rows_of_the_raw_frames(rich, rich_out):
    # The one frame -> row function (the Policy's too) on the dataset's raw values gives the stored rows.
    data = DataArtifacts.open(rich_out.out_dir)
    rows = _all_rows(rich_out.out_dir)
    image_names = [schema.image_column(c) for c in data.manifest.cameras]
    for i in (0, 5, len(rows[schema.INDEX]) - 1):
        stored = schema.row_at(rows, i)
        e, t = int(stored[schema.EPISODE_INDEX]), int(stored[schema.FRAME_INDEX])
        steps = np.minimum(np.arange(t, t + H), rich.lengths[e] - 1)
        row, tokens = schema.frame_row(
            data, task=rich.tasks[e][t], state=rich.states[e][t], images=dict(zip(data.manifest.cameras,
            (stored[n] for n in image_names))), actions=rich.actions[e][steps],
            action_is_pad=np.arange(t, t + H) >= rich.lengths[e], key=(e, t, int(stored[schema.INDEX])))
        assert list(row) == list(stored) and tokens.num_fast_tokens > 0
        for name, value in row.items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(stored[name]), err_msg=name)
    with pytest.raises(ValueError, match="no image for camera"):
        schema.frame_row(data, task="x", state=rich.states[0][0], images={})


def test_state_is_normalized_with_the_saved_quantile_stats(rich, rich_out):
    rows = _all_rows(rich_out.out_dir)
    stats = load_norm_stats(rich_out.out_dir / "norm_stats.json")
    all_states = np.concatenate(rich.states)
    np.testing.assert_allclose(stats["state"].q01, np.quantile(all_states, 0.01, axis=0), rtol=1e-5)
    order = np.argsort(rows["index"])
    np.testing.assert_array_equal(rows["state"][order], normalize(all_states, stats["state"]))


def test_images_are_lerobots_frames_resized_with_padding(rich, rich_out):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    assert rich_out.manifest.image_format == "jpeg"  # the default; its encoder is deterministic, so exact below
    ds = LeRobotDataset(rich.repo_id, video_backend="pyav", return_uint8=True)
    rows = _all_rows(rich_out.out_dir)
    for r in range(0, len(rows["index"]), 4):
        item = ds[int(rows["index"][r])]
        for key, cam in (("observation.images.wrist_left", "wrist_left"),
                         ("observation.images.Overhead_Cam", "Overhead_Cam")):
            frame = item[key].numpy().transpose(1, 2, 0)
            expected = decode_image(encode_image(resize_with_pad(frame, 32), "jpeg"))
            np.testing.assert_array_equal(decode_image(rows[f"image.{cam}"][r]), expected)


def test_prompts_prefix_masks_and_fast_postfix(rich_out):
    out, m = rich_out.out_dir, rich_out.manifest
    rows = _all_rows(out)
    prompt = DataArtifacts.open(out).prompt
    text, fast = prompt.text, prompt.fast
    prefix_ids, end_ids = list(prompt.start_ids), list(prompt.end_ids)
    L, T = m.max_token_len, m.max_text_len
    for r in range(len(rows["index"])):
        tok, real = rows["tokenized_prompt"][r], rows["tokenized_prompt_mask"][r]
        ar, loss = rows["token_ar_mask"][r], rows["token_loss_mask"][r]
        txt, txt_mask = rows["text_prompt"][r], rows["text_prompt_mask"][r]
        n_text, n_real = int(txt_mask.sum()), int(real.sum())
        assert tok.shape == (L,) and txt.shape == (T,)
        # masks are prefixes / the postfix, padding is zero
        np.testing.assert_array_equal(real, np.arange(L) < n_real)
        np.testing.assert_array_equal(txt_mask, np.arange(T) < n_text)
        np.testing.assert_array_equal(ar, real & (np.arange(L) >= n_text))
        np.testing.assert_array_equal(loss, ar)
        assert (tok[~real] == 0).all() and (txt[~txt_mask] == 0).all()
        # the prefix invariant, and the text is what docs/DESIGN.md §3 says
        np.testing.assert_array_equal(txt[:n_text], tok[:n_text])
        assert txt[0] == text.bos_id
        assert text.decode(txt[:n_text].tolist()) == prefix_text(rows["task"][r], rows["state"][r], "pi05")
        # the inference path builds the very same text prompt from the same observation
        inference = prompt.build(rows["task"][r], rows["state"][r])
        np.testing.assert_array_equal(inference.text_prompt, txt)
        # postfix (pi05): FAST ... "|" EOS; FAST decodes losslessly to the stored chunk's coefficients
        postfix = tok[n_text:n_real]
        assert postfix[: len(prefix_ids)].tolist() == prefix_ids and postfix[-len(end_ids):].tolist() == end_ids
        fast_ids = prompt.model_to_fast(postfix[len(prefix_ids) : len(postfix) - len(end_ids)])
        assert fast_ids.min() >= 0 and fast_ids.max() < fast.vocab_size
        np.testing.assert_array_equal(fast.decode_coefficients(fast_ids, H, 2), fast.coefficients(rows["actions"][r]))
        decoded = fast.decode(fast_ids, H, 2)
        assert np.sqrt(np.mean((decoded - rows["actions"][r]) ** 2)) <= 0.5 / fast.scale


def test_describe_rows_and_show_rows(rich_out, capsys):
    text = describe_rows(rich_out.out_dir, n=2)
    assert text.count("- episode") == 2 and "FAST tokens" in text and "task:" in text
    assert "Task: " in text  # the decoded text prompt


# --------------------------------------------------------------------------------------------------- determinism


def test_same_shards_whatever_the_worker_count_and_no_silent_overwrite(rich, rich_out, tmp_path):
    out2 = tmp_path / "w2"
    run_preprocess(PreprocessConfig(rich.repo_id, output=str(out2), workers=2, **OPTIONS))
    assert _shas(out2) == _shas(rich_out.out_dir)
    assert (out2 / "tokenizer/text.model").read_bytes() == (rich_out.out_dir / "tokenizer/text.model").read_bytes()
    with pytest.raises(OutputExistsError, match="already holds a finished preprocessing run; pass --overwrite"):
        run_preprocess(PreprocessConfig(rich.repo_id, output=str(out2), **OPTIONS))
    again = run_preprocess(PreprocessConfig(rich.repo_id, output=str(out2), overwrite=True, **OPTIONS))
    assert _shas(again.out_dir) == _shas(rich_out.out_dir)


def test_resume_after_an_interruption_gives_the_same_shards(rich, rich_out, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    written = interrupt_after_shards(monkeypatch, PreprocessConfig(rich.repo_id, output=str(out), **OPTIONS))
    assert not (out / "manifest.json").exists() and len(list((out / ".ki_progress").glob("*.parquet.json"))) == 2
    # What the tasks read: the draft manifest (no shards, no summary yet) and a job naming the output directory.
    draft = resume.load_draft(out)
    assert draft.shards == () and draft.summary == {}
    assert load_job(job_file(out)).out == out.resolve()
    # a write cut mid-way and a finished shard damaged afterwards: both must be redone
    (out / "shards" / ".train-00002.parquet.tmp.12345").write_bytes(b"half a shard")
    with open(out / written[1], "ab") as f:
        f.write(b"garbage")
    with pytest.raises(OutputExistsError, match="unfinished run of other inputs or options"):
        run_preprocess(PreprocessConfig(rich.repo_id, output=str(out), **{**OPTIONS, "action_horizon": 5}))
    resumed = run_preprocess(PreprocessConfig(rich.repo_id, output=str(out), **OPTIONS))
    assert _shas(out) == _shas(rich_out.out_dir)
    assert resumed.summary["shards_reused"] == 1
    # The merge only filled in the draft's shards and summary.
    assert dataclasses.replace(Manifest.load(out), shards=(), summary={}) == draft
    assert not [p for p in out.rglob("*") if ".tmp." in p.name]


def test_tokenizers_are_loaded_once_per_process(rich, rich_out, tmp_path, monkeypatch):
    # One worker: pass 1, the draft, every pass-2 task and the merge run in this process.
    loads = collections.Counter()
    for cls in (TextTokenizer, FastTokenizer):
        def counted(kind, *args, _load=cls.load, **kwargs):
            loads[kind.__name__] += 1
            return _load(*args, **kwargs)

        monkeypatch.setattr(cls, "load", classmethod(counted))
    result = run_preprocess(PreprocessConfig(rich.repo_id, output=str(tmp_path / "once"), **OPTIONS))
    assert len(result.manifest.shards) > 2 and _shas(result.out_dir) == _shas(rich_out.out_dir)
    assert loads == {"TextTokenizer": 1, "FastTokenizer": 1}


@pytest.mark.slow
def test_killed_cli_run_resumes_to_the_same_shards(rich, rich_out, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "pipelines.preprocess", rich.repo_id, "--output", str(out), "--no-progress",
            "--action-horizon", str(H), "--image-size", "32", "--max-token-len", "64", "--max-text-len", "40",
            "--shard-rows", "15", "--val-fraction", "0.25", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / ".ki_progress").glob("*.parquet.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _shas(out) == _shas(rich_out.out_dir)


def test_given_tokenizers_are_copied_and_used(rich, rich_out, tmp_path):
    """--text-tokenizer / --fast-tokenizer: the same tokenizers as the fitted ones give the same shards."""
    src = rich_out.out_dir
    result = run_preprocess(PreprocessConfig(rich.repo_id, output=str(tmp_path / "given"),
                                             text_tokenizer=str(src / "tokenizer/text.model"),
                                             fast_tokenizer=str(src / "tokenizer/fast"), **OPTIONS))
    m = result.manifest
    assert m.tokenizers["text"].kind == "user" and m.tokenizers["fast"].kind == "user"
    assert m.tokenizers["text"].sha256 == rich_out.manifest.tokenizers["text"].sha256
    assert (m.vocab_size, m.skip_tokens) == (rich_out.manifest.vocab_size, 0)
    assert _shas(result.out_dir) == _shas(src)


def test_fast_fit_sample_keeps_every_coefficient_extreme():
    rng = np.random.default_rng(0)
    episodes = [rng.normal(size=(int(rng.integers(5, 40)), 6, 2)) for _ in range(40)]
    everything = np.concatenate(episodes)
    collector = FitChunkCollector(len(everything), scale=10.0, limit=50)
    for chunks in episodes:
        collector.add(chunks)
    sample = collector.chunks()
    assert 50 <= len(sample) <= 50 + 2 * 12
    coef_all = dct_coefficients(everything, 10.0).reshape(len(everything), -1)
    coef_sample = dct_coefficients(sample, 10.0).reshape(len(sample), -1)
    np.testing.assert_array_equal(coef_sample.min(0), coef_all.min(0))
    np.testing.assert_array_equal(coef_sample.max(0), coef_all.max(0))
    small = FitChunkCollector(len(everything), scale=10.0, limit=10_000)
    for chunks in episodes:
        small.add(chunks)
    np.testing.assert_array_equal(small.chunks(), everything)


# --------------------------------------------------------------------------------------------------- image storage


def test_image_storage_dataset_keeps_pixels_exactly(make_lerobot_dataset, tmp_path):
    made = make_lerobot_dataset("tests/png_frames", lengths=(5, 4), storage="image",
                                cameras={"observation.image": (30, 40)}, state_dim=4, action_dim=4)
    result = run_preprocess(PreprocessConfig(made.repo_id, output=str(tmp_path / "o"), image_format="png", **OPTIONS))
    assert result.manifest.cameras == ("image",) and result.manifest.image_format == "png"
    rows = _all_rows(result.out_dir)
    for r in range(len(rows["index"])):
        e, t = int(rows["episode_index"][r]), int(rows["frame_index"][r])
        expected = resize_with_pad(made.images[e]["observation.image"][t], 32)
        np.testing.assert_array_equal(decode_image(rows["image.image"][r]), expected)


def test_camera_and_episode_selection(rich, tmp_path):
    result = run_preprocess(PreprocessConfig(rich.repo_id, output=str(tmp_path / "sel"), cameras=("Overhead_Cam",),
                                             episodes=(1, 3), **OPTIONS))
    m = result.manifest
    assert m.cameras == ("Overhead_Cam",) and sorted(m.splits["train"] + m.splits["val"]) == [1, 3]
    rows = _all_rows(result.out_dir)
    assert "image.wrist_left" not in rows and set(rows["episode_index"].tolist()) == {1, 3}
    with pytest.raises(Exception, match="has no camera 'front'"):
        run_preprocess(PreprocessConfig(rich.repo_id, output=str(tmp_path / "x"), cameras=("front",), **OPTIONS))
    with pytest.raises(Exception, match="has no episode 99"):
        run_preprocess(PreprocessConfig(rich.repo_id, output=str(tmp_path / "y"), episodes=(99,), **OPTIONS))


# --------------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def clean(make_lerobot_dataset, tmp_path_factory):
    """Two episodes (8 and 7 frames), PNG frames; each bad-input test corrupts its own copy."""
    return make_lerobot_dataset("tests/clean", root=tmp_path_factory.mktemp("clean") / "ds", lengths=(8, 7),
                                storage="image", cameras={"observation.images.cam": (24, 32)},
                                tasks=("Pick_Up the RED cube", "stack_blocks"))


def _copy(clean, tmp_path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(clean.root, root)
    return root


def _data_file(root: Path) -> Path:
    return next((root / "data").rglob("*.parquet"))


def _set_cell(root: Path, column: str, row: int, value) -> None:
    """Rewrite one cell of the data file (keeping lerobot's schema and metadata)."""
    path = _data_file(root)
    table = pq.read_table(path)
    col = table.column(column).combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        values = col.flatten().to_numpy().copy().reshape(len(col), -1)
        values[row] = value
        new = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), col.type.value_type), col.type.list_size)
    else:
        values = col.to_pylist()
        values[row] = value
        new = pa.array(values, col.type)
    table = table.set_column(table.schema.get_field_index(column), table.schema.field(column), new)
    pq.write_table(table, path)


def _set_feature_shape(root: Path, key: str, shape: list[int]) -> None:
    info = json.loads((root / "meta/info.json").read_text())
    info["features"][key]["shape"] = shape
    (root / "meta/info.json").write_text(json.dumps(info))


def _run(root: Path, tmp_path: Path, name: str, **kw):
    opts = {**OPTIONS, "action_horizon": 4, **kw}
    return run_preprocess(PreprocessConfig("tests/clean", root=str(root), output=str(tmp_path / name), **opts))


# (corruption, expected message, rejected counts with --skip-bad-rows)
# Row 11 of the file is episode 1, frame 3; row 5 is episode 0, frame 5.
BAD_CASES = {
    "nan_state": (lambda root: _set_cell(root, "observation.state", 11, [0.0, np.nan, 1.0]),
                  r"episode 1, frame 3: observation.state is not finite", {"state_not_finite": 1}),
    "inf_action": (lambda root: _set_cell(root, "action", 5, [np.inf, 0.0]),
                   r"episode 0, frame 5: action is not finite", {"action_not_finite": 4}),  # rows 2..5 see it
    "no_task": (lambda root: _set_cell(root, "task_index", 11, 99),
                r"episode 1, frame 3: has no task \(task_index 99 is not in meta/tasks.parquet\)", {"no_task": 1}),
    "null_task": (lambda root: _set_cell(root, "task_index", 11, None),
                  r"episode 1, frame 3: has no task \(task_index is null\)", {"no_task": 1}),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_rows_are_named_or_skipped_and_counted(case, clean, tmp_path):
    corrupt, message, counts = BAD_CASES[case]
    root = _copy(clean, tmp_path)
    corrupt(root)
    with pytest.raises(BadInputError, match=message + ".*--skip-bad-rows"):
        _run(root, tmp_path, "strict")
    result = _run(root, tmp_path, "skip", skip_bad_rows=True)
    s = result.summary
    assert s["rows_rejected"] == counts and s["rows"] == 15 - sum(counts.values())
    assert result.manifest.options["skip_bad_rows"] is True
    rows = _all_rows(result.out_dir)
    assert np.isfinite(rows["state"]).all() and np.isfinite(rows["actions"]).all()


def test_state_or_action_dims_that_disagree_with_the_metadata(clean, tmp_path):
    root = _copy(clean, tmp_path)
    _set_feature_shape(root, "observation.state", [4])
    state_dim = r"episode 0, frame 0: observation.state has 3 values but the metadata says 4"
    with pytest.raises(BadInputError, match=state_dim):
        _run(root, tmp_path, "s")
    root2 = tmp_path / "ds2"
    shutil.copytree(clean.root, root2)
    _set_feature_shape(root2, "action", [3])
    with pytest.raises(BadInputError, match=r"episode 0, frame 0: action has 2 values but the metadata says 3"):
        _run(root2, tmp_path, "a")
    # one row stored with a wrong length (a variable-length list column): skipped and counted
    root3 = tmp_path / "ds3"
    shutil.copytree(clean.root, root3)
    path = _data_file(root3)
    table = pq.read_table(path)
    states = table.column("observation.state").to_pylist()
    states[9] = states[9] + [0.0]  # episode 1, frame 1
    table = table.set_column(table.schema.get_field_index("observation.state"), "observation.state",
                             pa.array(states, pa.list_(pa.float32())))
    pq.write_table(table, path)
    one_row = r"episode 1, frame 1: observation.state has 4 values but the metadata says 3"
    with pytest.raises(BadInputError, match=one_row):
        _run(root3, tmp_path, "v")
    assert _run(root3, tmp_path, "v2", skip_bad_rows=True).summary["rows_rejected"] == {"state_dim_mismatch": 1}


def test_prompt_longer_than_the_limit(make_lerobot_dataset, tmp_path):
    long_task = "Carefully " + "pick up the small red cube and place it gently " * 6
    made = make_lerobot_dataset("tests/long_task", root=tmp_path / "ds", lengths=(5, 6), storage="image",
                                cameras={"observation.images.cam": (24, 32)}, tasks=("go", long_task))
    opts = {**OPTIONS, "max_text_len": 200, "max_token_len": 60, "action_horizon": 4}
    too_long = r"episode 1, frame 0: the tokenized_prompt needs \d+ tokens but the limit is 60"
    with pytest.raises(BadInputError, match=too_long):
        run_preprocess(PreprocessConfig(made.repo_id, root=str(made.root), output=str(tmp_path / "a"), **opts))
    result = run_preprocess(PreprocessConfig(made.repo_id, root=str(made.root), output=str(tmp_path / "b"),
                                             skip_bad_rows=True, **opts))
    assert result.summary["rows_rejected"] == {"prompt_too_long": 6} and result.summary["rows"] == 5


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_missing_dataset_is_one_sentence_and_nonzero(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipelines.preprocess", "nobody/missing", "--output",
                           str(tmp_path / "o")], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nobody/missing" in lines[0] and "not found" in lines[0]


def test_cli_runs_and_shows_rows(rich, tmp_path, capsys):
    argv = [rich.repo_id, "--output", str(tmp_path / "cli"), "--action-horizon", str(H), "--image-size", "32",
            "--max-token-len", "64", "--max-text-len", "40", "--episodes", "0-1", "3", "--no-progress",
            "--workers", "1", "--show-rows", "2"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "rows rejected: none" in printed and printed.count("- episode") == 2
    assert cli.main(argv) == 2  # finished output: refused without --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert cli._episodes(["0-2", "5", "7:9"]) == (0, 1, 2, 5, 7, 8)
