"""Who the workers are and how they share gradients: tf.distribute, Horovod or jax.distributed.

- TF_CONFIG (Kubernetes TFJob, or set by hand): MultiWorkerMirroredStrategy over its workers.
- An Open MPI launch (`mpirun -np N python main.py ...`): each rank picks a free port, mpi4py
  gathers the addresses, and they become the TF_CONFIG of a MultiWorkerMirroredStrategy.
- A SLURM step of several tasks (`srun`): MultiWorkerMirroredStrategy from SLURM's variables.
- One process with several GPUs: MirroredStrategy. Otherwise the default (one device).
- `--use_horovod`: Horovod's rank and size, variables broadcast from rank 0, gradients all-reduced.
- `--backend jax`: one process over its local devices; several processes (mpirun, srun, or
  `--coordinator_address`, `--num_processes`, `--process_id`) join through `jax.distributed`, and
  its global device list carries Keras' DataParallel layout. On CPU the processes' collectives
  run on gloo (JAX's default CPU collectives).
"""
import contextlib
import json
import os
import socket
import sys

from common.errors import UserError

COLLECTIVE_TIMEOUT_S = 120
SLURM_PORT = 8888
# jax.distributed: a process whose heartbeats stop for this long counts as dead, and JAX ends
# every other process; processes other than 0 wait at exit (up to the shutdown timeout) for
# process 0 to finish evaluating and predicting.
JAX_HEARTBEAT_TIMEOUT_S = 60
JAX_INIT_TIMEOUT_S = 300
JAX_SHUTDOWN_TIMEOUT_S = 24 * 3600
# Signs of a lost peer in a JAX runtime error: gloo's TCP pairs (CPU), NCCL, the coordinator.
JAX_LOST_SIGNS = ("Gloo", "gloo", "Connection reset", "Connection closed", "NCCL", "UNAVAILABLE",
                  "heartbeat")


class Cluster:
    """The worker's place: `worker_id`, `num_workers` (input pipelines), `num_replicas` (devices in
    all), `local_replicas` (the devices one process feeds), the tf.distribute `strategy`,
    `horovod` (the module, with --use_horovod), and `jax_processes`: whether several JAX
    processes share the run (they take process 0's checkpoint through `broadcast`)."""

    def __init__(self, strategy, worker_id=0, num_workers=1, horovod=None, num_replicas=None,
                 lost_errors=(), local_replicas=1, lost_signs=(), jax_processes=False):
        self.strategy, self.horovod = strategy, horovod
        self.worker_id, self.num_workers = worker_id, num_workers
        self.num_replicas = num_replicas or (num_workers if horovod else strategy.num_replicas_in_sync)
        self.local_replicas = local_replicas
        self.lost_errors, self.lost_signs = lost_errors, lost_signs
        self.jax_processes = jax_processes

    @staticmethod
    def broadcast(arrays):
        """Process 0's value of `arrays` (NumPy arrays, a list of them), on every JAX process,
        once every process has come here (runtime/engines/jax_barrier.py)."""
        from jax.experimental import multihost_utils
        from runtime.engines.jax_barrier import wait_for_every_jax_process
        wait_for_every_jax_process("broadcast")
        return multihost_utils.broadcast_one_to_all(arrays)

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
            text = getattr(err, "message", None) or str(err)
            if self.lost_signs and not any(sign in text for sign in self.lost_signs):
                raise
            lines = [line.strip() for line in text.splitlines() if line.strip()]
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


def start_jax_distributed(processes, how):
    """Join the other processes through jax.distributed, before JAX touches a device.

    The explicit flags (or JAX_* variables) win; what they leave unset JAX detects itself under
    Open MPI and SLURM. Open MPI 5 no longer sets the variable JAX's own Open MPI detection reads,
    so there JAX's mpi4py detection is asked for.
    """
    import jax
    detection = None
    if how == "mpi" and "OMPI_MCA_orte_hnp_uri" not in os.environ:
        try:
            import mpi4py  # noqa: F401  (JAX's detection imports it again)
        except ImportError:
            raise UserError("launched by mpirun but mpi4py is not installed: pip install mpi4py, "
                            "or launch with --coordinator_address, --num_processes and "
                            "--process_id") from None
        detection = "mpi4py"
    try:
        jax.distributed.initialize(
            coordinator_address=processes.coordinator_address,
            num_processes=processes.num_processes, process_id=processes.process_id, cluster_detection_method=detection,
            initialization_timeout=JAX_INIT_TIMEOUT_S,
            heartbeat_timeout_seconds=JAX_HEARTBEAT_TIMEOUT_S,
            shutdown_timeout_seconds=JAX_SHUTDOWN_TIMEOUT_S)
    except (ValueError, jax.errors.JaxRuntimeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        where = processes.coordinator_address or "the address JAX detected"
        raise UserError(f"jax.distributed: could not join the other processes at {where} ({reason}); "
                        f"start every process within {JAX_INIT_TIMEOUT_S} s, with the same "
                        "--coordinator_address and --num_processes and its own --process_id "
                        "when not under mpirun or srun") from None


def make_jax_cluster(processes, how):
    """One process over its local devices, or one of several joined through jax.distributed."""
    if how == "tf_config":
        raise UserError("TF_CONFIG is set: it describes TensorFlow workers; with --backend jax "
                        "launch with mpirun, srun or --coordinator_address, --num_processes and "
                        "--process_id (or unset TF_CONFIG)")
    if how is not None or processes.coordinator_address:
        start_jax_distributed(processes, how)
    import jax
    several = jax.process_count() > 1
    return Cluster(None, jax.process_index(), jax.process_count(), num_replicas=jax.device_count(),
                   local_replicas=jax.local_device_count(),
                   lost_errors=(jax.errors.JaxRuntimeError,) if several else (),
                   lost_signs=JAX_LOST_SIGNS, jax_processes=several)


def end_now_if_distributed(code, message=None):
    """In a failed run of several JAX processes, write `message` to stderr and end this process
    at once with `code`; otherwise return `code`.

    JAX's shutdown at exit waits for every other process, which may be waiting in a collective
    for this one: ending at once closes this process's connections, so the others stop too.
    """
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1:
        if message:
            sys.stderr.write(message)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def make_cluster(precision, processes, tf):
    """The Cluster of this process (`precision`: the backend and --use_horovod; `processes`: the
    JAX process flags); must run before TensorFlow or JAX touches a device.

    With the JAX backend `tf` may be None.
    """
    how = launched_by(os.environ)
    if precision.backend == "jax":
        return make_jax_cluster(processes, how)

    if precision.use_horovod:
        hvd = import_horovod()
        hvd.init()
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            tf.config.set_visible_devices(gpus[hvd.local_rank()], "GPU")
        return Cluster(tf.distribute.get_strategy(), hvd.rank(), hvd.size(), horovod=hvd)

    if how is None:
        if len(tf.config.list_physical_devices("GPU")) > 1:
            strategy = tf.distribute.MirroredStrategy()
            return Cluster(strategy, local_replicas=strategy.num_replicas_in_sync)
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
