"""What the terminal shows: our progress bars and summaries; what libraries print goes to a log file.

C libraries (ffmpeg through PyAV), worker processes (DataTrove's task logs, written by loguru to file descriptor 2) and
anything else that writes to the process's stderr descriptor end up in the log; Python's `sys.stderr` (tqdm bars,
our messages) keeps pointing at the terminal.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

LOG_DIR_ENV = "KI_LOG_DIR"  # where commands put their library logs; default: beside their output


def log_file(command: str, output: str | Path) -> Path:
    """`$KI_LOG_DIR/<command>.log`, else `<output>.<command>.log` beside the command's output directory (not inside:
    an output directory is refused or cleared as a whole by some commands)."""
    env = os.environ.get(LOG_DIR_ENV)
    if env:
        return Path(env) / f"{command}.log"
    out = Path(output)
    return out.parent / f"{out.name}.{command}.log"


@contextlib.contextmanager
def library_output_to(path: Path | None) -> Iterator[Path | None]:
    """Inside: file descriptor 2 appends to `path`, `sys.stderr` writes to the terminal. None: nothing changes."""
    if path is None:
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    terminal_fd = os.dup(2)
    terminal = os.fdopen(terminal_fd, "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8")
    saved = sys.stderr
    with path.open("a") as log:
        os.dup2(log.fileno(), 2)
        sys.stderr = terminal
        try:
            yield path
        finally:
            sys.stderr.flush()
            os.dup2(terminal_fd, 2)
            sys.stderr = saved
            terminal.close()
