"""The JAX engine: jitted, stateless train, eval and predict steps (XLA always), on one or more devices.

The model's and optimizer's variables live as a tuple of JAX arrays while training (donated to
each step, so updated in place) and are written back into the Keras variables by `commit()`:
before a checkpoint, at the end of training. With several devices the batch is split over them
(Keras' DataParallel layout); the variables are replicated and XLA all-reduces the gradients.
With several processes (jax.distributed) the layout spans every process's devices: each process
passes its own part of the global batch, and every training step is a step of all processes.
Evaluation and prediction run on this process's devices alone, on local copies of the replicated
variables, so that process 0 evaluates and predicts while the others have finished.
Training batches are copied to the devices by a background thread, ahead of the step that uses
them, so the copy overlaps the previous step. Several processes agree on a stop (`agree`) through
an all-gather of one number (jax.experimental.multihost_utils). Several processes compile the
training step ahead of its first run and meet at a barrier (runtime/engines/jax_barrier.py) before running
it: one that compiles more slowly must not keep the others inside the step's first all-reduce.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np

from runtime.engines.jax_barrier import wait_for_every_jax_process

PREFETCH_DEPTH = 2


def prefetch_to_device(batches: Iterable[tuple], put: Callable[..., Any],
                       depth: int = PREFETCH_DEPTH) -> Iterator[Any]:
    """Yield `put(*batch)` for every batch of `batches`, the next `depth` of them prepared by a
    background thread while the caller works. An error of the thread is raised here; closing the
    generator stops the thread and waits for it."""
    ready, stop, done = queue.Queue(maxsize=depth), threading.Event(), object()

    def offer(item):
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for batch in batches:
                if not offer(put(*batch)):
                    return
            offer(done)
        except BaseException as err:  # raised again in the consumer
            offer(err)

    producer = threading.Thread(target=produce, name="prefetch-to-device", daemon=True)
    producer.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # a thread left inside XLA when the interpreter exits aborts the process
        stop.set()
        producer.join()


class JaxEngine:
    """Compiled steps of one model, optimizer, loss `(y, p) -> scalar` and metrics `(y, p) -> {name: (B,)}`.

    `finish_batch(inputs, labels) -> (x, y)`, when given, turns a compact training batch into the
    model's input and target inside the compiled step (dataset/device_transform.py).
    """

    def __init__(self, model, optimizer, loss_fn, metrics_fn, distribution=None, finish_batch=None):
        self.model, self.optimizer = model, optimizer
        self.loss_fn, self.metrics_fn = loss_fn, metrics_fn
        self.finish_batch = finish_batch
        self.distribution = distribution
        self.state, self._local_state = None, None
        local_mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("batch",))
        self._local_split = jax.sharding.NamedSharding(local_mesh, jax.sharding.PartitionSpec("batch"))
        self._local_copy = jax.sharding.NamedSharding(local_mesh, jax.sharding.PartitionSpec())
        self.weights_in_use = None
        self._train = jax.jit(self._train_step, donate_argnums=0)
        self._train_compiled = False
        self._eval = jax.jit(self._eval_step)
        self._predict = jax.jit(self._predict_step)

    # ---- pure functions ------------------------------------------------------------------------
    def _train_step(self, state, x, y):
        trainable, non_trainable, opt_vars = state
        if self.finish_batch is not None:
            x, y = self.finish_batch(x, y)

        def loss_of(trainable):
            probs, new_non_trainable = self.model.stateless_call(trainable, non_trainable, x, training=True)
            return self.loss_fn(y, probs), new_non_trainable

        (loss, non_trainable), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
        trainable, opt_vars = self.optimizer.stateless_apply(opt_vars, grads, trainable)
        return (trainable, non_trainable, opt_vars), loss

    def _forward(self, state, x):
        trainable, non_trainable = state[:2]
        probs, _ = self.model.stateless_call(trainable, non_trainable, x, training=False)
        return probs

    def _eval_step(self, state, x, y):
        return self.metrics_fn(y, self._forward(state, x))

    def _predict_step(self, state, x):
        return jax.numpy.argmax(self._forward(state, x), axis=-1).astype("int8")

    # ---- state -----------------------------------------------------------------------------------
    def _current_state(self):
        if self.state is None:
            values = lambda variables: [self._replicated_state(v.value) for v in variables]  # noqa: E731
            self.state = (values(self.model.trainable_variables),
                          values(self.model.non_trainable_variables),
                          values(self.optimizer.variables))
        return self.state

    def _replicated_state(self, value):
        """A variable's value as the compiled steps take it: with several processes, one array
        replicated on every device of every process, made from this process's copy. Every
        process holds the same values (one seed; a checkpoint broadcast from process 0), so this
        skips device_put's comparison of each variable between the processes."""
        if jax.process_count() == 1 or (isinstance(value, jax.Array) and not value.is_fully_addressable):
            return value
        local = np.asarray(value)
        everywhere = jax.sharding.NamedSharding(self.distribution.device_mesh.backend_mesh,
                                                jax.sharding.PartitionSpec())
        return jax.make_array_from_callback(local.shape, everywhere, lambda index: local[index])

    def commit(self) -> None:
        """Write the training state back into the Keras variables (for checkpoints and inference)."""
        if self.state is None:
            return
        variables = (self.model.trainable_variables, self.model.non_trainable_variables,
                     self.optimizer.variables)
        for group, values in zip(variables, self.state):
            for variable, value in zip(group, values):
                variable.assign(value)
        self.state, self._local_state = None, None

    def _inference_state(self):
        """The state for evaluation and prediction: with several processes, a copy of the
        (replicated) variables on this process's devices, so that no other process takes part."""
        state = self._current_state()
        if jax.process_count() == 1:
            return state
        if self._local_state is None:
            local = lambda values: [jax.device_put(v.addressable_data(0), self._local_copy)  # noqa: E731
                                    for v in values]
            self._local_state = (local(state[0]), local(state[1]), [])
        return self._local_state

    def _inputs(self, *arrays):
        """Training batches (arrays, or dicts of them) as device arrays: this process's batch is
        its part of the global batch, split over the devices with a data-parallel layout; arrays
        already on the devices pass unchanged."""
        def place(a):
            if isinstance(a, jax.Array):
                return a
            a = np.asarray(a)
            if self.distribution is None:
                return jax.device_put(a)
            layout = self.distribution.get_data_layout(a.shape).backend_layout
            return jax.make_array_from_process_local_data(layout, a)
        return [jax.tree.map(place, a) for a in arrays]

    def _replicated(self, *arrays):
        """Arrays on the device, whole (on every device with several): for whole-volume inference."""
        def place(a):
            a = np.asarray(a)
            if self.distribution is None:
                return jax.device_put(a)
            import keras
            layout = keras.distribution.TensorLayout([None] * a.ndim, self.distribution.device_mesh)
            return jax.device_put(a, layout.backend_layout)
        return [place(a) for a in arrays]

    def _whole_inputs(self, *arrays):
        """(device arrays, batch size): an evaluation or prediction batch on this process's
        devices, its last example repeated up to a multiple of their count so that the batch
        splits evenly over them."""
        arrays = [np.asarray(a) for a in arrays]
        n = len(arrays[0])
        extra = -n % jax.local_device_count()
        if extra:
            arrays = [np.concatenate([a, np.repeat(a[-1:], extra, axis=0)]) for a in arrays]
        if jax.local_device_count() == 1:
            return [jax.device_put(a) for a in arrays], n
        return [jax.device_put(a, self._local_split) for a in arrays], n

    # ---- the engine interface --------------------------------------------------------------------
    def distribute(self, make_dataset: Callable[[], Iterable]) -> Iterator[list]:
        """The batches of `make_dataset()` (a tf.data pipeline or an iterator of NumPy arrays) as
        device arrays, each copied while the step before it runs."""
        dataset = make_dataset()
        host = dataset.as_numpy_iterator() if hasattr(dataset, "as_numpy_iterator") else dataset
        return prefetch_to_device(host, self._inputs)

    def prefetch(self, dataset: Iterable) -> Iterator[Any]:
        """The batches of `dataset` (x, or tuples (x, y)) as device arrays, whole, each copied while
        the batch before it is worked on (for `Inference`, which takes whole volumes)."""
        host = dataset.as_numpy_iterator() if hasattr(dataset, "as_numpy_iterator") else dataset
        batches = prefetch_to_device((b if isinstance(b, tuple) else (b,) for b in host), self._replicated)
        try:
            for batch in batches:
                yield tuple(batch) if len(batch) > 1 else batch[0]
        finally:
            batches.close()

    @property
    def several_workers(self) -> bool:
        """Whether other processes train with this one (`agree` is then a collective)."""
        return jax.process_count() > 1

    @staticmethod
    def agree(value: int) -> int:
        """The largest of every process's `value` (an int), on every process: a collective that
        each process calls after the same step."""
        if jax.process_count() == 1:
            return value
        from jax.experimental import multihost_utils
        return int(np.max(multihost_utils.process_allgather(np.int32(value))))

    def train_step(self, x: Any, y: Any) -> jax.Array:
        """One optimizer step on a batch; returns the loss (a device scalar, not synced)."""
        state, inputs = self._current_state(), self._inputs(x, y)
        if not self._train_compiled and self.several_workers:
            self._train.lower(state, *inputs).compile()  # the jitted step then runs this program
            wait_for_every_jax_process("training step compiled")
        self._train_compiled = True
        self.state, loss = self._train(state, *inputs)
        self._local_state = None
        return loss

    def eval_step(self, x: Any, y: Any) -> dict[str, np.ndarray]:
        """Per-sample hard dice scores of a batch: {name: (B,) numpy array}."""
        inputs, n = self._whole_inputs(x, y)
        scores = self._eval(self._inference_state(), *inputs)
        return {k: np.asarray(v)[:n] for k, v in scores.items()}

    def predict_step(self, x: Any) -> np.ndarray:
        """Argmax masks of a batch as int8 numpy (B, D, H, W)."""
        inputs, n = self._whole_inputs(x)
        return np.asarray(self._predict(self._inference_state(), *inputs))[:n]

    def compile(self, fn: Callable, donate: tuple = ()) -> Callable:
        """`fn(forward, *args)`, written with keras.ops, jitted: `forward(x)` is the model's
        inference under the weights in use. Returns a callable of `*args`; the arguments at the
        positions `donate` are donated (their buffers reused for the results)."""
        jitted = jax.jit(lambda weights, *args: fn(lambda x: self._forward(weights, x), *args),
                         donate_argnums=tuple(1 + i for i in donate))
        return lambda *args: jitted(self.weights_in_use or self.snapshot(), *args)

    def snapshot(self) -> tuple[list, list]:
        """The model's weights now, as a handle for `use_weights` (ensembles of checkpoints)."""
        if self.state is not None:
            return self.state[:2]
        return ([v.value for v in self.model.trainable_variables],
                [v.value for v in self.model.non_trainable_variables])

    def use_weights(self, weights: tuple[list, list]) -> None:
        """Run the compiled inference functions with `weights` (a `snapshot()`) from now on."""
        self.weights_in_use = weights

    def dump_compiled(self, out_dir: str, x: Any, y: Any) -> None:
        """Write the training step's StableHLO (as lowered) and its optimized HLO (as compiled)."""
        os.makedirs(out_dir, exist_ok=True)
        lowered = self._train.lower(self._current_state(), *self._inputs(x, y))
        with open(os.path.join(out_dir, "train_step.stablehlo.txt"), "w") as handle:
            handle.write(lowered.as_text())
        with open(os.path.join(out_dir, "train_step.hlo.txt"), "w") as handle:
            handle.write(lowered.compile().as_text())

    @staticmethod
    def start_trace(out_dir: str) -> None:
        """Start JAX's profiler; its trace goes under out_dir/plugins/profile."""
        jax.profiler.start_trace(out_dir)

    @staticmethod
    def stop_trace() -> None:
        """Stop the profiler and write its trace."""
        jax.profiler.stop_trace()

    @staticmethod
    def to_float(loss: Any) -> float:
        """The value of a loss (waits for the step to finish)."""
        return float(loss)
