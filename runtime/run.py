"""One run of the tool, stage by stage: the machine, the task and its data, model, engine and hooks,
then the modes. Everything comes from the frozen Settings and the resolved Machine."""
from __future__ import annotations

import contextlib
import itertools
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from runtime import run_lock, run_record
from common.errors import UserError
from runtime.loops import checkpoint
from runtime.loops.hooks import (BenchmarkHook, CheckpointHook, EvalEveryHook, Hooks, Logger, LoggingHook,
                         ProfileHook, ProgressHook, TensorBoard, TrainingCurvesHook)
from runtime.loops.stopping import Stopped, signal_name
from runtime.loops.trainer import Trainer
from runtime.engines.engine import Engine
from runtime.settings import Settings
from runtime.setup.machine import Machine, resolve_machine
from runtime.tasks.base import Task, TaskData, make_task

if TYPE_CHECKING:
    from runtime.loops.case_report import CaseReport
    from runtime.loops.inference import Inference
    from runtime.loops.postprocessing_choice import Postprocessing
    from runtime.setup.cluster import Cluster


@dataclass(frozen=True)
class Parts:
    """What a run builds once and its stages share: the settings and machine, the network's task
    and data, the model, its optimizer and the engine that compiles their steps, and the
    postprocessing that evaluate and predict apply to its masks (None: none)."""
    settings: Settings
    machine: Machine
    task: Task
    data: TaskData
    model: Any
    optimizer: Any
    engine: Engine
    postprocessing: Optional[Postprocessing] = None


def make_logger(settings: Settings, machine: Machine) -> Logger:
    """The Logger of this worker: stdout and log.json, and TensorBoard with --tensorboard_logging."""
    tensorboard = None
    if settings.run.tensorboard_logging and machine.writes:
        tensorboard = TensorBoard(machine.log_dir, hyperparameters(settings, machine))
    return Logger(machine.log_dir, enabled=machine.writes, tensorboard=tensorboard)


def make_hooks(parts: Parts, logger: Logger, save_fn: Optional[Callable[[int], None]]) -> Hooks:
    """The hooks every mode shares."""
    settings, machine, engine = parts.settings, parts.machine, parts.engine
    global_batch = settings.data.batch_size * machine.cluster.num_replicas
    run = settings.run
    hooks = [LoggingHook(logger, run.log_every), ProgressHook()]
    if run.dump_config and logger.enabled:
        hooks.append(ProfileHook(engine, run.dump_config))
    if run.benchmark:
        hooks.append(BenchmarkHook(logger, run.warmup_steps, global_batch))
    elif save_fn is not None:
        hooks.append(CheckpointHook(save_fn, run.ckpt_every))
    if run.trains and not run.benchmark and logger.enabled and machine.log_dir:
        hooks.append(TrainingCurvesHook(machine.log_dir, run.ckpt_every))
    return Hooks(hooks)


def hyperparameters(settings: Settings, machine: Machine) -> dict:
    """The run's scalar settings, flat, for TensorBoard's hparams."""
    values = {"dtype": machine.dtype, "use_xla": machine.use_xla}
    for section in (settings.run, settings.data, settings.inference, settings.precision,
                    settings.network):
        for name, value in vars(section).items():
            if isinstance(value, (bool, int, float, str)):
                values.setdefault(name, value)
    return values


def saved_fields(parts: Parts) -> tuple[dict, dict]:
    """(network, run) sections of the run's settings.json (runtime/run_record.py); the run section
    names the optimizer, its ε and its update rule."""
    settings, machine, task, data = parts.settings, parts.machine, parts.task, parts.data
    network = settings.network_fields()
    if settings.run.model == "vnet":
        network["n_classes"] = data.n_classes
    used = {"dtype": machine.dtype, "batch_size": settings.data.batch_size,
            "backend": machine.backend, "seed": machine.seed, "loss": settings.network.loss,
            "devices": machine.cluster.num_replicas, **task.optimizer_record()}
    return network, used


