"""Pass 2 on other executors (issue 14): a real local Ray cluster (2 CPUs) writes the same shards as the local
executor, a Ray task whose worker process is killed is retried and keeps the shards it had finished, a run interrupted
on one executor finishes on another, and the Slurm executor writes a job array and its merge."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dill
import psutil
import pytest

from ki_data.manifest import Manifest
from ki_data.preprocess import ExecutorConfig, PreprocessConfig, SlurmJob, run_preprocess, write_slurm_preprocess

from conftest import interrupt_after_shards

REPO = Path(__file__).resolve().parents[1]
# Six episodes in four training shards and one validation shard; two cameras decoded from video.
LENGTHS = (30, 26, 34, 28, 31, 25)
CAMERAS = {"observation.images.top": (48, 64), "observation.images.wrist": (48, 64)}
OPTIONS = dict(action_horizon=6, image_size=64, max_token_len=64, max_text_len=40, shard_rows=30,
               val_fraction=0.2, progress=False)
CLI_OPTIONS = ["--action-horizon", "6", "--image-size", "64", "--max-token-len", "64", "--max-text-len", "40",
               "--shard-rows", "30", "--val-fraction", "0.2", "--no-progress"]


@pytest.fixture(scope="module")
def dataset(make_lerobot_dataset):
    return make_lerobot_dataset("tests/executors", lengths=LENGTHS, cameras=CAMERAS, storage="video", state_dim=3,
                                action_dim=2, tasks=("Pick_Up the RED cube", "stack_blocks"))


@pytest.fixture(scope="module")
def local_out(dataset, tmp_path_factory) -> Path:
    """The reference: the default (local) executor, one worker."""
    out = tmp_path_factory.mktemp("local") / "out"
    return run_preprocess(PreprocessConfig(dataset.repo_id, output=str(out), **OPTIONS)).out_dir


def _shas(out: Path) -> list[str]:
    return [s.sha256 for s in Manifest.load(out).shards]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class RayCluster:
    address: str
    head_pid: int  # `ray start`: every process of the cluster descends from it

    def task_processes(self) -> list[psutil.Process]:
        """Worker processes of this cluster running a pass-2 task (Ray titles them after the function)."""
        out = []
        for p in psutil.Process(self.head_pid).children(recursive=True):
            try:
                if p.cmdline() and p.cmdline()[0].startswith("ray::ki_pass2_task"):
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A real Ray head node limited to 2 CPUs (`ray start --head --block`), stopped by signalling that process.

    It has its own authentication token, given to the drivers (this process, the CLI) through Ray's environment
    variables, as Ray's own tests do."""
    env_vars = pytest.MonkeyPatch()
    env_vars.setenv("RAY_AUTH_MODE", "token")
    env_vars.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    env_vars.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    port = _free_port()
    temp_dir = Path(f"/tmp/ki-ray-{os.getpid()}")  # Ray's socket paths must stay short
    log = tmp_path_factory.mktemp("ray") / "head.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the workers import ki_data from this checkout
    with open(log, "w") as f:
        head = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--num-cpus=2",
             f"--port={port}", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
             "--object-store-memory=200000000"],
            stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.time() + 180
    while "Ray runtime started" not in log.read_text():
        assert head.poll() is None and time.time() < deadline, f"the Ray head did not start:\n{log.read_text()}"
        time.sleep(0.5)
    yield RayCluster(f"127.0.0.1:{port}", head.pid)
    head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)
    env_vars.undo()


def _ray(cluster: RayCluster, **kw) -> ExecutorConfig:
    return ExecutorConfig(kind="ray", ray_address=cluster.address, **kw)


@pytest.mark.slow
def test_ray_executor_writes_the_local_shards(dataset, local_out, ray_cluster, tmp_path):
    out = tmp_path / "ray"
    result = run_preprocess(PreprocessConfig(dataset.repo_id, output=str(out), workers=2,
                                             executor=_ray(ray_cluster, tasks=3), **OPTIONS))
    assert _shas(out) == _shas(local_out) and len(_shas(out)) == 5
    s = result.summary
    assert (s["executor"], s["tasks"], s["workers"], s["shards_reused"]) == ("ray", 3, 2, 0)
    assert not (out / ".ki_progress").exists()


