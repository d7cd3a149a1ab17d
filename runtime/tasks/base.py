"""What every network's task offers the run (`Task`), what its data offers (`TaskData`), and
`make_task`.

A task holds what differs between the networks: its data, model, optimizer, loss and metrics,
how many steps it trains, and how its masks are named and written. It receives its own settings
section, the data settings and the resolved Machine, and nothing else.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Iterable, Optional, Protocol


class TaskData(Protocol):
    """The pipelines of one process, as the run and the loops use them (dataset/data_loader.py's
    BratsData and synthetic data, dataset/msd_loader.py's MsdData)."""

    batch_size: int
    n_train: int
    n_eval: int
    n_test: int

    def train_dataset(self, start_step: int = 0) -> Iterable:
        """Training batches (x, y) from step `start_step` on, endlessly."""

    def eval_dataset(self) -> Iterable:
        """The validation batches (x, y), once."""

    def test_dataset(self) -> Iterable:
        """The prediction batches x, once."""


class Task(abc.ABC):
    """The settings of one network (`net`), the data settings (`data_settings`) and the Machine;
    where the HPU (if any) wants prefetching and its instance norm."""

    def __init__(self, net: Any, data_settings: Any, machine: Any = None):
        self.net, self.data_settings, self.machine = net, data_settings, machine
        hpu = machine.hpu if machine is not None else None
        self.prefetch_device = hpu.device if hpu else None
        self.instance_norm = hpu.instance_norm_layer if hpu else None

    @property
    def seed(self) -> Optional[int]:
        """The run's seed (agreed between processes), or the data settings' one without a machine."""
        return self.machine.seed if self.machine is not None else self.data_settings.seed

    @abc.abstractmethod
    def data(self, worker_id: int = 0, num_workers: int = 1, batch_size: Optional[int] = None,
             need_eval: bool = True, need_test: bool = True, local_streams: int = 1) -> TaskData:
        """The pipelines of this process: its training batch joins the input streams
        worker_id .. worker_id + local_streams - 1 of num_workers (one per device)."""

    @abc.abstractmethod
    def model(self, data: TaskData) -> Any:
        """The Keras model for `data`'s classes and channels."""

    @abc.abstractmethod
    def optimizer(self) -> Any:
        """The Keras optimizer, built by the run."""

    @abc.abstractmethod
    def optimizer_record(self) -> dict:
        """The optimizer's name, ε and update rule, for the saved run settings."""

    @abc.abstractmethod
    def loss_and_metrics(self, data: TaskData) -> tuple[Callable, Callable]:
        """(loss_fn(y, p) -> scalar, metrics_fn(y, p) -> {name: (B,)})."""

    @abc.abstractmethod
    def last_step(self, data: TaskData, num_replicas: int, warmup_steps: Optional[int] = None) -> int:
        """The step training ends after (`warmup_steps` given: a benchmark's)."""

    @abc.abstractmethod
    def mask_names(self, data: TaskData, count: int) -> list[str]:
        """The names of the `count` predicted masks."""

    @abc.abstractmethod
    def nifti_writer(self, data: TaskData, out_dir: str) -> Callable:
        """`write(index, mask)`: a predicted mask as NIfTI on its source's grid into `out_dir`."""

    def finish_train_batch(self) -> Optional[Callable]:
        """The device half of the training transform, or None when the pipeline ships finished
        batches."""
        return None


def make_task(model: str, net: Any, data_settings: Any, machine: Any = None) -> Task:
    """The task of `model` ('unet3d' or 'vnet') for its settings section `net`."""
    if model == "unet3d":
        from runtime.tasks.unet3d import UNet3DTask
        return UNet3DTask(net, data_settings, machine)
    from runtime.tasks.vnet import VNetTask
    return VNetTask(net, data_settings, machine)