def read_checkpoint(cluster: Cluster, path: Optional[str], model: Any, optimizer: Any = None
                    ) -> Optional[int]:
    """Load the checkpoint at `path` (None: there is none) into `model` (and `optimizer`); returns
    its step, or None without one. Several JAX processes take process 0's: it alone reads the
    file and broadcasts the arrays, and every process assigns the same ones (JAX assigns a
    variable of the global mesh on every process together)."""
    if not cluster.jax_processes:
        return checkpoint.restore(path, model, optimizer) if path is not None else None
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


def newest_checkpoint(model_dir: str, exec_mode: str) -> tuple[int, str]:
    """(step, path) of model_dir's newest checkpoint; a UserError when it has none."""
    found = checkpoint.latest_checkpoint(model_dir)
    if found is None:
        raise UserError(f"--model_dir {model_dir}: no checkpoint to {exec_mode.split('_')[-1]} with; "
                        "train first (--exec_mode train) or point --model_dir at a trained run")
    return found


def restore_for_inference(parts: Parts) -> tuple[Optional[int], Optional[list]]:
    """Load the newest checkpoint of every --model_dir into `model`, in turn.

    Returns (the first one's step, the members' weights from `engine.snapshot()` when several
    form an ensemble, else None). A checkpoint that does not fit the first one's network is a
    UserError naming its folder. Several JAX processes take process 0's checkpoint."""
    run, model, cluster = parts.settings.run, parts.model, parts.machine.cluster
    if cluster.jax_processes:
        path = newest_checkpoint(run.model_dir, run.exec_mode)[1] if cluster.is_chief else None
        return read_checkpoint(cluster, path, model), None
    step, members = None, []
    for model_dir in run.model_dirs:
        path = newest_checkpoint(model_dir, run.exec_mode)[1]
        try:
            restored = read_checkpoint(cluster, path, model)
        except UserError as err:
            if not members:
                raise
            raise UserError(f"--model_dir {model_dir}: its checkpoint holds another network than the "
                            f"one in --model_dir {run.model_dirs[0]}, so they cannot form an "
                            f"ensemble ({err})") from None
        step = restored if step is None else step
        members.append(parts.engine.snapshot())
    return step, members if len(members) > 1 else None


def make_inference(parts: Parts, members: Optional[list]) -> Optional[Inference]:
    """The `Inference` of the settings (sliding windows, mirroring, an ensemble, masks of the
    evaluated cases), or None when the plain centred-window steps serve: one model, no
    mirroring, no probabilities to save, no case to picture or score."""
    inference, run_settings = parts.settings.inference, parts.settings.run
    saves = inference.save_probabilities and run_settings.predicts
    cases = run_settings.evaluates and (run_settings.save_png or inference.challenge_metrics)
    if not (inference.sliding_window or inference.tta or members or saves or cases):
        return None
    from runtime.loops.inference import Inference
    from dataset.window_layout import sliding_window_shape
    window = sliding_window_shape(parts.data.volume_shape) if inference.sliding_window else None
    return Inference(parts.engine, int(parts.model.output.shape[-1]), members=members, window=window,
                     overlap=inference.overlap, sw_batch_size=inference.sw_batch_size,
                     tta=inference.tta)


def start_step_for_training(parts: Parts) -> int:
    """0 for a new run; the checkpoint's step with --resume_training. Never overwrites silently.

    Several JAX processes take process 0's checkpoint (broadcast from it), so only process 0
    needs to see model_dir."""
    machine, resume = parts.machine, parts.settings.run.resume_training
    cluster = machine.cluster
    reads = cluster.is_chief or not cluster.jax_processes
    found = checkpoint.latest_checkpoint(machine.model_dir) if reads else None
    if found is not None and not resume:
        raise UserError(f"--model_dir {machine.model_dir} already holds a checkpoint (step "
                        f"{found[0]}); add --resume_training to continue it, or choose another "
                        "--model_dir")
    if found is None and reads and resume:
        print(f"no checkpoint in {machine.model_dir}: training from the start", flush=True)
    step = read_checkpoint(cluster, found and found[1], parts.model, parts.optimizer)
    if step is None:
        return 0
    print(f"resuming from {found[1] if found else 'the checkpoint of process 0'} at step {step}",
          flush=True)
    if found is not None:
        from model.optimizers import UPDATE_RULE
        former = run_record.former_update_rule(machine.model_dir, UPDATE_RULE)
        if former is not None:
            print(f"{machine.model_dir}: its optimizer state came from {former}; training goes on "
                  f"with the references' ({UPDATE_RULE}) update rule", flush=True)
    return step


