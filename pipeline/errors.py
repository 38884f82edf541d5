"""The exceptions that decide the exit code: 0 success, 1 a quality gate failed (GateFailed, TrainingDiverged), 2 bad
input (UserError), INTERNAL_ERROR for anything unexpected (`report_internal_error`)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path


class UserError(Exception):
    """An error the user caused (bad input, bad config): the CLI prints its message and exits with 2."""


class GateFailed(Exception):
    """A quality gate failed (the results are written): the CLI prints the message and exits with 1."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite (the last good weights are saved): the CLI prints the message and exits with 1."""


INTERNAL_ERROR = 70  # an unexpected exception (BSD's EX_SOFTWARE): never 1 (a failed gate) or 2 (bad input)


def report_internal_error(error: BaseException, folder: str | os.PathLike[str] | None = None) -> int:
    """An unexpected exception: its traceback into a log file (in `folder` where writable, else the temporary
    folder), one `internal error:` line on stderr naming it, and INTERNAL_ERROR to exit with."""
    text = "".join(traceback.format_exception(error))
    stamp = time.strftime("%Y%m%dT%H%M%S")
    log_path = None
    for where in ([folder] if folder else []) + [tempfile.gettempdir()]:
        candidate = Path(where) / f"facd-pipeline-error-{stamp}-{os.getpid()}.log"
        try:
            candidate.write_text(text)
        except OSError:
            continue
        log_path = candidate
        break
    where = f"traceback in {log_path}" if log_path else "the traceback could not be written"
    message = str(error).splitlines()[0] if str(error) else ""
    print(f"internal error: {type(error).__name__}: {message}; please report it ({where})", file=sys.stderr)
    return INTERNAL_ERROR
