"""LeRobot dataset -> token shards (docs/DESIGN.md §3-4): the library behind `python -m pipelines.preprocess`.

Pass 1 (tabular columns only, every selected episode, one process): row checks, normalization statistics, the
offline text tokenizer (unless one is given) and the FAST tokenizer (unless one is given) fitted on every row's
normalized chunk; then the draft manifest, which says everything the shards will hold. Pass 2 (DataTrove tasks over
groups of whole shards, on this machine, a Ray cluster or Slurm), with the draft and the pass-1 artifacts opened as
`DataArtifacts`: columns read in bulk, each camera decoded once sequentially, images resized/padded and encoded, each
frame made into its row by `schema.frame_row` (the Policy's function too), one parquet shard written atomically per
planned group of episodes. A final merge adds the shards and the summary to the draft, writes it as the manifest, and
a Hugging Face dataset card (`datasets.load_dataset(<out>)` opens the shards).

Determinism: the shard plan (which episodes go to which file) depends only on the inputs and options, never on
the executor, task or worker count, and each shard is written by one task from the same code, so shards have the
same bytes wherever they are written. A killed run leaves finished shards with a sidecar (rows, sha256, options
fingerprint) in `<out>/.ki_progress/`; the next run (on any executor) reuses those whose file still hashes to the
sidecar, skips the tasks DataTrove logged as complete, and redoes the rest.

The modules, in the order a run meets them:

    config    PreprocessConfig and the errors a user can fix
    plan      episodes, cameras, the train/val split, which episodes go to which shard
    checks    rows that cannot become training rows, and why
    chunks    action chunks inside an episode
    pass1     statistics and tokenizers from the tabular columns
    pass2     episodes -> shard rows -> one parquet shard (ShardWorker)
    executors pass 2 as DataTrove tasks: local processes or a Ray cluster
    slurm     pass 2 as a Slurm job array and the merge job, written for sbatch
    resume    fingerprints, sidecars, the draft manifest, what an interrupted run left and whether it can be kept
    merge     the final step: the draft + sidecars -> manifest (with the summary) and the dataset card
    card      the dataset card: Hugging Face features and data files from the manifest
    run       run_preprocess / write_slurm_preprocess: the job from start to merge, the draft manifest
    describe  the end summary and a few decoded rows
"""

from ki_data.preprocess.checks import REASONS, RowProblems, find_row_problems
from ki_data.preprocess.chunks import action_chunks, chunk_indices
from ki_data.preprocess.card import hf_features, write_card
from ki_data.preprocess.config import (
    EXECUTORS,
    BadInputError,
    ExecutorConfig,
    OutputExistsError,
    PreprocessConfig,
    PreprocessError,
)
from ki_data.preprocess.describe import describe_rows, summary_text
from ki_data.preprocess.executors import Pass2Job, task_groups
from ki_data.preprocess.merge import PreprocessResult
from ki_data.preprocess.pass1 import FitChunkCollector, Pass1Result, run_pass1
from ki_data.preprocess.pass2 import ShardResult, ShardWorker
from ki_data.preprocess.plan import (
    JobPlan,
    ShardPlan,
    plan_job,
    plan_shards,
    select_cameras,
    select_episodes,
    split_episodes,
)
from ki_data.preprocess.run import run_preprocess, write_slurm_preprocess
from ki_data.preprocess.slurm import SlurmJob

__all__ = [
    "EXECUTORS",
    "REASONS",
    "BadInputError",
    "ExecutorConfig",
    "FitChunkCollector",
    "JobPlan",
    "OutputExistsError",
    "Pass1Result",
    "Pass2Job",
    "PreprocessConfig",
    "PreprocessError",
    "PreprocessResult",
    "RowProblems",
    "ShardPlan",
    "ShardResult",
    "ShardWorker",
    "SlurmJob",
    "action_chunks",
    "chunk_indices",
    "describe_rows",
    "find_row_problems",
    "hf_features",
    "plan_job",
    "plan_shards",
    "run_pass1",
    "run_preprocess",
    "select_cameras",
    "select_episodes",
    "split_episodes",
    "summary_text",
    "task_groups",
    "write_card",
    "write_slurm_preprocess",
]
