"""The machine a run computes on, resolved once from the settings: backend, devices and workers,
dtype and its Keras policy, XLA, the seed and the folders this worker writes.

`resolve_machine(settings)` does every side effect of setting up (Habana's module, seeds and op
determinism, the cluster, the Keras dtype policy) in that order, and returns a frozen `Machine`
that nothing changes later.
"""
import os
import random
import tempfile
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from common.errors import UserError


@dataclass(frozen=True)
class Machine:
    """What a run computes on and writes to; `tf` is TensorFlow when imported, else None."""
    backend: str
    tf: object
    hpu: object  # runtime.setup.hpu.Hpu or None
    cluster: object  # runtime.setup.cluster.Cluster
    device: object  # runtime.setup.precision.Device of this process
    dtype: str  # 'fp32', 'bf16' or 'fp16' (--use_amp)
    policy: str  # the Keras dtype policy in force
    use_xla: bool
    seed: Optional[int]
    model_dir: str  # this worker's (model_dir/worker_N with --log_all_workers)
    log_dir: str
    writes: bool  # this worker saves and logs
    conv_kernel: str = "auto"

    @property
    def gpu(self):
        """Whether the run computes on a GPU."""
        return self.device.kind == "gpu"


def writable_dir(path, flag):
    """Create `path` if needed and check that files can be written there."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(f"{flag} {path}: not writable ({err.strerror}); choose another folder") from None
    return path


def seed_everything(seed, backend, tf):
    """Seed Python, NumPy and TensorFlow (and make TensorFlow's ops deterministic)."""
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed)
    if tf is not None:
        tf.random.set_seed(seed)
    if backend == "tensorflow":
        tf.config.experimental.enable_op_determinism()
        _one_op_at_a_time_on_cpu(tf)


def _one_op_at_a_time_on_cpu(tf):
    """On CPU, TensorFlow's gradients through the normalization layers part in the last bits when
    other ops run beside them (op determinism does not cover it; V-Net's batch normalization shows
    it within a few steps), so a seeded run there runs one op at a time, each op on every core.
    TensorFlow takes this only before it starts: a run inside a process that already used it
    (a test's in-process run) keeps that process's threading, with a warning."""
    if tf.config.list_physical_devices("GPU") or tf.config.threading.get_inter_op_parallelism_threads() == 1:
        return
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        warnings.warn("--seed: TensorFlow was already running in this process, so its ops may run "
                      "side by side and the last bits of the losses may differ between runs")


def _agreed_seed(seed, cluster):
    """Several JAX processes build their weights on the global mesh, which JAX checks to be the
    same on every process: without --seed they all take process 0's random seed."""
    if cluster.jax_processes and seed is None:
        return int(cluster.broadcast(np.int32(np.random.SeedSequence().entropy % 2 ** 31)))
    return seed


def _import_tensorflow(settings):
    """TensorFlow for the TF backend or for tf.data inputs (then without GPUs, which are JAX's)."""
    from common.quiet_import import import_tensorflow
    precision = settings.precision
    if precision.backend == "jax" and settings.data.synth_data:
        return None
    tf = import_tensorflow(settings.run.tf_verbosity)
    if precision.backend == "jax":
        tf.config.set_visible_devices([], "GPU")
    return tf


def resolve_machine(settings):
    """Set the machine up for `settings` and describe it (see the module's docstring)."""
    from runtime.setup.cluster import make_cluster
    from runtime.setup.gpus import nvidia_gpus, unused_gpu_notice
    from runtime.setup.hpu import check_bf16_config, setup_hpu
    from runtime.setup.precision import (Device, amx_off_for_bf16, choose_dtype, keras_policy,
                                         local_device)
    precision, run = settings.precision, settings.run
    if precision.bf16_config_explicit:
        check_bf16_config(precision.bf16_config_path)
    hpu = setup_hpu(precision, run.tf_verbosity) if precision.backend == "tensorflow" else None
    tf = _import_tensorflow(settings)  # quietly, before Keras imports it
    import keras
    seed_everything(settings.data.seed, precision.backend, tf)
    if precision.backend == "jax":
        use_xla = True
    elif precision.use_xla is None:
        use_xla = bool(tf.config.list_physical_devices("GPU"))
    else:
        use_xla = precision.use_xla
    cluster = make_cluster(precision, settings.processes, tf)
    with cluster.failures():
        seed = _agreed_seed(settings.data.seed, cluster)
        if seed != settings.data.seed:
            seed_everything(seed, precision.backend, tf)
        device = Device("hpu") if hpu else local_device(precision.backend, tf)
        notice = unused_gpu_notice(precision.backend, device.kind, nvidia_gpus(),
                                   os.environ.get("CUDA_VISIBLE_DEVICES"))
        if notice and cluster.is_chief:
            print(notice, flush=True)
        dtype = hpu.dtype if hpu else choose_dtype(precision, device)
        isa_notice = amx_off_for_bf16(dtype, precision.backend, device)
        if isa_notice and cluster.is_chief:
            print(isa_notice, flush=True)
    policy = keras_policy(dtype, hpu)
    keras.mixed_precision.set_dtype_policy(policy)
    model_dir, log_dir = run.model_dir, run.log_dir
    if run.log_all_workers and cluster.num_workers > 1:
        model_dir = os.path.join(model_dir, f"worker_{cluster.worker_id}")
        log_dir = os.path.join(log_dir, f"worker_{cluster.worker_id}")
    writes = cluster.is_chief or run.log_all_workers
    if writes:
        writable_dir(model_dir, "--model_dir")
        if run.output_dir and run.predicts:
            writable_dir(run.output_dir, "--output_dir")
        writable_dir(log_dir, "--log_dir")
    return Machine(backend=precision.backend, tf=tf, hpu=hpu, cluster=cluster, device=device,
                   dtype=dtype, policy=policy, use_xla=use_xla, seed=seed, model_dir=model_dir,
                   log_dir=log_dir, writes=writes, conv_kernel=precision.conv_kernel)
