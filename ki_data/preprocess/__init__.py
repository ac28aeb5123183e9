"""LeRobot dataset -> token shards (docs/DESIGN.md §3-4): the library behind `python -m pipelines.preprocess`.

Pass 1 (tabular columns only, every selected episode): row checks, normalization statistics, the offline text
tokenizer (unless one is given) and the FAST tokenizer (unless one is given) fitted on every row's normalized
chunk. Pass 2 (episode by episode, in worker processes over whole shards): columns read in bulk, each camera
decoded once sequentially, chunks cut with numpy, prompts built, images resized/padded and encoded, one parquet
shard written atomically per planned group of episodes.

Determinism: the shard plan (which episodes go to which file) depends only on the inputs and options, never on
the worker count, and each shard is written by one worker from the same code, so shards have the same bytes
whatever `workers` is. A killed run leaves finished shards with a sidecar (rows, sha256, options fingerprint) in
`<out>/.ki_progress/`; the next run reuses those whose file still hashes to the sidecar and redoes the rest.

The modules, in the order a run meets them:

    config    PreprocessConfig and the errors a user can fix
    plan      episodes, cameras, the train/val split, which episodes go to which shard
    checks    rows that cannot become training rows, and why
    chunks    action chunks inside an episode
    pass1     statistics and tokenizers from the tabular columns
    pass2     episodes -> shard columns -> one parquet shard (ShardWorker)
    workers   pass 2 over the shards, in this process or a pool
    resume    fingerprints, sidecars, what an interrupted run left and whether it can be kept
    run       run_preprocess: the job, the manifest it writes and its summary
    describe  the end summary and a few decoded rows
"""

from ki_data.preprocess.checks import REASONS, RowProblems, find_row_problems
from ki_data.preprocess.chunks import action_chunks, chunk_indices
from ki_data.preprocess.config import BadInputError, OutputExistsError, PreprocessConfig, PreprocessError
from ki_data.preprocess.describe import describe_rows, summary_text
from ki_data.preprocess.pass1 import FitChunkCollector, Pass1Result, run_pass1
from ki_data.preprocess.pass2 import Pass2Context, ShardResult, ShardWorker
from ki_data.preprocess.plan import JobPlan, ShardPlan, plan_job, plan_shards, select_cameras, select_episodes, split_episodes
from ki_data.preprocess.run import PreprocessResult, run_preprocess

__all__ = [
    "REASONS",
    "BadInputError",
    "FitChunkCollector",
    "JobPlan",
    "OutputExistsError",
    "Pass1Result",
    "Pass2Context",
    "PreprocessConfig",
    "PreprocessError",
    "PreprocessResult",
    "RowProblems",
    "ShardPlan",
    "ShardResult",
    "ShardWorker",
    "action_chunks",
    "chunk_indices",
    "describe_rows",
    "find_row_problems",
    "plan_job",
    "plan_shards",
    "run_pass1",
    "run_preprocess",
    "select_cameras",
    "select_episodes",
    "split_episodes",
    "summary_text",
]