def _model_and_optimizer(settings, task, data):
    import keras
    model, optimizer = task.model(data), task.optimizer()
    if settings.precision.use_amp:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def build(settings: Settings, machine: Machine, task: Task, data: TaskData,
          postprocessing: Optional[Postprocessing] = None) -> Parts:
    """Model, optimizer (built, so its state can be restored) and engine, on the cluster's devices;
    `postprocessing` rides along for evaluate and predict."""
    loss_fn, metrics_fn = task.loss_and_metrics(data)
    finish_batch = task.finish_train_batch()
    cluster = machine.cluster
    if machine.backend == "jax":
        import keras

        from runtime.engines.jax_engine import JaxEngine
        distribution = keras.distribution.DataParallel() if cluster.num_replicas > 1 else None
        # Several processes make their variables on their own devices and the engine joins them
        # into replicated arrays (runtime/engines/jax_engine.py, `_replicated_state`): under a global
        # distribution, Keras would compare every variable between the processes.
        keras.distribution.set_distribution(None if cluster.jax_processes else distribution)
        model, optimizer = _model_and_optimizer(settings, task, data)
        keras.distribution.set_distribution(distribution)
        engine = JaxEngine(model, optimizer, loss_fn, metrics_fn, distribution, finish_batch)
        return Parts(settings, machine, task, data, model, optimizer, engine, postprocessing)

    from runtime.engines.tf_engine import TFEngine
    with cluster.strategy.scope():
        model, optimizer = _model_and_optimizer(settings, task, data)
    hvd, tf = cluster.horovod, machine.tf
    all_reduce = (lambda grads: [hvd.allreduce(g) for g in grads]) if hvd else None
    agree = (lambda value: int(hvd.allreduce(tf.constant(value, tf.int32), op=hvd.Max))) if hvd else None
    engine = TFEngine(model, optimizer, loss_fn, metrics_fn, use_xla=machine.use_xla,
                      strategy=cluster.strategy, all_reduce=all_reduce, finish_batch=finish_batch,
                      agree_across=agree)
    return Parts(settings, machine, task, data, model, optimizer, engine, postprocessing)


def make_save_fn(parts: Parts) -> Optional[Callable[[int], None]]:
    """`save(step)`: the run's settings.json and a checkpoint into model_dir; None where this
    worker writes no checkpoints (another worker's run, benchmarks, --disable_ckpt_saving)."""
    run_settings, machine = parts.settings.run, parts.machine
    if (not run_settings.trains or not machine.writes or run_settings.benchmark
            or run_settings.disable_ckpt_saving):
        return None
    network, used = saved_fields(parts)

    def save(step):
        parts.engine.commit()
        run_record.write(machine.model_dir, network, used)
        checkpoint.save(machine.model_dir, step, parts.model, parts.optimizer)
    return save


