"""XLA compilation settings shared by training, evaluation and the Policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax


def compiler_options(fast_compile: bool) -> dict[str, Any] | None:
    """XLA options for jax.jit. fast_compile (CPU only): backend optimisation off, which compiles this model ~3x
    faster and runs it ~2x slower; worth it for runs of seconds to minutes (tests, the CPU demo)."""
    if fast_compile and jax.default_backend() == "cpu":
        return {"xla_backend_optimization_level": 0}
    return None


def enable_compilation_cache(path: str | Path, min_compile_time_s: float = 0.5) -> None:
    """Keep compiled XLA programs under `path`: a later compile of the same program (another run, another
    process, or a re-created jitted function) loads it instead. CPU compiles of this model take tens of seconds."""
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    compilation_cache.reset_cache()  # the cache is set up once per process; pick up the new directory
