"""Checkpoints: the model's and the optimizer's variables and the step, as one .npz file.

Files are `model_dir/checkpoints/ckpt-<step>.npz`. Each is written to a temporary name and
renamed when complete, so a crash mid-write leaves no file that looks whole; the newest complete
one is kept and older ones this tool wrote are removed. Nothing else in model_dir is touched.
Before writing, the free space of the folder is checked against the checkpoint's size (known from
its arrays): too little is a one-line error and the previous checkpoint stays.
Plain NumPy arrays make the format the same on every Keras backend.
"""
from __future__ import annotations

import glob
import os
import re
import zipfile
from typing import Any, Optional, Sequence

import numpy as np

from common.errors import UserError
from common.output_files import free_bytes, megabytes, replacing

PATTERN = re.compile(r"^ckpt-(\d+)\.npz$")
# What an array adds to its bytes in an .npz: its .npy header and the zip's two entries for it.
BYTES_PER_ARRAY = 512


def checkpoint_dir(model_dir: str) -> str:
    """The folder of the checkpoints inside `model_dir`."""
    return os.path.join(model_dir, "checkpoints")


def list_checkpoints(model_dir: str) -> list[tuple[int, str]]:
    """[(step, path)] of the complete checkpoints, oldest first."""
    found = []
    for path in glob.glob(os.path.join(checkpoint_dir(model_dir), "ckpt-*.npz")):
        match = PATTERN.match(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(model_dir: str) -> Optional[tuple[int, str]]:
    """(step, path) of the newest checkpoint, or None."""
    found = list_checkpoints(model_dir)
    return found[-1] if found else None


def _variables(model, optimizer):
    variables = list(model.variables)
    if optimizer is not None:
        variables += list(optimizer.variables)
    return variables


def save(model_dir: str, step: int, model: Any, optimizer: Any = None) -> str:
    """Write the checkpoint of `step` atomically, then drop the older ones; returns its path.

    Too little free space for it, or a failed write, is a UserError; the older ones then stay."""
    folder = checkpoint_dir(model_dir)
    os.makedirs(folder, exist_ok=True)
    arrays = {f"v{i:05d}": np.asarray(v.numpy() if hasattr(v, "numpy") else v)
              for i, v in enumerate(_variables(model, optimizer))}
    arrays["step"] = np.int64(step)
    need = sum(a.nbytes + BYTES_PER_ARRAY for a in arrays.values())
    free = free_bytes(folder)
    if free < need:
        kept = latest_checkpoint(model_dir)
        kept = f"the checkpoint of step {kept[0]} is kept" if kept else "no checkpoint was written"
        raise UserError(f"{folder}: the checkpoint of step {step} needs {megabytes(need)} and "
                        f"{megabytes(free)} are free; {kept}. Free space there, then continue "
                        "with --resume_training")
    final = os.path.join(folder, f"ckpt-{step}.npz")
    with replacing(final) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
    for old_step, path in list_checkpoints(model_dir):
        if old_step != step:
            os.remove(path)
    return final


def load(path: str) -> tuple[list[np.ndarray], int]:
    """The arrays of a checkpoint file, in variable order, and its step."""
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(f"{path}: unreadable checkpoint ({err}); remove it to fall back on an "
                        "older one or train again") from None
    step = int(arrays.pop("step"))
    return [arrays[key] for key in sorted(arrays)], step


def variables_of(model: Any, optimizer: Any = None) -> list[Any]:
    """The variables a checkpoint holds, in its order; builds `optimizer` if needed."""
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
    return _variables(model, optimizer)  # the model's come first, so they load alone too


def check(arrays: Sequence[np.ndarray], path: str, variables: Sequence[Any]) -> None:
    """A UserError unless `arrays` (from the checkpoint at `path`) fit `variables`."""
    if len(arrays) < len(variables):
        raise UserError(f"{path}: holds {len(arrays)} arrays, the model needs {len(variables)}; it "
                        "was written for another network or flags (--normalization?)")
    for i, variable in enumerate(variables):
        if tuple(arrays[i].shape) != tuple(variable.shape):
            raise UserError(f"{path}: array {i} has shape {arrays[i].shape}, the model expects "
                            f"{tuple(variable.shape)}; it was written for another network or flags")


def restore(path: str, model: Any, optimizer: Any = None) -> int:
    """Load a checkpoint into `model` (and `optimizer`, built here if needed); returns its step."""
    variables = variables_of(model, optimizer)
    arrays, step = load(path)
    check(arrays, path, variables)
    for variable, value in zip(variables, arrays):
        variable.assign(value)
    return step