def case_report(parts: Parts, evaluating: bool) -> Optional[CaseReport]:
    """The `CaseReport` of evaluate (`evaluating`) or predict: the challenge's metrics of each
    case and its picture into output_dir/png, as the flags ask; None when they ask for neither."""
    settings, machine, data = parts.settings, parts.machine, parts.data
    run_settings = settings.run
    metrics = settings.inference.challenge_metrics and evaluating
    if not (metrics or run_settings.save_png):
        return None
    from runtime.loops.case_report import CaseReport
    png_dir = None
    if run_settings.save_png:
        png_dir = os.path.join(run_settings.output_dir or machine.model_dir, "png")
    if run_settings.model == "vnet":
        pairs = data.eval_pairs if evaluating else [(path, None) for path in data.test_paths]
        records = [{"case": os.path.basename(image).split(".")[0]} for image, _ in pairs]
        return CaseReport(records, list(data.label_names), png_dir=png_dir)
    from dataset.conventions import CONVENTIONS
    convention = CONVENTIONS[settings.network.convention]
    challenge = chooser = None
    if metrics:
        from runtime.loops.challenge_metrics import ChallengeMetrics
        challenge = ChallengeMetrics(convention)
    if metrics and settings.inference.choose_postprocessing:
        import functools

        from runtime.loops.postprocessing_choice import choose_postprocessing
        chooser = functools.partial(choose_postprocessing, convention=convention,
                                    criterion=settings.inference.postprocessing_criterion)
    return CaseReport(data.eval_records, convention.names, challenge, png_dir, chooser)


def applied_postprocessing(settings: Settings) -> Optional[Postprocessing]:
    """The postprocessing.json of the first --model_dir that evaluate and predict apply to their
    masks (runtime/loops/postprocessing_choice.py), and the line that says so printed; None for
    V-Net, with --no_postprocessing or --choose_postprocessing (which chooses on the raw masks),
    where no mask is kept (benchmarks, evaluate without --challenge_metrics or --save_png) or
    without the file. A file unreadable or not of the network's label convention is a UserError
    naming it."""
    run_settings, inference = settings.run, settings.inference
    uses_masks = run_settings.predicts or (run_settings.evaluates and (
        run_settings.save_png or inference.challenge_metrics))
    if (run_settings.model != "unet3d" or inference.no_postprocessing or run_settings.benchmark
            or inference.choose_postprocessing or not uses_masks):
        return None
    from dataset.conventions import CONVENTIONS
    from runtime.loops.postprocessing_choice import load_postprocessing
    found = load_postprocessing(run_settings.model_dir,
                                CONVENTIONS[settings.network.convention])
    if found is not None:
        print(found.line(run_settings.model_dirs), flush=True)
    return found


def whole_volume(settings: Settings) -> bool:
    """Whether evaluate and predict need whole volumes in one process (sliding windows, mirroring,
    probabilities to save, an ensemble)."""
    inference = settings.inference
    return (inference.sliding_window or inference.tta or inference.save_probabilities
            or len(settings.run.model_dirs) > 1)


class ClassCount:
    """What V-Net's model needs of its data to export: the number of classes."""

    def __init__(self, n_classes):
        self.n_classes = n_classes


def export(settings: Settings) -> dict:
    """--exec_mode export: the newest checkpoint of --model_dir, built from its settings.json in
    float32 on TensorFlow, written by runtime/loops/export.py into --export_dir; returns metadata.json's
    body."""
    from common.quiet_import import import_tensorflow
    run_settings = settings.run
    step, path = newest_checkpoint(run_settings.model_dir, run_settings.exec_mode)
    saved = run_record.read(run_settings.model_dir)
    if saved is None:
        raise UserError(f"--model_dir {run_settings.model_dir}: no {run_record.FILE_NAME} (trained "
                        "before version 2.0), so its preprocessing and labels are unknown; train "
                        "it again to export it")
    from runtime.loops.export import describe, kept_postprocessing, write_export
    network = saved["network"]
    body = describe(network, saved.get("run", {}), step, settings.inference)
    kept = None
    if network["model"] == "unet3d" and not settings.inference.no_postprocessing:
        kept = kept_postprocessing(run_settings.model_dir, body["labels"])
    if kept is not None:
        body["postprocessing"] = kept
    import_tensorflow(run_settings.tf_verbosity)
    import keras

    keras.mixed_precision.set_dtype_policy("float32")
    task = make_task(run_settings.model, settings.network, settings.data)
    model = task.model(ClassCount(network.get("n_classes")))
    checkpoint.restore(path, model)
    body = write_export(model, run_settings.export_dir, body)
    with_postprocessing = ""
    if kept is not None:
        from dataset.postprocessing import operations_text
        with_postprocessing = (f", with the postprocessing of its postprocessing.json "
                               f"({operations_text(kept['operations'])}; --no_postprocessing "
                               "leaves it out)")
    print(f"exported step {step} of {run_settings.model_dir} to {run_settings.export_dir}"
          f"{with_postprocessing}", flush=True)
    return body


