"""Import TensorFlow without the C++ start-up chatter it writes to stderr before logging is set up."""
import importlib
import os


def import_tensorflow(verbosity=None):
    """Import and return `tensorflow`.

    `verbosity` (0..3, `--tf_verbosity`) sets TF_CPP_MIN_LOG_LEVEL. Unless it is 0 or 1, stderr is
    silenced for the import itself, because TensorFlow prints its oneDNN and CUDA notices there
    before any log level applies. Python errors raised by the import still propagate.
    """
    level = 3 if verbosity is None else verbosity
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", str(level))
    if verbosity is not None:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = str(verbosity)
    if level < 2 or "tensorflow" in importlib.sys.modules:
        return importlib.import_module("tensorflow")
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        return importlib.import_module("tensorflow")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
