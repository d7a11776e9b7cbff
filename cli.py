"""Run a script's main so that user mistakes end in one line on stderr, not a traceback.

    if __name__ == "__main__":
        cli.run(main)

A UserError (bad flag or file), a missing or unreadable path, or a full or read-only disk prints
`error: <message>` once (rank 0 of a multi-process launch) and exits with status 2, like argparse's own errors.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from config import UserError

EXIT_USER_ERROR = 2
USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is the user's to fix (flag, path, disk) rather than a bug."""
    if isinstance(error, (UserError, *USER_OS_ERRORS)):
        return True
    return isinstance(error, OSError) and error.errno in USER_ERRNOS


def process_rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when launched alone)."""
    for name in ("RANK", "LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def error_line(error: BaseException) -> str:
    """The one line printed for a user error (OSError's message with its path, newlines folded)."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        message = f"{error.strerror}: {error.filename}"  # from the OS, e.g. open(): drop the '[Errno 2]' prefix
    else:
        message = str(error) or type(error).__name__
    return "error: " + " ".join(message.split())


def check_writable_folder(path: str | os.PathLike, flag: str) -> None:
    """Fail now, naming `flag`, unless `path` is (or can become) a folder this process can write into.

    Nothing is left behind: the nearest existing folder is probed with a temporary file that is removed at once, so
    a script can refuse an unwritable output folder before spending minutes on work it could not save.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot write in {existing} ({error.strerror or error})") from None


def run(main: Callable[[], Any]) -> Any:
    """Call `main()`; on a user error print one line (rank 0 only) and exit 2 on every process."""
    try:
        return main()
    except Exception as error:  # noqa: BLE001 -- re-raised unless it is the user's to fix
        if not is_user_error(error):
            raise
        if process_rank() == 0:
            print(error_line(error), file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