def run(settings: Settings) -> dict:
    """Run the modes `settings.run.exec_mode` asks for; returns a dict of what each produced."""
    if settings.run.exports:
        return {"export": export(settings)}
    machine = resolve_machine(settings)
    cluster, run_settings = machine.cluster, settings.run
    if cluster.jax_processes and whole_volume(settings) and run_settings.exec_mode != "train":
        raise UserError("--sliding_window, --tta, --save_probabilities and ensembles run in one "
                        "process: train with several, then evaluate or predict with one")
    if run_settings.eval_every and cluster.num_workers > 1:
        raise UserError("--eval_every evaluates in one process: leave it out when training with "
                        "several workers")
    locks = (run_settings.trains and cluster.is_chief and not run_settings.benchmark)
    with cluster.failures(), (run_lock.holding(machine.model_dir) if locks else contextlib.nullcontext()):
        postprocessing = applied_postprocessing(settings) if cluster.is_chief else None
        logger = make_logger(settings, machine)
        task = make_task(run_settings.model, settings.network, settings.data, machine)
        local = cluster.local_replicas
        data = task.data(cluster.worker_id * local, cluster.num_workers * local,
                         settings.data.batch_size * local,
                         need_eval=run_settings.evaluates or bool(run_settings.eval_every),
                         need_test=run_settings.predicts, local_streams=local)
        if settings.inference.choose_postprocessing and data.n_eval == 0:
            raise UserError(f"argument --choose_postprocessing: fold {settings.network.fold} of "
                            "the data has no validation case to choose on; choose another --fold "
                            "or give --data_dir records with validation cases")
        parts = build(settings, machine, task, data, postprocessing)
        save_fn = make_save_fn(parts)
        hooks = make_hooks(parts, logger, save_fn)
        trainer = Trainer(parts.engine, hooks, run_settings.log_every, sync_every_step=run_settings.benchmark,
                          dump_dir=run_settings.dump_config if machine.writes else None)
        if run_settings.eval_every:
            hooks.add(EvalEveryHook(lambda step: trainer.evaluate(
                data.eval_dataset(), step, total=math.ceil(data.n_eval / data.batch_size)),
                run_settings.eval_every))
        try:
            return run_modes(parts, trainer, logger)
        except Stopped as stop:
            raise Stopped(stop.signum, stop.mode, stop.step,
                          stopped_message(stop, machine, save_fn is not None)) from None


def stopped_message(stop: Stopped, machine: Machine, saves: bool) -> str:
    """The one line a run stopped by a signal ends with: the signal, the step, how to go on."""
    cluster, name = machine.cluster, signal_name(stop.signum)
    who = f"worker {cluster.worker_id} of {cluster.num_workers}: " if cluster.num_workers > 1 else ""
    if stop.mode == "predict":
        return (f"{who}stopped by {name} during prediction after writing {stop.step} masks, each "
                "complete; run the same command again to write them all")
    if stop.mode == "eval":
        return (f"{who}stopped by {name} during evaluation after {stop.step} batches, before any "
                "score was written; run the same command again")
    if saves:
        kept = f"checkpoint of step {stop.step} written in {machine.model_dir}"
    elif cluster.is_chief:
        kept = "no checkpoint written (saving is off)"
    else:
        kept = f"worker 0 writes the checkpoint of step {stop.step}"
    return (f"{who}stopped by {name} after training step {stop.step}; {kept}; continue with the same "
            "command and --resume_training")


