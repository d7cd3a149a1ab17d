"""What an engine offers the loops and the run: the seam between them and a backend.

`TFEngine` (tf_engine.py) and `JaxEngine` (jax_engine.py) implement it; they differ only in how a
step is compiled and where the data lives.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol

import numpy as np


class Engine(Protocol):
    """Compiled steps of one model, optimizer, loss and metrics on one backend."""

    metrics_fn: Callable[[Any, Any], dict]

    def train_step(self, x: Any, y: Any) -> Any:
        """One optimizer step on a batch; returns the loss (a backend value, not synced)."""

    def eval_step(self, x: Any, y: Any) -> dict[str, np.ndarray]:
        """Per-sample scores of a batch: {name: (B,) array}."""

    def predict_step(self, x: Any) -> np.ndarray:
        """Argmax masks of a batch, int8 (B, D, H, W)."""

    def compile(self, fn: Callable, donate: tuple = ()) -> Callable:
        """`fn(forward, *args)` compiled for the backend, `forward(x)` being the model's inference."""

    def distribute(self, make_dataset: Callable[[], Iterable]) -> Iterable:
        """The training batches of `make_dataset()`, fed to this process's devices."""

    def prefetch(self, dataset: Iterable) -> Iterable:
        """`dataset`'s batches, staged on the device ahead of the step that takes them."""

    @property
    def several_workers(self) -> bool:
        """Whether other processes train with this one."""

    def agree(self, value: int) -> int:
        """The largest of every worker's `value`, on every worker."""

    def commit(self) -> None:
        """Write the state the steps hold back into the Keras variables (before a checkpoint)."""

    def snapshot(self) -> Any:
        """The model's weights now, as a handle for `use_weights` (ensembles)."""

    def use_weights(self, weights: Any) -> None:
        """Compute with `weights` (a `snapshot()`) from now on."""

    def dump_compiled(self, out_dir: str, x: Any, y: Any) -> None:
        """Write the compiled training step's programs into `out_dir`."""

    def start_trace(self, out_dir: str) -> None:
        """Start the backend's profiler, its trace going under `out_dir`."""

    def stop_trace(self) -> None:
        """Stop the profiler and write its trace."""

    def to_float(self, loss: Any) -> float:
        """The value of a loss (waits for its step)."""