@pytest.mark.slow
def test_killed_ray_worker_is_retried_and_keeps_finished_shards(dataset, local_out, ray_cluster, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "pipelines.preprocess", dataset.repo_id, "--output", str(out), *CLI_OPTIONS,
            "--executor", "ray", "--ray-address", ray_cluster.address, "--tasks", "2", "--workers", "2"]
    run = subprocess.Popen(args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, killed, kept = time.time() + 240, [], {}
    while time.time() < deadline and run.poll() is None and not killed:
        sidecars = list((out / ".ki_progress").glob("*.parquet.json"))
        if sidecars:
            # A task has finished a shard and is writing its next: kill every worker process running a task.
            shard = out / "shards" / sidecars[0].name.removesuffix(".json")
            kept = {shard: (shard.stat().st_ino, shard.stat().st_mtime_ns)}
            for p in ray_cluster.task_processes():
                p.kill()
                killed.append(p.pid)
        time.sleep(0.01)
    stdout, stderr = run.communicate(timeout=300)
    assert killed, "no Ray task was running when the first shard was finished"
    assert run.returncode == 0, stderr
    assert _shas(out) == _shas(local_out)
    for shard, (inode, mtime) in kept.items():  # finished before the kill: not written again
        assert (shard.stat().st_ino, shard.stat().st_mtime_ns) == (inode, mtime)
    assert not [p for p in out.rglob("*") if ".tmp." in p.name]
    assert "on the ray executor (2 task(s)" in stdout


@pytest.mark.slow
def test_run_interrupted_locally_finishes_on_ray(dataset, local_out, ray_cluster, tmp_path, monkeypatch):
    out = tmp_path / "moved"
    interrupt_after_shards(monkeypatch, PreprocessConfig(dataset.repo_id, output=str(out), **OPTIONS))
    result = run_preprocess(PreprocessConfig(dataset.repo_id, output=str(out), workers=2,
                                             executor=_ray(ray_cluster), **OPTIONS))
    assert _shas(out) == _shas(local_out)
    assert result.summary["shards_reused"] == 2 and result.summary["executor"] == "ray"


def test_slurm_job_is_written_and_a_local_run_finishes_it(dataset, local_out, tmp_path):
    out = tmp_path / "slurm"
    slurm = ExecutorConfig(kind="slurm", tasks=3, slurm_partition="cpu", slurm_time="01:30:00",
                           slurm_cpus_per_task=4, mem_per_cpu_gb=3)
    job = write_slurm_preprocess(PreprocessConfig(dataset.repo_id, output=str(out), workers=2, executor=slurm,
                                                  **OPTIONS))
    assert isinstance(job, SlurmJob) and job.tasks == 3
    assert not (out / "manifest.json").exists() and (out / "tokenizer/text.model").is_file()  # pass 1 ran here
    script = job.pass2_script.read_text()
    for line in ("#SBATCH --partition=cpu", "#SBATCH --time=01:30:00", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --mem-per-cpu=3G", "#SBATCH --array=0-2%2", "launch_pickled_pipeline"):
        assert line in script
    assert "#SBATCH --array=0-0" in job.merge_script.read_text()
    submit = job.submit_script.read_text()
    assert "RUN_OFFSET=$offset" in submit and "--dependency=afterok:" in submit and str(job.merge_script) in submit
    assert f"bash {job.submit_script}" in job.instructions()
    with open(job.pass2_script.parent / "executor.pik", "rb") as f:  # what `launch_pickled_pipeline` loads
        executor = dill.load(f)
    assert executor.world_size == 3 and Path(executor.pipeline[0].job_path).is_file()
    with pytest.raises(Exception, match="needs --slurm-partition"):
        write_slurm_preprocess(PreprocessConfig(dataset.repo_id, output=str(out), executor=ExecutorConfig("slurm"),
                                                **OPTIONS))
    # Started again on the local executor, the same job finishes: same shards, one manifest.
    done = run_preprocess(PreprocessConfig(dataset.repo_id, output=str(out), **OPTIONS))
    assert _shas(out) == _shas(local_out) and done.summary["executor"] == "local"


def test_same_shards_whatever_the_task_count(dataset, local_out, tmp_path):
    out = tmp_path / "tasks"
    result = run_preprocess(PreprocessConfig(dataset.repo_id, output=str(out), workers=2,
                                             executor=ExecutorConfig(tasks=2), **OPTIONS))
    assert _shas(out) == _shas(local_out) and result.summary["tasks"] == 2
