"""Hooks: what happens around the steps of every mode (logs, progress, benchmark, checkpoints), and
the Logger they write through (stdout, log.json, TensorBoard).

The loops in runtime/loops/trainer.py call, on every hook of a `Hooks` list:
  begin(mode, total_steps, first_step)   mode is "train", "eval" or "predict"
  after_step(mode, step, batch_size, loss)   loss is a float when the step was synced, else None
  end(mode, step, results)   results: the metrics of an evaluation, else {}
  progress(mode, note)   work within a step (the sliding windows of a volume), as a short note
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Optional, Sequence

from common.output_files import append_line

Z_SCORES = {"90%": 1.645, "95%": 1.960, "99%": 2.576}


class Hook:
    """A hook that does nothing; subclasses override what they need."""

    def begin(self, mode: str, total_steps: Optional[int], first_step: int) -> None:
        """Called before the first step of a mode."""

    def after_step(self, mode: str, step: int, batch_size: int, loss: Optional[float]) -> None:
        """Called after every step."""

    def end(self, mode: str, step: int, results: dict[str, float]) -> None:
        """Called after the last step of a mode."""

    def progress(self, mode: str, note: str) -> None:
        """Called during a long step with a note on how far it is."""


class Hooks(Hook):
    """Calls every hook of a list in turn."""

    def __init__(self, hooks):
        self.hooks = [h for h in hooks if h is not None]

    def add(self, hook: Hook) -> None:
        """Append a hook (one that needs the loops built first)."""
        self.hooks.append(hook)

    def begin(self, mode: str, total_steps: Optional[int], first_step: int) -> None:
        """`begin` of every hook, in order."""
        for hook in self.hooks:
            hook.begin(mode, total_steps, first_step)

    def after_step(self, mode: str, step: int, batch_size: int, loss: Optional[float]) -> None:
        """`after_step` of every hook, in order."""
        for hook in self.hooks:
            hook.after_step(mode, step, batch_size, loss)

    def end(self, mode: str, step: int, results: dict[str, float]) -> None:
        """`end` of every hook, in order."""
        for hook in self.hooks:
            hook.end(mode, step, results)

    def progress(self, mode: str, note: str) -> None:
        """`progress` of every hook, in order."""
        for hook in self.hooks:
            hook.progress(mode, note)


class Logger:
    """Writes records to stdout and as JSON lines to `log_dir/log.json`; with a `TensorBoard` sink,
    their numbers as TensorBoard scalars too."""

    def __init__(self, log_dir, enabled=True, tensorboard=None):
        self.enabled = enabled
        self.path = os.path.join(log_dir, "log.json") if enabled and log_dir else None
        self.tensorboard = tensorboard if enabled else None
        if self.path:
            os.makedirs(log_dir, exist_ok=True)

    def log(self, kind: str, step: Optional[int], data: dict[str, Any]) -> None:
        """Print `data` with its step and append it to the JSON-lines file (and TensorBoard)."""
        if not self.enabled:
            return
        shown = " ".join(f"{k}: {_format(v)}" for k, v in data.items())
        print(f"{kind} step {step} | {shown}" if step is not None else f"{kind} | {shown}", flush=True)
        if self.path:
            entry = {"timestamp": time.time(), "type": kind, "step": step, "data": data}
            append_line(self.path, json.dumps(entry))
        if self.tensorboard is not None and step is not None:
            self.tensorboard.scalars(kind, step, data)


class TensorBoard:
    """TensorBoard scalars of the logged records and, once, the run's hyper-parameters."""

    def __init__(self, log_dir, hparams):
        from common.quiet_import import import_tensorflow
        from tensorboard.plugins.hparams import api as hp
        self.tf = import_tensorflow()
        self.writer = self.tf.summary.create_file_writer(log_dir)
        with self.writer.as_default():
            hp.hparams(hparams, trial_id=os.path.basename(os.path.abspath(log_dir)))

    def scalars(self, kind: str, step: int, data: dict[str, Any]) -> None:
        """Every number of `data` as the scalar `kind/name` at `step`."""
        with self.writer.as_default():
            for key, value in data.items():
                if isinstance(value, (int, float)):
                    self.tf.summary.scalar(f"{kind}/{key}", float(value), step=step)
        self.writer.flush()


