"""The loops of every mode, the same on every backend: an engine runs the steps, hooks do the rest.

Every loop stops early on SIGTERM, SIGINT or SIGUSR1 (runtime/loops/stopping.py): training after the
step the workers agree on, with its checkpoint written by the hooks; evaluation and prediction
between two volumes, the files already written complete. The loop then raises `Stopped`.
"""
from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

import numpy as np

from common.output_files import replacing
from runtime.loops.stopping import AGREE_EVERY, StopRequest, Stopped

if TYPE_CHECKING:  # for the annotations alone: inference.py imports Keras
    from runtime.loops.inference import Inference

# case_fn(i, image, one-hot truth or None, mask, the mask before postprocessing or None) of
# evaluate and predict.
CaseFn = Callable[[int, np.ndarray, Optional[np.ndarray], np.ndarray, Optional[np.ndarray]], None]
# postprocess(mask) -> mask, of the network's classes (runtime/loops/postprocessing_choice.py).
PostprocessFn = Callable[[np.ndarray], np.ndarray]


class Trainer:
    """Runs training, evaluation and prediction with an engine's steps and a `Hooks` list.

    `sync_every_step` (benchmarking) waits for each step so that its wall time is measured;
    otherwise the loss is fetched only every `log_every` steps.
    """

    def __init__(self, engine, hooks, log_every, sync_every_step=False, dump_dir=None):
        self.engine, self.hooks = engine, hooks
        self.log_every, self.sync_every_step = log_every, sync_every_step
        self.dump_dir = dump_dir

    def train(self, make_dataset: Callable[[], Iterable], first_step: int, last_step: int,
              batch_size: int) -> Optional[float]:
        """Steps first_step+1 .. last_step over `make_dataset()`; returns the last loss (a float).

        A stop signal to any worker ends every worker's loop after the same step (the engine's
        `agree`, every AGREE_EVERY steps with several workers); the hooks' `end` (the
        checkpoint) runs, then `Stopped` is raised."""
        with StopRequest().watching() as stop:
            loss_value, step, signum = self._train(make_dataset, first_step, last_step, batch_size,
                                                   stop)
        if signum:
            raise Stopped(signum, "train", step)
        return loss_value

    def _train(self, make_dataset, first_step, last_step, batch_size, stop):
        self.hooks.begin("train", last_step, first_step)
        step, loss_value, signum = first_step, None, 0
        every = AGREE_EVERY if self.engine.several_workers else 1
        batches = iter(self.engine.distribute(make_dataset))
        try:
            for step in range(first_step + 1, last_step + 1):
                x, y = next(batches)
                if self.dump_dir and step == first_step + 1:
                    self.engine.dump_compiled(self.dump_dir, x, y)
                loss = self.engine.train_step(x, y)
                synced = self.sync_every_step or step % self.log_every == 0 or step == last_step
                loss_value = self.engine.to_float(loss) if synced else None
                if loss_value is not None and not np.isfinite(loss_value):
                    raise FloatingPointError(f"the loss became {loss_value} at step {step}; lower "
                                             "--learning_rate or check the data")
                self.hooks.after_step("train", step, batch_size, loss_value)
                if step % every == 0 or step == last_step:
                    signum = self.engine.agree(stop.signum)
                    if signum:
                        break
        finally:  # stop a prefetching reader now, not at interpreter exit
            getattr(batches, "close", lambda: None)()
        self.engine.commit()
        self.hooks.end("train", step, {})
        return loss_value, step, signum

    def evaluate(self, dataset: Iterable, step: int, inference: Optional[Inference] = None,
                 total: Optional[int] = None, case_fn: Optional[CaseFn] = None,
                 postprocess: Optional[PostprocessFn] = None) -> dict[str, float]:
        """Mean of each per-volume score over every volume of `dataset` (`total` batches, if known).

        With an `Inference` the scores are of its probabilities (sliding windows, mirroring, an
        ensemble); otherwise of the engine's plain step. `case_fn(i, image, one-hot truth, mask,
        raw)`, which needs an `Inference`, is called for every volume i with its argmax mask
        (NumPy), after `postprocess` when given (raw: the mask before it, else None)."""
        self.hooks.begin("eval", total, 0)
        scores, count, index = {}, 0, 0
        batches = dataset if inference is None else self.engine.prefetch(dataset)
        with StopRequest().watching() as stop:
            try:
                for count, (x, y) in enumerate(batches, start=1):
                    if inference is None:
                        batch_scores = self.engine.eval_step(x, y)
                    elif case_fn is None:
                        batch_scores = inference.scores(x, y, self._windows_done("eval"))
                    else:
                        batch_scores, masks = inference.scores(x, y, self._windows_done("eval"), True)
                        x, y = np.asarray(x), np.asarray(y)
                        for i, mask in enumerate(masks):
                            case_fn(index + i, x[i], y[i], *_finished(mask, postprocess))
                    index += int(x.shape[0])
                    for key, values in batch_scores.items():
                        scores.setdefault(key, []).append(values)
                    self.hooks.after_step("eval", count, int(x.shape[0]), None)
                    if stop.signum:
                        raise Stopped(stop.signum, "eval", count)
            finally:  # stop a prefetching reader now
                getattr(batches, "close", lambda: None)()
        results = {key: float(np.mean(np.concatenate(v))) for key, v in scores.items()}
        self.hooks.end("eval", step, results)
        return results

    def predict(self, dataset: Iterable, out_dir: Optional[str] = None,
                names: Optional[Sequence[str]] = None,
                mask_fn: Optional[Callable[[int, np.ndarray], Any]] = None,
                inference: Optional[Inference] = None, save_probabilities: bool = False,
                total: Optional[int] = None, case_fn: Optional[CaseFn] = None,
                postprocess: Optional[PostprocessFn] = None) -> int:
        """Argmax masks of every volume; mask i is saved as out_dir/<names[i]>.npy unless out_dir is None.

        `mask_fn(i, mask)` is called for every mask as well (extra formats), and
        `case_fn(i, image, None, mask, raw)` with the volume's image (pictures). With an
        `Inference` the masks are of its probabilities, which `save_probabilities` also writes
        (float16) as out_dir/<names[i]>.npz. Every mask is `postprocess`ed first when given (raw:
        the mask before, else None). `total` is the number of batches, if known. Returns the count.
        """
        self.hooks.begin("predict", total, 0)
        index = 0
        keep = save_probabilities and out_dir is not None
        batches = dataset if inference is None else self.engine.prefetch(dataset)
        with StopRequest().watching() as stop:
            try:
                for step, x in enumerate(batches, start=1):
                    if inference is None:
                        masks, probabilities = self.engine.predict_step(x), None
                    else:
                        masks, probabilities = inference.masks(x, self._windows_done("predict"), keep)
                    for i, mask in enumerate(masks):
                        mask, raw = _finished(mask, postprocess)
                        if out_dir is not None:
                            save_array(os.path.join(out_dir, f"{names[index]}.npy"), mask)
                        if probabilities is not None:
                            save_array(os.path.join(out_dir, f"{names[index]}.npz"), probabilities[i])
                        if mask_fn is not None:
                            mask_fn(index, mask)
                        if case_fn is not None:
                            case_fn(index, np.asarray(x[i]), None, mask, raw)
                        index += 1
                    self.hooks.after_step("predict", step, int(masks.shape[0]), None)
                    if stop.signum:
                        raise Stopped(stop.signum, "predict", index)
            finally:  # stop a prefetching reader now
                getattr(batches, "close", lambda: None)()
        self.hooks.end("predict", index, {})
        return index

    def _windows_done(self, mode):
        return lambda done, total: self.hooks.progress(mode, f"windows {done}/{total}")


def _finished(mask, postprocess):
    """(the mask after `postprocess`, the mask before it), or (mask, None) without one."""
    if postprocess is None:
        return mask, None
    mask = np.asarray(mask)
    return postprocess(mask), mask


def save_array(path: str, array: np.ndarray) -> None:
    """`array` as path (.npy; .npz holds it as 'probabilities'), whole or not at all. The file is
    made in memory and written in one call, so that a full disk reports its errno."""
    buffer = io.BytesIO()
    if path.endswith(".npz"):
        np.savez(buffer, probabilities=array)
    else:
        np.save(buffer, array)
    with replacing(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(buffer.getbuffer())