def run_modes(parts: Parts, trainer: Trainer, logger: Logger) -> dict:
    """Train, evaluate and predict as the exec_mode asks; returns what each produced."""
    settings, machine, task, data = parts.settings, parts.machine, parts.task, parts.data
    run_settings, cluster = settings.run, machine.cluster
    results, step, members = {}, None, None
    global_batch = settings.data.batch_size * cluster.num_replicas
    if run_settings.trains:
        first = 0 if run_settings.benchmark else start_step_for_training(parts)
        if cluster.horovod:
            cluster.horovod.broadcast_variables(parts.model.variables + parts.optimizer.variables,
                                                root_rank=0)
        last = task.last_step(data, cluster.num_replicas,
                              run_settings.warmup_steps if run_settings.benchmark else None)
        if first >= last:
            print(f"already trained to step {first} (last step {last}); nothing to train", flush=True)
        else:
            results["loss"] = trainer.train(lambda: data.train_dataset(first), first, last,
                                            global_batch)
        step = max(first, last)
    elif (cluster.is_chief or cluster.jax_processes) and (not run_settings.benchmark
                                                        or run_settings.evaluates):
        step, members = restore_for_inference(parts)

    if not cluster.is_chief:  # worker 0 alone evaluates and predicts
        return results
    inference = make_inference(parts, members)
    sliding = settings.inference.sliding_window
    if run_settings.evaluates:
        dataset = data.eval_volumes() if sliding else data.eval_dataset()
        total = data.n_eval if sliding else math.ceil(data.n_eval / data.batch_size)
        report = case_report(parts, evaluating=True)
        results["eval"] = trainer.evaluate(dataset, step, inference, total, report,
                                           parts.postprocessing)
        if report is not None:
            out_dir = run_settings.output_dir or machine.model_dir
            os.makedirs(out_dir, exist_ok=True)
            results["challenge"] = report.finish(out_dir, logger, step)
        if report is not None and report.choice is not None:
            from runtime.loops.postprocessing_choice import keep_choice
            print(keep_choice(report.choice, run_settings.model_dirs, report.metrics.convention,
                              report.chosen_on), flush=True)
            results["postprocessing"] = report.choice.description
    if run_settings.predicts:
        results["predictions"] = predict(parts, trainer, inference)
    return results


def predict(parts: Parts, trainer: Trainer, inference: Optional[Inference] = None) -> int:
    """A mask per prediction volume into --output_dir or the first --model_dir (none when
    benchmarking); returns the count."""
    settings, machine, task, data = parts.settings, parts.machine, parts.task, parts.data
    run_settings, sliding = settings.run, settings.inference.sliding_window
    dataset = data.test_volumes() if sliding else data.test_dataset()
    names = task.mask_names(data, data.n_eval if sliding else data.n_test)
    if run_settings.benchmark:  # the repeats count per-device batches
        per_step = 1 if sliding else settings.data.batch_size
        repeats = max(1, math.ceil(2 * run_settings.warmup_steps * per_step / max(len(names), 1)))
        repeated = (dataset.repeat(repeats) if hasattr(dataset, "repeat")
                    else itertools.chain.from_iterable(itertools.repeat(dataset, repeats)))
        return trainer.predict(repeated, inference=inference)
    out_dir = run_settings.output_dir or machine.model_dir
    nifti = task.nifti_writer(data, os.path.join(out_dir, "nifti")) if run_settings.save_nifti else None
    count = trainer.predict(dataset, out_dir, names, nifti, inference,
                            settings.inference.save_probabilities,
                            total=math.ceil(len(names) / (1 if sliding else data.batch_size)),
                            case_fn=case_report(parts, evaluating=False),
                            postprocess=parts.postprocessing)
    print(f"wrote {count} masks to {out_dir}", flush=True)
    return count
