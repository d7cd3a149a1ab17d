"""Outputs written whole or not at all: each goes to a temporary name in its own folder and is
renamed onto its final name once complete, and a failed write (a full disk, a quota, a read-only
or unreadable folder, an I/O error) is a one-line UserError naming the file, with nothing left
under the final name."""
import contextlib
import os
import tempfile

from common.errors import UserError


def _fail(path, err):
    reason = getattr(err, "strerror", None) or str(err).strip().splitlines()[0]
    return UserError(f"{path}: could not be written ({reason}); free space on its disk or choose "
                     "a writable folder, then run again")


@contextlib.contextmanager
def replacing(path, errors=(), keep_extension=False):
    """Yield a temporary path in `path`'s folder (a hidden name ending in .tmp, or in `path`'s
    extension with `keep_extension`, for writers that choose the format by it) to write the
    content to; it replaces `path` when the block ends. An OSError (or one of `errors`, a
    writer's own failure) becomes a UserError naming `path`; the temporary file is removed."""
    folder, name = os.path.split(os.path.abspath(path))
    stem, _, extension = name.partition(".")
    suffix = f".{extension}" if keep_extension and extension else ".tmp"
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=suffix, dir=folder)
        os.close(fd)
        yield tmp
        os.replace(tmp, path)
        tmp = None
    except (OSError, *errors) as err:
        raise _fail(path, err) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def append_line(path, line):
    """Append `line` (and a newline) to the text file `path`; a failed write is a UserError
    naming it, and the file is cut back to what it held before (removed if it was new)."""
    existed = os.path.exists(path)
    size = os.path.getsize(path) if existed else 0
    try:
        with open(path, "a") as handle:
            handle.write(line + "\n")
    except OSError as err:
        with contextlib.suppress(OSError):
            if existed:
                os.truncate(path, size)
            else:
                os.remove(path)
        raise _fail(path, err) from None


def free_bytes(folder):
    """The bytes an unprivileged writer may still write in `folder`'s file system."""
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def megabytes(count):
    """A byte count as 'N.N MB' (10^6 bytes), for messages."""
    return f"{count / 1e6:.1f} MB"
