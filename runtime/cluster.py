"""Who the workers are and how they share gradients: tf.distribute or Horovod.

- TF_CONFIG (Kubernetes TFJob, or set by hand): MultiWorkerMirroredStrategy over its workers.
- An Open MPI launch (`mpirun -np N python main.py ...`): each rank picks a free port, mpi4py
  gathers the addresses, and they become the TF_CONFIG of a MultiWorkerMirroredStrategy.
- A SLURM step of several tasks (`srun`): MultiWorkerMirroredStrategy from SLURM's variables.
- One process with several GPUs: MirroredStrategy. Otherwise the default (one device).
- `--use_horovod`: Horovod's rank and size, variables broadcast from rank 0, gradients all-reduced.
"""
import contextlib
import json
import os
import socket

from common.errors import UserError

COLLECTIVE_TIMEOUT_S = 120
SLURM_PORT = 8888


class Cluster:
    """The worker's place: `worker_id`, `num_workers` (input pipelines), `num_replicas` (devices in
    all), the tf.distribute `strategy`, and `horovod` (the module, with --use_horovod)."""

    def __init__(self, strategy, worker_id=0, num_workers=1, horovod=None, num_replicas=None,
                 lost_errors=()):
        self.strategy, self.horovod = strategy, horovod
        self.worker_id, self.num_workers = worker_id, num_workers
        self.num_replicas = num_replicas or (num_workers if horovod else strategy.num_replicas_in_sync)
        self.lost_errors = lost_errors

    @property
    def is_chief(self):
        """Worker 0: the one that saves, evaluates, predicts and logs."""
        return self.worker_id == 0

    @contextlib.contextmanager
    def failures(self):
        """Turn a lost peer (a dead worker, a collective timeout) into a one-line UserError."""
        try:
            yield
        except self.lost_errors as err:
            lines = [line.strip() for line in (err.message or "").splitlines() if line.strip()]
            reason = next((line for line in lines if "aborted" in line.lower()), lines[0] if lines else "")
            raise UserError(f"worker {self.worker_id} of {self.num_workers}: lost contact with the "
                            f"other workers ({reason}); stopping. Restart every worker with "
                            "--resume_training to continue from the last checkpoint") from None


def import_horovod():
    """horovod.tensorflow, or a UserError naming the tf.distribute alternative."""
    try:
        import horovod.tensorflow as hvd
    except ImportError:
        raise UserError("--use_horovod: Horovod is not installed; leave out --use_horovod to train "
                        "on several workers with tf.distribute (launch with mpirun, srun or "
                        "TF_CONFIG)") from None
    return hvd


def mpi_tf_config():
    """A TF_CONFIG for this Open MPI rank, from every rank's address gathered with mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError("launched by mpirun but mpi4py is not installed: pip install mpi4py") from None
    comm = MPI.COMM_WORLD
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    hosts = comm.allgather(socket.gethostname())
    ports = comm.allgather(port)
    # All ranks on this one host: loopback addresses need no name resolution.
    names = ["localhost"] * len(hosts) if len(set(hosts)) == 1 else hosts
    workers = [f"{host}:{p}" for host, p in zip(names, ports)]
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": comm.Get_rank()}}


def launched_by(environ):
    """'tf_config', 'mpi', 'slurm' or None: how the process was started."""
    if environ.get("TF_CONFIG"):
        return "tf_config"
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "mpi"
    if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in environ:
        return "slurm"
    return None


def make_cluster(args, tf):
    """The Cluster of this process; must run before TensorFlow touches a device.

    With the JAX backend: one process over its local devices (`tf` may be None).
    """
    how = launched_by(os.environ)
    if args.backend == "jax":
        if how is not None:
            raise UserError(f"launched as one of several workers ({how}): multi-worker runs need "
                            "--backend tensorflow; the JAX backend uses every GPU of one host")
        import jax
        return Cluster(None, num_replicas=jax.local_device_count())

    if args.use_horovod:
        hvd = import_horovod()
        hvd.init()
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            tf.config.set_visible_devices(gpus[hvd.local_rank()], "GPU")
        return Cluster(tf.distribute.get_strategy(), hvd.rank(), hvd.size(), horovod=hvd)

    if how is None:
        if len(tf.config.list_physical_devices("GPU")) > 1:
            return Cluster(tf.distribute.MirroredStrategy())
        return Cluster(tf.distribute.get_strategy())

    resolvers = tf.distribute.cluster_resolver
    if how == "mpi":
        os.environ["TF_CONFIG"] = json.dumps(mpi_tf_config())
    if how == "slurm":
        resolver = resolvers.SlurmClusterResolver(port_base=SLURM_PORT)
    else:
        resolver = resolvers.TFConfigClusterResolver()
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=COLLECTIVE_TIMEOUT_S)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver,
                                                         communication_options=options)
    num_workers = len(resolver.cluster_spec().as_dict().get("worker", [])) or 1
    lost = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError,
            tf.errors.CancelledError)
    return Cluster(strategy, resolver.task_id or 0, num_workers, lost_errors=lost)
