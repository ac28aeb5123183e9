"""The demo dataset: gym-pusht + a scripted expert, written as a LeRobot v3.0 dataset like lerobot/pusht (plus the
block's pose as observation.environment_state)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ki_data.lerobot_source import EpisodeReader, open_lerobot_dataset
from ki_sim import pusht
from ki_sim.experts import LinePusher
from ki_sim.pusht import PUSHT_TASK, evaluation_reset_seed, make_env
from ki_sim.record import DemoConfig, record_demo_dataset, run_episode
from pipelines import make_demo_dataset as cli


def _columns(root: Path) -> dict:
    table = pq.read_table(next((root / "data").rglob("*.parquet")))
    return {k: np.asarray(table.column(k).to_pylist()) for k in ("observation.state", "action", "episode_index")}


def _frames(repo_id: str, root: Path) -> list[np.ndarray]:
    spec = open_lerobot_dataset(repo_id, root)
    reader = EpisodeReader(spec)
    return [f for e in spec.episodes for f in reader.iter_frames(e.index, "observation.image")]


def test_the_contact_planner_pushes_the_block_toward_the_target():
    env = make_env(max_steps=150)
    records = [run_episode(env, seed=s, policy_seed=(0, s), max_steps=150, expert="planner") for s in (2, 3, 5)]
    start = np.mean([r.start_coverage for r in records])
    final = np.mean([r.final_coverage for r in records])
    assert final > start + 0.3, (start, final)
    assert all(r.final_distance < r.start_distance for r in records)


def test_the_line_expert_brings_the_block_to_the_goal_on_unseen_states():
    env = make_env(max_steps=150)
    records = [run_episode(env, seed=evaluation_reset_seed(0, e), policy_seed=(1, 0, e), max_steps=150)
               for e in range(4)]
    closed = [1 - r.final_distance / r.start_distance for r in records]
    assert np.mean(closed) > 0.7, closed


def test_the_line_expert_is_a_function_of_the_observation():
    # Without noise it answers the same observation (agent position, block pose) the same way, whatever came before.
    env = make_env(max_steps=30)
    env.reset(seed=evaluation_reset_seed(0, 1))
    first = LinePusher(np.random.default_rng(0), noise=0.0)
    for _ in range(7):
        env.step(first.act(env).astype(np.float32))
    fresh = LinePusher(np.random.default_rng(1), noise=0.0)
    np.testing.assert_array_equal(first.act(env), fresh.act(env))


def test_the_line_expert_slows_near_the_goal_and_backs_away_once_there():
    # An imitating policy's errors near the goal must not push the block through it: the expert's pushes shrink with
    # the remaining distance, and within `done` of the goal it steps away from the block instead of pushing.
    env = make_env(max_steps=150)
    env.reset(seed=evaluation_reset_seed(0, 2))
    expert = LinePusher(np.random.default_rng(0), noise=0.0)
    seen_done = False
    for _ in range(150):
        agent, center = np.array(env.unwrapped.agent.position), pusht.block_center(env)
        dist = pusht.block_goal_distance(env)
        target = expert.act(env)
        if dist < expert.done:
            seen_done = True
            r = np.linalg.norm(agent - center)
            # never toward the block: within the orbit straight away from its center, beyond it hold still
            if r < expert.orbit:
                assert np.linalg.norm(target - center) > r + 5.0, (dist, r)
            else:
                np.testing.assert_allclose(target, agent)
        env.step(target.astype(np.float32))
    assert seen_done, "the episode never reached the goal"
    assert pusht.block_goal_distance(env) < expert.done + 5.0


def test_a_behind_start_moves_only_the_agent_to_where_the_line_expert_pushes_from():
    env = make_env(max_steps=150)
    seed = evaluation_reset_seed(0, 1)  # a block whose far side is inside the arena
    plain = pusht.reset(env, seed)
    block = (*env.unwrapped.block.position, env.unwrapped.block.angle)
    obs = pusht.reset(env, seed, "behind")
    # the same block (the physics step that places the agent lets it settle by a fraction of a pixel)
    np.testing.assert_allclose((*env.unwrapped.block.position, env.unwrapped.block.angle), block, atol=0.5)
    center, goal = pusht.block_center(env), pusht.goal_center(env)
    agent = np.asarray(obs["agent_pos"])
    assert not np.allclose(agent, plain["agent_pos"])
    away = (center - goal) / np.linalg.norm(center - goal)
    np.testing.assert_allclose(agent, center + pusht.BEHIND_DISTANCE * away, atol=0.5)  # on the far side
    assert obs["pixels"].shape == plain["pixels"].shape and not np.array_equal(obs["pixels"], plain["pixels"])
    # From there the line expert pushes at once (no circling) and brings the block to the goal.
    expert = LinePusher(np.random.default_rng(0), noise=0.0)
    first = expert.act(env)
    assert np.dot(first - agent, -away) > 10.0, (first, agent)
    record = run_episode(env, seed, (1, 0, 4), 150, start="behind")
    assert record.final_distance < 0.2 * record.start_distance, record
    for refuse in (lambda: pusht.reset(env, seed, "beside"), DemoConfig(start="beside").validate):
        with pytest.raises(ValueError, match="start must be one of"):
            refuse()


def test_a_perturbed_recording_executes_noise_but_records_the_experts_answer():
    # DART: the simulator executes the expert's action plus noise, the dataset keeps the expert's own action, so the
    # recording visits states off the expert's path labelled with what the expert does there.
    seed, policy_seed, steps, sigma = evaluation_reset_seed(0, 2), (0, 4), 25, 10.0
    frames = []
    run_episode(make_env(max_steps=steps), seed, policy_seed, steps, expert="line", perturb=sigma,
                on_step=lambda img, state, env_state, action, *_: frames.append((state, env_state, action)))
    plain = []
    run_episode(make_env(max_steps=steps), seed, policy_seed, steps, expert="line",
                on_step=lambda img, state, env_state, action, *_: plain.append(state))
    assert len(frames) == len(plain) == steps
    assert not np.allclose([f[0] for f in frames], plain)  # the noise moved the agent off the plain path

    # Replaying the recorded actions plus the same noise reproduces the recorded states, and in each of them the
    # recorded action is the expert's answer (up to the expert's own 1.5 px noise), not the executed one.
    shake = np.random.default_rng((*policy_seed, 1))
    env = make_env(max_steps=steps)
    obs, _ = env.reset(seed=seed)
    clean = LinePusher(np.random.default_rng(0), noise=0.0)
    off = []
    for state, env_state, action in frames:
        np.testing.assert_allclose(obs["agent_pos"], state, atol=1e-4)
        np.testing.assert_allclose(pusht.environment_state(env), env_state, atol=1e-4)
        answer = clean.act(env)
        assert np.linalg.norm(action - answer) < 8.0, (action, answer)
        executed = np.clip(action + shake.normal(0.0, sigma, 2), 0.0, 512.0).astype(np.float32)
        off.append(np.linalg.norm(executed - answer))
        obs, *_ = env.step(executed)
    assert np.mean(off) > 8.0, off


def test_after_done_ends_an_episode_that_many_steps_after_the_block_reaches_the_goal():
    env = make_env(max_steps=150)
    seed, policy_seed = evaluation_reset_seed(0, 0), (1, 0, 0)
    centers = []
    full = run_episode(env, seed, policy_seed, 150,
                       on_step=lambda img, state, env_state, *_: centers.append(env_state[:2]))
    goal = pusht.goal_center(env)
    done_at = [i for i, c in enumerate(centers) if np.linalg.norm(c - goal) < LinePusher(None).done]
    assert full.steps == 150 and done_at, "this initial state should reach the goal within the episode"
    short = run_episode(env, seed, policy_seed, 150, after_done=3)
    assert short.steps == done_at[0] + 3
    assert run_episode(env, seed, policy_seed, 150, after_done=0).steps == done_at[0]
    # an expert that is never done (the contact planner) runs every step
    assert run_episode(env, seed, (0, 1), 20, expert="planner", after_done=0).steps == 20


def test_our_coverage_and_block_pose_match_the_simulator():
    env = make_env(max_steps=20)
    obs, _ = env.reset(seed=evaluation_reset_seed(0, 3))
    expert = LinePusher(np.random.default_rng(0))
    for _ in range(15):
        obs, _, _, _, info = env.step(expert.act(env).astype(np.float32))
        assert pusht.coverage(env) == pytest.approx(info["coverage"], abs=1e-9)
        u = env.unwrapped
        x, y, s, c = pusht.environment_state(env)
        assert (s, c) == pytest.approx((np.sin(u.block.angle), np.cos(u.block.angle)), abs=1e-6)
        # the center of mass in the world is the body position plus the rotated (0, 45) offset
        want = np.array(u.block.position) + 45.0 * np.array([-np.sin(u.block.angle), np.cos(u.block.angle)])
        assert (x, y) == pytest.approx(tuple(want), abs=1e-3)


def test_recording_is_a_lerobot_pusht_dataset_and_deterministic(tmp_path):
    cfg = DemoConfig(repo_id="tests/pusht_a", root=str(tmp_path / "a"), episodes=2, max_steps=12, seed=7)
    summary = record_demo_dataset(cfg, progress=False)
    record_demo_dataset(DemoConfig(**{**cfg.__dict__, "repo_id": "tests/pusht_b", "root": str(tmp_path / "b")}),
                                progress=False)
    record_demo_dataset(DemoConfig(**{**cfg.__dict__, "repo_id": "tests/pusht_c", "root": str(tmp_path / "c"),
                                              "seed": 8}), progress=False)
    assert summary.frames == 24 and len(summary.episodes) == 2
    info = json.loads((tmp_path / "a" / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10
    feats = info["features"]
    assert feats["observation.image"]["dtype"] == "video" and feats["observation.image"]["shape"] == [96, 96, 3]
    assert feats["observation.state"]["shape"] == [2] and feats["action"]["shape"] == [2]
    assert feats["observation.environment_state"]["names"] == ["block_x", "block_y", "block_sin", "block_cos"]
    spec = open_lerobot_dataset("tests/pusht_a", tmp_path / "a")
    assert list(spec.tasks.values()) == [PUSHT_TASK]

    a, b, c = _columns(tmp_path / "a"), _columns(tmp_path / "b"), _columns(tmp_path / "c")
    np.testing.assert_array_equal(a["observation.state"], b["observation.state"])
    np.testing.assert_array_equal(a["action"], b["action"])
    assert not np.array_equal(a["observation.state"], c["observation.state"])
    fa, fb = _frames("tests/pusht_a", tmp_path / "a"), _frames("tests/pusht_b", tmp_path / "b")
    assert len(fa) == 24 and fa[0].shape == (96, 96, 3)
    assert all(np.array_equal(x, y) for x, y in zip(fa, fb, strict=True))
    # the state is the agent position the action drives toward (512 x 512 arena)
    assert ((a["observation.state"] >= 0) & (a["observation.state"] <= 512)).all()


def test_png_storage_and_cli_refuses_to_overwrite(tmp_path, capsys):
    root = tmp_path / "png"
    argv = ["--repo-id", "tests/pusht_png", "--root", str(root), "--episodes", "1", "--max-steps", "5",
            "--image-storage", "image"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "episodes 1, frames 5" in out and "coverage" in out
    info = json.loads((root / "meta/info.json").read_text())
    assert info["features"]["observation.image"]["dtype"] == "image"
    assert cli.main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert cli.main([*argv, "--skip-existing"]) == 0
    assert "skipping" in capsys.readouterr().out
    assert cli.main([*argv, "--overwrite"]) == 0


def test_demo_shards_fixture_is_ready_for_the_tiny_model(demo_shards):
    from ki_data.manifest import Manifest, ManifestError
    from ki_data.schema import read_rows

    m = Manifest.load(demo_shards)
    assert (m.image_size, m.action_horizon, m.max_token_len, m.max_text_len) == (32, 10, 64, 32)
    assert m.cameras == ("image",) and m.splits["val"] and m.splits["train"]
    rows = read_rows(demo_shards / m.shards[0].path)
    assert rows["actions"].shape[1:] == (10, 2) and rows["state"].shape[1] == 2
    with pytest.raises(ManifestError, match="not a finished preprocessing output"):
        Manifest.load(demo_shards / "nope")


def test_a_sidecar_from_before_a_key_existed_reads_as_what_was_recorded_then(tmp_path):
    from ki_sim.pusht import RECORDING_FILE, read_recording
    from ki_sim.record import DemoConfig
    from pipelines.make_demo_dataset import same_recording

    assert read_recording(tmp_path) is None  # no sidecar
    (tmp_path / RECORDING_FILE).parent.mkdir(parents=True)
    old = {"reset_seeds": [0], "max_steps": 4, "image_size": 96}  # written before experts, perturb, after_done, start
    (tmp_path / RECORDING_FILE).write_text(json.dumps(old))
    rec = read_recording(tmp_path)
    assert rec == old | {"expert": "planner", "perturb": 0.0, "after_done": None, "start": "random"}
    cfg = DemoConfig(episodes=1, max_steps=4, seed=0, expert="planner")
    assert same_recording(tmp_path, cfg) is True
    assert same_recording(tmp_path, dataclasses.replace(cfg, expert="line")) is False
    assert same_recording(tmp_path, dataclasses.replace(cfg, start="behind")) is False


def test_recording_sidecar_and_skip_existing_with_other_options(tmp_path, capsys):
    from ki_sim.pusht import RECORDING_FILE, recording_reset_seed

    root = tmp_path / "side"
    argv = ["--repo-id", "tests/pusht_side", "--root", str(root), "--episodes", "1", "--max-steps", "4", "--seed", "3",
            "--image-storage", "image"]
    assert cli.main(argv) == 0
    sidecar = json.loads((root / RECORDING_FILE).read_text())
    assert sidecar["reset_seeds"] == [recording_reset_seed(3, 0)] and sidecar["max_steps"] == 4
    assert sidecar["expert"] == "line" and sidecar["perturb"] == 0.0
    capsys.readouterr()
    assert cli.main([*argv, "--skip-existing"]) == 0
    assert "skipping" in capsys.readouterr().out
    argv[5] = "2"  # --episodes 2: another recording than the one on disk
    assert cli.main([*argv, "--skip-existing"]) == 0
    assert "recording it again" in capsys.readouterr().out
    assert json.loads((root / RECORDING_FILE).read_text())["reset_seeds"] == [recording_reset_seed(3, e) for e in (0, 1)]
    assert cli.main([*argv, "--skip-existing", "--perturb", "5"]) == 0  # another perturbation: recorded again
    assert "recording it again" in capsys.readouterr().out
    assert json.loads((root / RECORDING_FILE).read_text())["perturb"] == 5.0
    assert cli.main([*argv, "--skip-existing", "--perturb", "5", "--after-done", "2"]) == 0
    assert "recording it again" in capsys.readouterr().out
    assert json.loads((root / RECORDING_FILE).read_text())["after_done"] == 2
    assert json.loads((root / RECORDING_FILE).read_text())["start"] == "random"
    assert cli.main([*argv, "--skip-existing", "--perturb", "5", "--after-done", "2", "--start", "behind"]) == 0
    assert "recording it again" in capsys.readouterr().out
    assert json.loads((root / RECORDING_FILE).read_text())["start"] == "behind"
    for bad in (["--perturb", "-1"], ["--after-done", "-1"]):
        with pytest.raises(SystemExit):
            cli.main([*argv, *bad])
        assert "must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # seeds beyond MAX_SEED could reach the evaluation seeds
        cli.main([*argv[:6], "--seed", str(2**20)])