def _format(value):
    return f"{value:.5g}" if isinstance(value, float) else str(value)


class LoggingHook(Hook):
    """Every `log_every` training steps: loss, mean iteration time [ms], examples/sec; eval results."""

    def __init__(self, logger, log_every):
        self.logger, self.log_every = logger, log_every
        self._since, self._steps, self._examples, self._paused = None, 0, 0, None

    def begin(self, mode: str, total_steps: Optional[int], first_step: int) -> None:
        """Start the clock of training (an evaluation within it pauses the clock)."""
        if mode == "train" or self._since is None:
            self._since, self._steps, self._examples = time.perf_counter(), 0, 0
        self._paused = time.perf_counter()

    def after_step(self, mode: str, step: int, batch_size: int, loss: Optional[float]) -> None:
        """Every `log_every` synced training steps, log the loss and the speed since the last log."""
        if mode != "train":
            return
        self._steps += 1
        self._examples += batch_size
        if loss is None or step % self.log_every:
            return
        elapsed = time.perf_counter() - self._since
        self.logger.log("train", step, {
            "loss": float(loss),
            "iteration_ms": 1000.0 * elapsed / self._steps,
            "examples_per_sec": self._examples / elapsed,
        })
        self._since, self._steps, self._examples = time.perf_counter(), 0, 0

    def end(self, mode: str, step: int, results: dict[str, float]) -> None:
        """Log an evaluation's results; after one within training, restart the paused clock."""
        if mode == "eval":
            self.logger.log("eval", step, {k: float(v) for k, v in results.items()})
        if mode != "train":  # an evaluation within training does not count as training time
            self._since += time.perf_counter() - self._paused


def benchmark_stats(step_times: Sequence[float], batch_size: int, mode: str) -> dict[str, float]:
    """The UNet3D reference's benchmark statistics (its runtime/hooks.py) of per-step wall times
    (seconds) of `batch_size` examples each: the mean throughput, the mean latency in ms and its
    upper confidence bounds at 90, 95 and 99 %."""
    n = len(step_times)
    mean = sum(step_times) / n
    std = math.sqrt(sum((t - mean) ** 2 for t in step_times) / n)
    stats = {f"throughput_{mode}": sum(batch_size / t for t in step_times) / n,
             f"latency_{mode}": 1000.0 * mean}
    for name, z in Z_SCORES.items():
        stats[f"Latency_{mode} {name}"] = 1000.0 * (mean + z * std / math.sqrt(n))
    return stats


class BenchmarkHook(Hook):
    """Times every step after `warmup_steps` (the loop syncs each step) and reports the statistics."""

    def __init__(self, logger, warmup_steps, global_batch_size):
        self.logger, self.warmup = logger, warmup_steps
        self.global_batch_size = global_batch_size
        self.times, self._last, self._count = [], None, 0

    def begin(self, mode: str, total_steps: Optional[int], first_step: int) -> None:
        """Start the timing afresh."""
        self.times, self._count = [], 0
        self._last = time.perf_counter()

    def after_step(self, mode: str, step: int, batch_size: int, loss: Optional[float]) -> None:
        """Keep the step's wall time once the warm-up steps are done."""
        now = time.perf_counter()
        self._count += 1
        if self._count > self.warmup:
            self.times.append(now - self._last)
        self._last = now

    def end(self, mode: str, step: int, results: dict[str, float]) -> None:
        """Log the statistics of the timed steps (nothing for an evaluation)."""
        if mode == "eval":
            return
        if not self.times:
            self.logger.log("benchmark", None, {"error": f"no {mode} steps after the "
                                                         f"{self.warmup} warm-up steps"})
            return
        self.logger.log("benchmark", None, benchmark_stats(self.times, self.global_batch_size, mode))


