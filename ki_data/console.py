"""What the terminal shows: our progress bars and summaries; what libraries print goes to a log file.

Inside `library_output_to(path)`, file descriptor 2 is the log file: C libraries (ffmpeg through PyAV), worker
processes (DataTrove's task logs), Python's `sys.stderr` and every logger writing to it end up there. Our own progress
bars write to `terminal()`, a copy of the terminal's stderr taken on entry.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

LOG_DIR_ENV = "KI_LOG_DIR"  # where commands put their library logs; default: beside their output


def log_file(command: str, output: str | Path) -> Path:
    """`$KI_LOG_DIR/<command>.log`, else `<output>.<command>.log` beside the command's output directory (not inside:
    an output directory is refused or cleared as a whole by some commands)."""
    env = os.environ.get(LOG_DIR_ENV)
    if env:
        return Path(env) / f"{command}.log"
    out = Path(output)
    return out.parent / f"{out.name}.{command}.log"


_terminal: TextIO | None = None


def terminal() -> TextIO:
    """Where our progress bars write: the terminal, also while library output goes to a log."""
    return _terminal or sys.stderr


@contextlib.contextmanager
def library_output_to(path: Path | None) -> Iterator[Path | None]:
    """Inside: file descriptor 2 (and so `sys.stderr`) appends to `path`; `terminal()` is the terminal. None: nothing
    changes."""
    global _terminal
    if path is None or _terminal is not None:  # not asked, or already redirected by a caller
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    terminal_fd = os.dup(2)
    _terminal = os.fdopen(terminal_fd, "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8")
    with path.open("a") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield path
        finally:
            sys.stderr.flush()
            os.dup2(terminal_fd, 2)
            _terminal.close()
            _terminal = None
