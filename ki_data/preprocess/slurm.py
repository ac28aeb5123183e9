"""Pass 2 as a Slurm job array, written for the user to submit: DataTrove's `SlurmPipelineExecutor` for the
array (one array task per DataTrove task, `WriteShards`) and for the merge job that depends on it (`MergeShards`:
manifest and dataset card), plus `submit.sh`, which submits both with the dependency. Pass 1 ran in the command that
wrote the job; the tasks read the same job file as on the other executors."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import sys
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from ki_data.preprocess.config import ExecutorConfig
from ki_data.preprocess.executors import Pass2Job, WriteShards, job_artifacts, load_job
from ki_data.preprocess.merge import RunRecord, finish


class MergeShards(PipelineStep):
    """DataTrove step for Slurm's dependent job: the final merge (manifest, dataset card) once every shard is done."""

    name = "merge"
    type = "ki manifest"

    def __init__(self, job_path: str, record: RunRecord):
        super().__init__()
        self.job_path, self.record = job_path, record

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> None:
        job = load_job(self.job_path)
        result = finish(job_artifacts(job), job, self.record)
        print(result.summary_text())


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    """A written Slurm job: pass 2 as an array, then the merge, submitted together by `submit_script`."""

    out_dir: Path
    submit_script: Path
    pass2_script: Path
    merge_script: Path
    tasks: int

    def instructions(self) -> str:
        return (f"wrote a Slurm job for {self.out_dir}: pass 2 as {self.tasks} task(s) ({self.pass2_script}), then "
                f"the merge that writes the manifest ({self.merge_script}).\n"
                f"submit it from a login node of the cluster with:\n  bash {self.submit_script}\n"
                f"the output directory must be on a filesystem the nodes share; run the same preprocess command again "
                f"to resubmit what did not finish")


def _environment_command() -> str:
    """What a Slurm task runs first: this Python environment and this working directory (so ki imports)."""
    cwd = shlex.quote(os.getcwd())
    lines = [f"cd {cwd}", f"export PYTHONPATH={cwd}${{PYTHONPATH:+:$PYTHONPATH}}"]
    activate = Path(sys.prefix) / "bin" / "activate"
    if activate.is_file():
        lines.insert(0, f"source {shlex.quote(str(activate))}")
    return " && ".join(lines)  # one line: DataTrove places it inside an indented template


def _write_launch(executor) -> tuple[Path, int]:
    """Write what DataTrove's `SlurmPipelineExecutor.launch_job` writes before it calls sbatch (the pickled
    executor, the ranks to run, the array script), without submitting. Returns (script, array submissions needed)."""
    import dill
    from dill import CONTENTS_FMODE

    ranks = executor.get_incomplete_ranks()
    with executor.logging_dir.open("executor.pik", "wb") as f:
        dill.dump(executor, f, fmode=CONTENTS_FMODE)
    executor.save_executor_as_json()
    with executor.logging_dir.open("ranks_to_run.json", "w") as f:
        json.dump(ranks, f)
    jobs = math.ceil(len(ranks) / executor.tasks_per_job)
    max_array = min(jobs, executor.max_array_size) if executor.max_array_size != -1 else jobs
    command = f"srun -l -n 1 launch_pickled_pipeline {executor.logging_dir.resolve_paths('executor.pik')}"
    with executor.logging_dir.open("launch_script.slurm", "w") as f:
        f.write(executor.get_launch_file_contents(executor.get_sbatch_args(max_array), command))
    return Path(executor.logging_dir.resolve_paths("launch_script.slurm")), math.ceil(jobs / max_array)


def write_slurm_job(ex: ExecutorConfig, workers: int, job_path: Path, job: Pass2Job, todo: list[int], record: RunRecord,
                    logging_dir: Path) -> SlurmJob:
    from datatrove.executor.slurm import SlurmPipelineExecutor

    # sbatch takes whole gigabytes here; no QoS line, so the cluster's default applies.
    common = dict(time=ex.slurm_time, partition=ex.slurm_partition, mem_per_cpu_gb=math.ceil(ex.mem_per_cpu_gb),
                  env_command=_environment_command(), skip_completed=True, mail_type="NONE", qos="")
    pass2 = SlurmPipelineExecutor(
        pipeline=[WriteShards(str(job_path))], tasks=job.tasks, cpus_per_task=ex.slurm_cpus_per_task,
        workers=workers or -1, job_name="ki-pass2", logging_dir=str(logging_dir), **common)
    merge = SlurmPipelineExecutor(
        pipeline=[MergeShards(str(job_path), record)], tasks=1, cpus_per_task=1, job_name="ki-merge",
        logging_dir=str(logging_dir.parent / "merge"), **common)
    pass2_script, arrays = _write_launch(pass2)
    merge_script, _ = _write_launch(merge)
    submit = logging_dir.parent / "submit.sh"
    submit.write_text(
        "#!/bin/bash\n"
        f"# pass 2: {len(todo)} of {job.tasks} task(s) to run, as {arrays} array job(s); then the merge, which runs "
        "once they all succeed and writes manifest.json.\n"
        "set -euo pipefail\nids=()\n"
        f"for offset in $(seq 0 {arrays - 1}); do\n"
        f"  ids+=($(sbatch --parsable --export=ALL,RUN_OFFSET=$offset {pass2_script} | cut -d';' -f1))\n"
        "done\n"
        "after=$(IFS=:; echo \"${ids[*]}\")\n"
        f"merge=$(sbatch --parsable --dependency=afterok:$after {merge_script} | cut -d';' -f1)\n"
        f"echo \"pass 2: job(s) ${{ids[*]}}; merge: job $merge (writes {job.out / 'manifest.json'})\"\n"
    )
    submit.chmod(0o755)
    return SlurmJob(job.out, submit, pass2_script, merge_script, job.tasks)
