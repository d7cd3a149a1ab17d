"""One run of the tool, stage by stage: set up, data, model, engine, hooks, then the modes."""
import itertools
import math
import os
import random
import tempfile

import numpy as np

from runtime import checkpoint
from common.errors import UserError
from runtime.hooks import (BenchmarkHook, CheckpointHook, Hooks, Logger, LoggingHook, ProfileHook,
                           ProgressHook, TensorBoardHook)
from runtime.tasks import make_task
from runtime.trainer import Trainer

TRAINS = ("train", "train_and_evaluate", "train_and_predict")
EVALUATES = ("evaluate", "train_and_evaluate")
PREDICTS = ("predict", "train_and_predict")


def writable_dir(path, flag):
    """Create `path` if needed and check that files can be written there."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(f"{flag} {path}: not writable ({err.strerror}); choose another folder") from None
    return path


def configure(args):
    """Habana, seeds, determinism and XLA choice (the precision comes with the cluster, in `run`).

    XLA defaults to on when a GPU is visible, off on CPU (ten times slower there) and HPU.
    With the JAX backend, TensorFlow is imported only for tf.data inputs (then without GPUs), and
    XLA is always on. Returns (tensorflow or None, Hpu or None).
    """
    from common.quiet_import import import_tensorflow
    from runtime.hpu import check_bf16_config, setup_hpu
    if args.bf16_config_explicit:
        check_bf16_config(args.bf16_config_path)
    hpu = setup_hpu(args) if args.backend == "tensorflow" else None
    tf = None
    if args.backend == "tensorflow" or not args.synth_data:
        tf = import_tensorflow(args.tf_verbosity)
        if args.backend == "jax":  # tf.data only: the GPUs are JAX's
            tf.config.set_visible_devices([], "GPU")
    seed(args, tf)
    if args.backend == "jax":
        args.use_xla = True
    elif args.use_xla is None:
        args.use_xla = bool(tf.config.list_physical_devices("GPU"))
    return tf, hpu


def seed(args, tf):
    """Seed Python, NumPy and TensorFlow with --seed (and make TensorFlow's ops deterministic)."""
    if args.seed is None:
        return
    random.seed(args.seed)
    np.random.seed(args.seed)
    if tf is not None:
        tf.random.set_seed(args.seed)
    if args.backend == "tensorflow":
        tf.config.experimental.enable_op_determinism()


def agree_on_a_seed(args, tf, cluster):
    """Several JAX processes build their weights on the global mesh, which JAX checks to be the
    same on every process: without --seed they all take process 0's random seed."""
    if cluster.broadcasts and args.seed is None:
        args.seed = int(cluster.broadcast(np.int32(np.random.SeedSequence().entropy % 2 ** 31)))
        seed(args, tf)


def make_hooks(args, logger, save_fn, global_batch, engine):
    """The hooks every mode shares."""
    hooks = [LoggingHook(logger, args.log_every), ProgressHook()]
    if args.dump_config and logger.enabled:
        hooks.append(ProfileHook(engine, args.dump_config))
    if args.benchmark:
        hooks.append(BenchmarkHook(logger, args.warmup_steps, global_batch))
    elif save_fn is not None and not args.disable_ckpt_saving:
        hooks.append(CheckpointHook(save_fn, args.ckpt_every))
    if args.tensorboard_logging and logger.enabled:
        hparams = {k: v for k, v in vars(args).items() if isinstance(v, (bool, int, float, str))}
        hooks.append(TensorBoardHook(args.log_dir, hparams, args.log_every))
    return Hooks(hooks)


def restore_shared(cluster, path, model, optimizer=None):
    """Several JAX processes: process 0 reads the checkpoint at `path` (None: there is none) and
    broadcasts it, and every process assigns the same arrays (JAX assigns a variable of the
    global mesh on every process together). Returns the step, or None without a checkpoint."""
    import keras
    variables = checkpoint.variables_of(model, optimizer)
    arrays, step = [np.zeros(v.shape, keras.backend.standardize_dtype(v.dtype)) for v in variables], -1
    if cluster.is_chief and path is not None:
        stored, step = checkpoint.load(path)
        checkpoint.check(stored, path, variables)
        arrays = stored[:len(variables)]
    step = int(cluster.broadcast(np.int32(step)))
    if step < 0:
        return None
    for variable, value in zip(variables, cluster.broadcast(arrays)):
        variable.assign(value)
    return step


def restore_for_inference(args, model, engine, cluster):
    """Load the newest checkpoint of every --model_dir into `model`, in turn.

    Returns (the first one's step, the members' weights from `engine.snapshot()` when several
    form an ensemble, else None). A checkpoint that does not fit the first one's network is a
    UserError naming its folder. Several JAX processes take process 0's checkpoint."""
    if cluster.broadcasts:
        found = checkpoint.latest_checkpoint(args.model_dir) if cluster.is_chief else None
        if found is None and cluster.is_chief:
            raise UserError(f"--model_dir {args.model_dir}: no checkpoint to "
                            f"{args.exec_mode.split('_')[-1]} with; train first (--exec_mode train) "
                            "or point --model_dir at a trained run")
        return restore_shared(cluster, found and found[1], model), None
    step, members = None, []
    for model_dir in args.model_dirs:
        found = checkpoint.latest_checkpoint(model_dir)
        if found is None:
            raise UserError(f"--model_dir {model_dir}: no checkpoint to {args.exec_mode.split('_')[-1]} "
                            "with; train first (--exec_mode train) or point --model_dir at a trained run")
        try:
            restored = checkpoint.restore(found[1], model)
        except UserError as err:
            if not members:
                raise
            raise UserError(f"--model_dir {model_dir}: its checkpoint holds another network than the "
                            f"one in --model_dir {args.model_dirs[0]}, so they cannot form an "
                            f"ensemble ({err})") from None
        step = restored if step is None else step
        members.append(engine.snapshot())
    return step, members if len(members) > 1 else None


def make_inference(args, data, engine, model, members):
    """The `Inference` of the flags (sliding windows, mirroring, an ensemble), or None when the
    plain centred-window steps serve: one model, no mirroring, no probabilities to save."""
    saves = args.save_probabilities and args.exec_mode in PREDICTS
    if not (args.sliding_window or args.tta or members or saves):
        return None
    from dataset.windows import sliding_window_shape
    from runtime.inference import Inference
    window = sliding_window_shape(data.volume_shape) if args.sliding_window else None
    return Inference(engine, int(model.output.shape[-1]), members=members, window=window,
                     overlap=args.overlap, sw_batch_size=args.sw_batch_size, tta=args.tta)


def start_step_for_training(args, model, optimizer, cluster):
    """0 for a new run; the checkpoint's step with --resume_training. Never overwrites silently.

    Several JAX processes take process 0's checkpoint (broadcast from it), so only process 0
    needs to see model_dir."""
    reads = cluster.is_chief or not cluster.broadcasts
    found = checkpoint.latest_checkpoint(args.model_dir) if reads else None
    if found is not None and not args.resume_training:
        raise UserError(f"--model_dir {args.model_dir} already holds a checkpoint (step {found[0]}); "
                        "add --resume_training to continue it, or choose another --model_dir")
    if found is None and reads and args.resume_training:
        print(f"no checkpoint in {args.model_dir}: training from the start", flush=True)
    if cluster.broadcasts:
        step = restore_shared(cluster, found and found[1], model, optimizer)
    else:
        step = checkpoint.restore(found[1], model, optimizer) if found else None
    if step is None:
        return 0
    print(f"resuming from {found[1] if found else 'the checkpoint of process 0'} at step {step}",
          flush=True)
    return step


def worker_dirs(args, cluster):
    """With --log_all_workers every worker gets model_dir/worker_N and log_dir/worker_N."""
    if args.log_all_workers and cluster.num_workers > 1:
        args.model_dir = os.path.join(args.model_dir, f"worker_{cluster.worker_id}")
        args.log_dir = os.path.join(args.log_dir, f"worker_{cluster.worker_id}")
    return cluster.is_chief or args.log_all_workers


def _model_and_optimizer(args, task, data):
    import keras
    model, optimizer = task.model(data), task.optimizer()
    if args.use_amp:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def build(args, task, data, cluster):
    """Model, optimizer (built, so its state can be restored) and engine, on the cluster's devices."""
    loss_fn, metrics_fn = task.loss_and_metrics(data)
    finish_batch = task.finish_train_batch()
    if args.backend == "jax":
        import keras

        from runtime.jax_engine import JaxEngine
        distribution = keras.distribution.DataParallel() if cluster.num_replicas > 1 else None
        keras.distribution.set_distribution(distribution)
        model, optimizer = _model_and_optimizer(args, task, data)
        engine = JaxEngine(model, optimizer, loss_fn, metrics_fn, distribution, finish_batch)
        return model, optimizer, engine

    from runtime.tf_engine import TFEngine
    with cluster.strategy.scope():
        model, optimizer = _model_and_optimizer(args, task, data)
    hvd = cluster.horovod
    all_reduce = (lambda grads: [hvd.allreduce(g) for g in grads]) if hvd else None
    engine = TFEngine(model, optimizer, loss_fn, metrics_fn, use_xla=args.use_xla,
                      strategy=cluster.strategy, all_reduce=all_reduce, finish_batch=finish_batch)
    return model, optimizer, engine


def run(args):
    """Run the modes `args.exec_mode` asks for; returns a dict of what each produced."""
    from runtime.cluster import make_cluster
    from runtime.precision import choose_dtype, local_device, set_policy
    tf, hpu = configure(args)
    cluster = make_cluster(args, tf)
    whole_volume = args.sliding_window or args.tta or args.save_probabilities or len(args.model_dirs) > 1
    if cluster.broadcasts and whole_volume and args.exec_mode not in ("train",):
        raise UserError("--sliding_window, --tta, --save_probabilities and ensembles run in one "
                        "process: train with several, then evaluate or predict with one")
    with cluster.failures():  # a lost peer: one line
        agree_on_a_seed(args, tf, cluster)
        # bf16 where the device runs it natively; on HPU the Habana bridge converts to bf16 itself
        # (TF_BF16_CONVERSION), so Keras keeps float32 there.
        choose_dtype(args, local_device(args.backend, tf, hpu))
        set_policy(args, hpu)
        writes = worker_dirs(args, cluster)
        if writes:
            writable_dir(args.model_dir, "--model_dir")
            if args.output_dir and args.exec_mode in PREDICTS:
                writable_dir(args.output_dir, "--output_dir")
        logger = Logger(writable_dir(args.log_dir, "--log_dir") if writes else None, enabled=writes)
        task = make_task(args, hpu)
        # One process feeds every local device on JAX: its batches hold batch_size per local device.
        local_batch = args.batch_size * (cluster.local_replicas if args.backend == "jax" else 1)
        data = task.data(cluster.worker_id, cluster.num_workers, local_batch)
        model, optimizer, engine = build(args, task, data, cluster)

        save_fn = None
        if args.exec_mode in TRAINS and writes and not args.benchmark and not args.disable_ckpt_saving:
            def save_fn(step):
                engine.commit()
                checkpoint.save(args.model_dir, step, model, optimizer)
        hooks = make_hooks(args, logger, save_fn, args.batch_size * cluster.num_replicas, engine)
        trainer = Trainer(engine, hooks, args.log_every, sync_every_step=args.benchmark,
                          dump_dir=args.dump_config if writes else None)
        return run_modes(args, task, data, cluster, model, optimizer, trainer)


def run_modes(args, task, data, cluster, model, optimizer, trainer):
    """Train, evaluate and predict as `args.exec_mode` asks; returns what each produced."""
    results, step, members = {}, None, None
    if args.exec_mode in TRAINS:
        first = 0 if args.benchmark else start_step_for_training(args, model, optimizer, cluster)
        if cluster.horovod:
            cluster.horovod.broadcast_variables(model.variables + optimizer.variables, root_rank=0)
        last = task.last_step(data, cluster.num_replicas)
        if first >= last:
            print(f"already trained to step {first} (last step {last}); nothing to train", flush=True)
        else:
            results["loss"] = trainer.train(lambda: data.train_dataset(first), first, last,
                                            args.batch_size * cluster.num_replicas)
        step = max(first, last)
    elif (cluster.is_chief or cluster.broadcasts) and (not args.benchmark or args.exec_mode in EVALUATES):
        step, members = restore_for_inference(args, model, trainer.engine, cluster)

    if not cluster.is_chief:  # worker 0 alone evaluates and predicts
        return results
    inference = make_inference(args, data, trainer.engine, model, members)
    whole = args.sliding_window
    if args.exec_mode in EVALUATES:
        dataset = data.eval_dataset(whole=True) if whole else data.eval_dataset()
        total = data.n_eval if whole else math.ceil(data.n_eval / data.batch_size)
        results["eval"] = trainer.evaluate(dataset, step, inference, total)
    if args.exec_mode in PREDICTS:
        results["predictions"] = predict(args, task, data, trainer, inference)
    return results


def predict(args, task, data, trainer, inference=None):
    """A mask per prediction volume into --output_dir or the first --model_dir (none when
    benchmarking); returns the count."""
    whole = args.sliding_window
    dataset = data.test_dataset(whole=True) if whole else data.test_dataset()
    names = task.mask_names(data, whole)
    if args.benchmark:
        per_step = 1 if whole else args.batch_size
        repeats = max(1, math.ceil(2 * args.warmup_steps * per_step / max(len(names), 1)))
        repeated = (dataset.repeat(repeats) if hasattr(dataset, "repeat")
                    else itertools.chain.from_iterable(itertools.repeat(dataset, repeats)))
        return trainer.predict(repeated, inference=inference)
    out_dir = args.output_dir or args.model_dir
    mask_fn = task.nifti_writer(data, os.path.join(out_dir, "nifti")) if args.save_nifti else None
    count = trainer.predict(dataset, out_dir, names, mask_fn, inference, args.save_probabilities,
                            total=math.ceil(len(names) / (1 if whole else data.batch_size)))
    print(f"wrote {count} masks to {out_dir}", flush=True)
    return count
