"""ki_model.train / ki_model.checkpoint / pipelines.train: the loop on the demo shards, resume, mesh, refusals."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ki_model import checkpoint as ckpt
from ki_model.compile import enable_compilation_cache
from ki_model.config import preset_optimizer
from ki_model.optimizer import OptimizerConfig, make_schedule
from ki_model.train import TrainConfig, TrainError, load_metrics, train

REPO = Path(__file__).resolve().parents[1]
# A fast schedule so that a 16-step run moves; shared by the test modules so that XLA programs are reused.
TEST_OPTIMIZER = OptimizerConfig(peak_lr=3e-3, warmup_steps=4, decay_steps=200, decay_lr=3e-4)
STEPS, SAVE_AT, KILL_AT = 16, 8, 12


class Killed(Exception):
    pass


def tiny_config(shards, out, **kw) -> TrainConfig:
    base = dict(shards=str(shards), checkpoint_dir=str(out), config="tiny", steps=STEPS, batch_size=8, log_every=4,
                save_every=SAVE_AT, num_workers=0, progress=False, optimizer=TEST_OPTIMIZER, ema_decay=0.9,
                fast_compile=True)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.getbasetemp() / "jax_cache"
    enable_compilation_cache(path)
    return path


@pytest.fixture(scope="module")
def full_run(demo_shards, jax_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "full"
    train(tiny_config(demo_shards, out))
    return out


@pytest.fixture(scope="module")
def resumed_run(demo_shards, jax_cache, tmp_path_factory) -> Path:
    """Killed at step 12 (last checkpoint: step 8, metrics already logged to 12), then resumed to 16."""
    out = tmp_path_factory.mktemp("train") / "resumed"

    def kill(metrics):
        if metrics["step"] == KILL_AT:
            raise Killed

    with pytest.raises(Killed):
        train(tiny_config(demo_shards, out), on_log=kill)
    assert [m["step"] for m in load_metrics(out)] == [4, 8, 12]
    train(tiny_config(demo_shards, out, resume=True))
    return out


def _final_params(out: Path) -> dict:
    mngr = ckpt.manager(out, read_only=True)
    try:
        step = ckpt.latest_step(mngr, out)
        import orbax.checkpoint as ocp

        items = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(), ema_params=ocp.args.StandardRestore()))
        return {"step": step, "params": items["params"], "ema": items["ema_params"]}
    finally:
        mngr.close()


def test_both_losses_fall(full_run):
    m = load_metrics(full_run)
    assert [x["step"] for x in m] == [4, 8, 12, 16]
    assert m[-1]["flow_loss"] < 0.8 * m[0]["flow_loss"]
    assert m[-1]["fast_loss"] < 0.8 * m[0]["fast_loss"]
    assert m[-1]["fast_accuracy"] > m[0]["fast_accuracy"]


def test_metrics_lines_hold_every_figure(full_run):
    for line in load_metrics(full_run):
        for key in ("step", "flow_loss", "fast_loss", "fast_accuracy", "grad_norm", "learning_rate", "steps_per_s", "samples_per_s"):
            assert key in line and np.isfinite(line[key]), key
        assert line["samples_per_s"] == pytest.approx(8 * line["steps_per_s"])
    lr = [x["learning_rate"] for x in load_metrics(full_run)]
    assert lr[0] < lr[1]  # warm-up


def test_checkpoint_holds_everything_a_policy_needs(full_run, demo_shards):
    for name in ("manifest.json", "norm_stats.json", "tokenizer/text.model", "tokenizer/fast/tokenizer.json",
                 "model_config.json", "train_config.json", "metrics.jsonl"):
        assert (full_run / name).exists(), name
    assert json.loads((full_run / "manifest.json").read_text()) == json.loads((demo_shards / "manifest.json").read_text())
    step_dir = full_run / "steps" / str(STEPS)
    assert {"params", "opt_state", "ema_params", "loader", "meta"} <= {p.name for p in step_dir.iterdir()}
    mngr = ckpt.manager(full_run, read_only=True)
    meta = ckpt.restore_meta(mngr, STEPS)
    mngr.close()
    assert meta["step"] == STEPS and meta["manifest"]["action_horizon"] == json.loads((demo_shards / "manifest.json").read_text())["action_horizon"]
    assert meta["model_config"]["backbone_variant"] == "gemma_tiny"


def test_killed_and_resumed_run_matches_the_uninterrupted_one(full_run, resumed_run):
    a, b = load_metrics(full_run), load_metrics(resumed_run)
    assert [x["step"] for x in b] == [4, 8, 12, 16]  # the steps logged after the last save are logged once
    for x, y in zip(a, b):
        for key in ("flow_loss", "fast_loss", "fast_accuracy", "grad_norm", "learning_rate"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), (x["step"], key)
    pa, pb = _final_params(full_run), _final_params(resumed_run)
    assert pa["step"] == pb["step"] == STEPS
    import jax

    for tree in ("params", "ema"):
        diffs = jax.tree.leaves(jax.tree.map(lambda u, v: float(np.max(np.abs(np.asarray(u) - np.asarray(v)))), pa[tree], pb[tree]))
        assert max(diffs) <= 1e-6, tree


def test_explicit_option_contradicting_the_manifest_is_refused(demo_shards, tmp_path, capsys):
    from pipelines.train import main

    horizon = json.loads((demo_shards / "manifest.json").read_text())["action_horizon"]
    rc = main(["--shards", str(demo_shards), "--checkpoint-dir", str(tmp_path / "c"), "--action-horizon", str(horizon + 1)])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--action-horizon {horizon + 1}" in err and f"action_horizon = {horizon}" in err
    with pytest.raises(TrainError, match="max_token_len"):
        train(tiny_config(demo_shards, tmp_path / "d", max_token_len=7))
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()  # refused before writing anything


def test_resume_on_contradicting_shards_is_refused(full_run, demo_shards, tmp_path):
    work = tmp_path / "ckpt"
    shutil.copytree(full_run, work)
    other = tmp_path / "shards"
    shutil.copytree(demo_shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["action_dim"] += 1
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainError, match=r"action_dim = \d+ but the shards .* have action_dim = \d+"):
        train(tiny_config(other, work, resume=True, steps=STEPS + 1))
    manifest["action_dim"] -= 1
    manifest["tokenizers"]["fast"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainError, match="fast tokenizer"):
        train(tiny_config(other, work, resume=True, steps=STEPS + 1))
    with pytest.raises(TrainError, match="not empty"):
        train(tiny_config(demo_shards, work))  # neither --resume nor --overwrite
    with pytest.raises(TrainError, match="holds no checkpoint"):
        train(tiny_config(demo_shards, tmp_path / "empty", resume=True))


def test_openpi_schedule_defaults():
    cfg = OptimizerConfig()
    assert (cfg.peak_lr, cfg.warmup_steps, cfg.decay_steps, cfg.decay_lr) == (2.5e-5, 1000, 30000, 2.5e-6)
    assert (cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, cfg.clip_norm) == (0.9, 0.95, 1e-8, 1e-10, 1.0)
    lr = make_schedule(cfg)
    assert float(lr(0)) == pytest.approx(2.5e-5 / 1001)
    assert float(lr(1000)) == pytest.approx(2.5e-5)
    assert float(lr(30000)) == pytest.approx(2.5e-6)
    assert preset_optimizer("pi05") == cfg


FOUR_DEVICES = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from ki_data.loader import LoaderConfig, ShardLoader
    from ki_data.manifest import Manifest
    from ki_model import train as T

    shards, out = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 4
    cfg = T.model_config("tiny", Manifest.load(shards))
    # eps 1e-6: some gradients are mathematically zero (SigLIP's key bias: softmax ignores a shift shared by all
    # keys) and come out as rounding noise that differs with the device layout; Adam's first step turns noise far
    # above eps into an lr-sized update of random sign, which would compare rounding, not the sharding.
    opt = T.OptimizerConfig(peak_lr=3e-3, warmup_steps=4, decay_steps=200, decay_lr=3e-4, eps=1e-6)
    with ShardLoader(shards, "train", LoaderConfig(batch_size=8), process_index=0, process_count=1) as loader:
        batch = next(loader)
    tx = T.make_optimizer(opt)
    mesh1 = T.make_mesh(1, jax.devices()[:1])
    state1, shard1, graphdef = T.init_train_state(cfg, tx, mesh1, seed=0, ema=False)
    mesh4 = T.make_mesh(2, jax.devices())  # data 2 x fsdp 2
    shard4, _ = T.state_shardings(cfg, tx, mesh4, ema=False)
    state4 = jax.device_put(state1, shard4)  # the same initial values, sharded over 4 devices
    results = {}
    for name, mesh, state, shardings in (("single", mesh1, state1, shard1), ("four", mesh4, state4, shard4)):
        step = T.make_train_step(graphdef, opt, shardings, mesh, seed=0, ema_decay=None, donate=False, fast_compile=True)
        obs, actions, pad = T.device_batch(batch, mesh)
        new, metrics = step(state, obs, actions, pad)
        results[name] = (jax.device_get(new.params), {k: float(v) for k, v in metrics.items()})
    specs = [str(s.spec) for s in jax.tree.leaves(shard4.params)]
    sharded = sum("fsdp" in s for s in specs)
    batch_devices = len(actions.sharding.device_set)
    (p1, m1), (p4, m4) = results["single"], results["four"]
    diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), p1, p4)))
    scale = max(jax.tree.leaves(jax.tree.map(lambda a: float(np.max(np.abs(a))), p1)))
    json.dump({"param_diff": diff, "param_scale": scale, "m1": m1, "m4": m4, "sharded_params": sharded,
               "num_params": len(specs), "batch_devices": batch_devices}, open(out, "w"))
    """
)