class ProgressHook(Hook):
    """A progress bar with the latest loss (or the windows of the volume at hand), on a terminal only."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.bar, self._outer = None, []

    def begin(self, mode: str, total_steps: Optional[int], first_step: int) -> None:
        """Open a bar of `total_steps`, the outer mode's bar kept for after."""
        from common.progress import Progress
        self._outer.append(self.bar)  # an evaluation within training has a bar of its own
        self.bar = None
        if self.stream.isatty() and total_steps:
            self.bar = Progress(total_steps, mode, self.stream)
            self.bar.done = first_step

    def after_step(self, mode: str, step: int, batch_size: int, loss: Optional[float]) -> None:
        """Advance the bar by a step, showing the loss when synced."""
        if self.bar:
            self.bar.advance(note="" if loss is None else f"loss {loss:.4f}")

    def progress(self, mode: str, note: str) -> None:
        """Show `note` on the bar without advancing it."""
        if self.bar:
            self.bar.advance(0, note)

    def end(self, mode: str, step: int, results: dict[str, float]) -> None:
        """Close the bar and return to the outer mode's."""
        if self.bar:
            self.bar.close()
        self.bar = self._outer.pop() if self._outer else None


class CheckpointHook(Hook):
    """Saves a checkpoint every `every` training steps and at the end of training."""

    def __init__(self, save_fn, every):
        self.save_fn, self.every = save_fn, every
        self._saved_step = None

    def after_step(self, mode: str, step: int, batch_size: int, loss: Optional[float]) -> None:
        """Save a checkpoint every `every` training steps."""
        if mode == "train" and self.every and step % self.every == 0:
            self.save_fn(step)
            self._saved_step = step

    def end(self, mode: str, step: int, results: dict[str, float]) -> None:
        """Save the last training step's checkpoint unless it was just saved."""
        if mode == "train" and step != self._saved_step:
            self.save_fn(step)
            self._saved_step = step


class ProfileHook(Hook):
    """With --dump_config: a profiler trace of training steps first+2 .. first+4 (after warm-up)."""

    def __init__(self, engine, out_dir, steps=3):
        self.engine, self.out_dir, self.steps = engine, out_dir, steps
        self._start, self._running = None, False

    def begin(self, mode: str, total_steps: Optional[int], first_step: int) -> None:
        """Arm the trace to start after the first training step."""
        if mode == "train":
            self._start = first_step + 1

    def after_step(self, mode: str, step: int, batch_size: int, loss: Optional[float]) -> None:
        """Start the trace at its first step and stop it `steps` steps later."""
        if mode != "train" or self._start is None:
            return
        if step == self._start and not self._running:
            self.engine.start_trace(self.out_dir)
            self._running = True
        elif self._running and step >= self._start + self.steps:
            self.end(mode, step, {})

    def end(self, mode: str, step: int, results: dict[str, float]) -> None:
        """Stop a running trace."""
        if self._running:
            self.engine.stop_trace()
            self._running, self._start = False, None


class EvalEveryHook(Hook):
    """Every `every` training steps, `evaluate(step)` (the evaluation loop, whose results reach
    the hooks as an "eval" end)."""

    def __init__(self, evaluate, every):
        self.evaluate, self.every = evaluate, every

    def after_step(self, mode: str, step: int, batch_size: int, loss: Optional[float]) -> None:
        """Evaluate every `every` training steps."""
        if mode == "train" and step % self.every == 0:
            self.evaluate(step)


class TrainingCurvesHook(Hook):
    """log_dir/training_curves.png: the training loss (each logged one) and the validation
    scores of the run's evaluations against the step, written at every checkpoint
    (`ckpt_every`), after each evaluation and at the end of training."""

    def __init__(self, log_dir, ckpt_every):
        self.path = os.path.join(log_dir, "training_curves.png")
        self.ckpt_every = ckpt_every
        self.losses, self.evaluations = [], []

    def after_step(self, mode: str, step: int, batch_size: int, loss: Optional[float]) -> None:
        """Keep each synced loss; redraw the curves at every checkpoint step."""
        if mode != "train":
            return
        if loss is not None:
            self.losses.append((step, float(loss)))
        if self.ckpt_every and step % self.ckpt_every == 0:
            self.write()

    def end(self, mode: str, step: int, results: dict[str, float]) -> None:
        """Keep an evaluation's scores and redraw the curves (always at the end of training)."""
        if mode == "eval" and results and self.losses:  # a later one of the same step replaces it
            self.evaluations = [e for e in self.evaluations if e[0] != step]
            self.evaluations.append((step, {k: float(v) for k, v in results.items()}))
        if mode == "train" or (mode == "eval" and self.losses):
            self.write()

    def write(self) -> None:
        """Draw the curves so far into the PNG."""
        from runtime.loops.pictures import training_curves_png
        training_curves_png(self.path, self.losses, self.evaluations)
