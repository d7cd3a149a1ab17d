"""One training run per model_dir: the chief holds an exclusive advisory lock on
`model_dir/.lock` (fcntl.flock, released by the kernel when the process ends, however it ends),
with its process id and host written in the file for the message a second run gets."""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from typing import Iterator

from common.errors import UserError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def holding(model_dir: str) -> Iterator[str]:
    """Hold model_dir's lock for the block; a UserError naming the holder when another process
    holds it."""
    path = os.path.join(model_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"--model_dir {model_dir}: cannot create its lock file {LOCK_NAME} "
                        f"({err.strerror}); choose a writable folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").split()
            pid, host = (holder + ["?", "?"])[:2]
            raise UserError(f"--model_dir {model_dir}: another training run uses it (process {pid} "
                            f"on host {host}); wait for it to end, or choose another "
                            "--model_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the only descriptor releases the lock