@pytest.mark.slow  # 48 s: four XLA host devices in a subprocess
def test_step_on_four_simulated_devices_matches_one_device(demo_shards, jax_cache, tmp_path):
    out = tmp_path / "four.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(jax_cache), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", FOUR_DEVICES, str(demo_shards), str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["batch_devices"] == 4 and r["sharded_params"] > r["num_params"] // 2  # data parallel + FSDP for real
    for key in ("flow_loss", "fast_loss", "fast_accuracy", "grad_norm", "learning_rate"):
        assert r["m4"][key] == pytest.approx(r["m1"][key], rel=1e-5, abs=1e-6), key
    assert r["param_diff"] <= 1e-5 * max(1.0, r["param_scale"])


def test_init_from_a_missing_paligemma_checkpoint_is_refused_before_writing(demo_shards, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(TrainError, match="no_such_checkpoint does not exist"):
        train(tiny_config(demo_shards, out, init=f"paligemma:{tmp_path / 'no_such_checkpoint'}"))
    assert not out.exists()


@pytest.mark.parametrize("overrides", [{}, pytest.param({"remat": "nothing_saveable", "layer_chunks": 4}, marks=pytest.mark.slow)],
                         ids=["plain", "chunked"])
def test_a_whole_update_is_insulated_through_the_optimizer(demo_shards, jax_cache, overrides):
    """docs/DESIGN.md §5 property 1 for the whole step: with clipping active, two steps from one state and one batch that
    differ only in the flow noise/time draw (the step seed) leave every backbone weight bit-identical (also with each
    layer run on chunks of the batch under remat)."""
    import jax

    from ki_data.loader import LoaderConfig, ShardLoader
    from ki_data.manifest import Manifest
    from ki_model import train as T
    from ki_model.pi05_ki import param_group

    cfg = T.model_config("tiny", Manifest.load(demo_shards), **overrides)
    opt = dataclasses.replace(TEST_OPTIMIZER, clip_norm=1e-3)  # far below both sides' gradient norms: always clips
    mesh = T.make_mesh(1, jax.devices()[:1])
    state, shardings, graphdef = T.init_train_state(cfg, T.make_optimizer(opt), mesh, seed=0, ema=False)
    with ShardLoader(demo_shards, "train", LoaderConfig(batch_size=8), process_index=0, process_count=1) as loader:
        obs, actions, pad = T.device_batch(next(loader), mesh)
    before = jax.device_get(state.params)
    after, metrics = {}, {}
    for seed in (0, 1):
        step = T.make_train_step(graphdef, opt, shardings, mesh, seed=seed, ema_decay=None, donate=False,
                                 fast_compile=True)
        new, m = step(state, obs, actions, pad)
        after[seed], metrics[seed] = jax.device_get(new.params), jax.device_get(m)
    for side in T.SIDES:
        assert float(metrics[0][f"grad_norm_{side}"]) > 100 * opt.clip_norm  # the clip is active on both sides
    assert float(metrics[0]["flow_loss"]) != float(metrics[1]["flow_loss"])  # the draws differ

    flat = {side: [] for side in T.SIDES}
    for path, leaf in jax.tree_util.tree_leaves_with_path(before):
        flat[param_group((path[0].key,))].append(path)
    get = lambda tree, path: np.asarray(tree[path[0].key] if len(path) == 1 else get(tree[path[0].key], path[1:]))  # noqa: E731
    moved = [p for p in flat["backbone"] if not np.array_equal(get(after[0], p), get(before, p))]
    assert len(moved) > len(flat["backbone"]) // 2  # the backbone did learn (from the FAST loss)
    for path in flat["backbone"]:
        assert np.array_equal(get(after[0], path), get(after[1], path)), jax.tree_util.keystr(path)
    # The expert's update does depend on the draw. (At initialisation adaLN-zero gates its residual branches to 0,
    # so only the modulations and the projections in and out get gradient on this first step.)
    differ = {jax.tree_util.keystr(p) for p in flat["action_expert"] if not np.array_equal(get(after[0], p), get(after[1], p))}
    assert "['action_out_proj']['kernel']" in differ and "['action_in_proj']['kernel']" in differ
    assert sum("modulation" in p for p in differ) >= 4


def test_fast_target_slots_come_from_the_manifest_and_bound_every_row(demo_shards):
    """The run computes FAST logits at the manifest's bound on targets per row: no row of the shards has more, the
    longest has exactly as many, and a batch with a row beyond it is refused, naming the row."""
    import pyarrow.parquet as pq

    from ki_data.artifacts import DataArtifacts
    from ki_model.train import check_fast_targets, run_model_config

    data = DataArtifacts.open(demo_shards)
    slots = data.max_fast_targets()
    assert run_model_config(tiny_config(demo_shards, "unused"), data.manifest).fast_target_slots == slots
    counts = [np.asarray(m.to_pylist(), bool)[:, 1:].sum(1) for p in data.shard_paths()
              for m in [pq.read_table(p, columns=["token_loss_mask"])["token_loss_mask"]]]
    assert int(np.concatenate(counts).max()) == slots
    batch = {"token_loss_mask": np.zeros((2, 64), bool), "episode_index": np.array([3, 4]),
             "frame_index": np.array([7, 9])}
    batch["token_loss_mask"][1, 10 : 10 + slots] = True
    check_fast_targets(batch, slots, "shards")  # as many as the bound
    batch["token_loss_mask"][1, 10 + slots] = True
    with pytest.raises(TrainError, match=f"episode 4, frame 9 has {slots + 1} FAST targets.*more than the {slots}"):
        check_fast_targets(batch, slots, "shards")


def test_the_model_may_have_more_action_dimensions_than_the_data(demo_shards):
    from ki_data.manifest import Manifest
    from ki_model import train as T

    manifest = Manifest.load(demo_shards)
    assert T.model_config("tiny", manifest).action_dim == manifest.action_dim
    assert T.model_config("tiny", manifest, action_dim=manifest.action_dim + 3).action_dim == manifest.action_dim + 3
    with pytest.raises(TrainError, match="smaller than the shards"):
        T.model_config("tiny", manifest, action_dim=manifest.action_dim - 1)


def test_a_decay_shorter_than_the_warm_up_is_refused_with_one_line(demo_shards, tmp_path, capsys):
    from pipelines.train import main

    out = tmp_path / "never"
    assert main(["--shards", str(demo_shards), "--checkpoint-dir", str(out), "--steps", "20", "--decay-steps", "20",
                 "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --decay-steps 20 must exceed the 100 warm-up steps (--warmup-steps)"
    assert not out.exists()
