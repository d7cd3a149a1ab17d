"""The TensorFlow engine: compiled train, eval and predict steps, under a tf.distribute strategy.

With the default strategy this is a plain single-device `tf.function` (XLA when asked). Under a
multi-device or multi-worker strategy each step runs on every replica through `strategy.run`;
the optimizer all-reduces the gradients. With Horovod, `all_reduce` averages them instead.
Several workers agree on a stop (`agree`): an all-gather of a number across the strategy's
replicas, or Horovod's `agree_across`.

Every step is traced without AutoGraph, as Keras' own steps are: the model, losses and inference
functions are written with keras.ops and hold no Python control flow on tensors (JAX traces the
same code), so AutoGraph's conversion would only add to the time before the first step.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

from common.quiet_import import import_tensorflow


class TFEngine:
    """Compiled steps of one model, optimizer, loss `(y, p) -> scalar` and metrics `(y, p) -> {name: (B,)}`.

    `finish_batch(inputs, labels) -> (x, y)`, when given, turns a compact training batch into the
    model's input and target inside the compiled step (dataset/device_transform.py).
    """

    def __init__(self, model, optimizer, loss_fn, metrics_fn, use_xla=False, strategy=None,
                 all_reduce=None, finish_batch=None, agree_across=None):
        self.tf = tf = import_tensorflow()
        self.model, self.optimizer = model, optimizer
        self.loss_fn, self.metrics_fn = loss_fn, metrics_fn
        self.finish_batch = finish_batch
        self.strategy = strategy or tf.distribute.get_strategy()
        self.all_reduce, self.agree_across = all_reduce, agree_across
        self._agree = None
        self.use_xla = use_xla
        self._train = tf.function(self._replica_train_step, jit_compile=use_xla, autograph=False)
        self._eval = tf.function(self._eval_step, jit_compile=use_xla, reduce_retracing=True,
                                 autograph=False)
        self._predict = tf.function(self._predict_step, jit_compile=use_xla, reduce_retracing=True,
                                    autograph=False)

    def _replica_train_step(self, x, y):
        tf = self.tf
        replicas = self.strategy.num_replicas_in_sync

        def step(x, y):
            if self.finish_batch is not None:
                x, y = self.finish_batch(x, y)
            with tf.GradientTape() as tape:
                probs = self.model(x, training=True)
                loss = self.loss_fn(y, probs)
                # The optimizer sums the replicas' gradients: scale for the global mean.
                scaled = self.optimizer.scale_loss(loss / replicas)
            grads = tape.gradient(scaled, self.model.trainable_variables)
            if self.all_reduce is not None:
                grads = self.all_reduce(grads)
            self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
            return loss

        losses = self.strategy.run(step, args=(x, y))
        return self.strategy.reduce(tf.distribute.ReduceOp.MEAN, losses, axis=None)

    def _eval_step(self, x, y):
        return self.metrics_fn(y, self.model(x, training=False))

    def _predict_step(self, x):
        return self.tf.cast(self.tf.argmax(self.model(x, training=False), axis=-1), self.tf.int8)

    def distribute(self, make_dataset: Callable[[], Iterable]) -> Iterable:
        """The training batches of `make_dataset()` (this worker's shard), fed to its replicas:
        one process of several devices (MirroredStrategy) splits each batch over them in order."""
        if self.strategy.num_replicas_in_sync == 1:
            return make_dataset()
        if isinstance(self.strategy, self.tf.distribute.MirroredStrategy):
            return self.strategy.experimental_distribute_dataset(make_dataset())
        return self.strategy.distribute_datasets_from_function(lambda context: make_dataset())

    @property
    def several_workers(self) -> bool:
        """Whether other processes train with this one (`agree` is then a collective)."""
        multi_worker = (self.strategy.num_replicas_in_sync > 1
                        and not isinstance(self.strategy, self.tf.distribute.MirroredStrategy))
        return self.agree_across is not None or multi_worker

    def agree(self, value: int) -> int:
        """The largest of every worker's `value` (an int), on every worker: a collective that
        each worker calls after the same step."""
        if self.agree_across is not None:
            return self.agree_across(value)
        if not self.several_workers:
            return value
        tf = self.tf
        if self._agree is None:
            def largest(v):
                gathered = tf.distribute.get_replica_context().all_gather(v[None], axis=0)
                return tf.reduce_max(gathered)

            self._agree = tf.function(lambda v: self.strategy.run(largest, args=(v,)),
                                      autograph=False)
        result = self._agree(tf.constant(value, tf.int32))
        return int(self.strategy.experimental_local_results(result)[0].numpy())

    @staticmethod
    def prefetch(dataset: Iterable) -> Iterable:
        """`dataset` itself: tf.data pipelines prefetch on their own."""
        return dataset

    def commit(self) -> None:
        """Nothing to do: the steps update the Keras variables themselves."""

    def train_step(self, x: Any, y: Any) -> Any:
        """One optimizer step on a batch; returns the loss tensor (not synced)."""
        return self._train(x, y)

    def eval_step(self, x: Any, y: Any) -> dict[str, np.ndarray]:
        """Per-sample hard dice scores of a batch: {name: (B,) numpy array}."""
        return {k: v.numpy() for k, v in self._eval(x, y).items()}

    def predict_step(self, x: Any) -> np.ndarray:
        """Argmax masks of a batch as int8 numpy (B, D, H, W)."""
        return self._predict(x).numpy()

    def compile(self, fn: Callable, donate: tuple = ()) -> Callable:
        """`fn(forward, *args)`, written with keras.ops, as a tf.function (XLA when asked):
        `forward(x)` is the model's inference. `donate` is accepted for the engines' common
        interface; TensorFlow manages the buffers itself."""
        forward = lambda x: self.model(x, training=False)  # noqa: E731
        return self.tf.function(lambda *args: fn(forward, *args), jit_compile=self.use_xla,
                                autograph=False)

    def snapshot(self) -> list[np.ndarray]:
        """The model's weights now (NumPy copies), as a handle for `use_weights` (ensembles)."""
        return self.model.get_weights()

    def use_weights(self, weights: list[np.ndarray]) -> None:
        """Load `weights` (a `snapshot()`) into the model."""
        self.model.set_weights(weights)

    def dump_compiled(self, out_dir: str, x: Any, y: Any) -> None:
        """Write the training step's TensorFlow graph and its XLA HLO (compiled for the batch's shapes)."""
        import os
        tf = self.tf
        os.makedirs(out_dir, exist_ok=True)
        graph = self._train.get_concrete_function(x, y).graph.as_graph_def()
        with open(os.path.join(out_dir, "train_step_graph.pbtxt"), "w") as handle:
            handle.write(str(graph))
        compiled = tf.function(self._replica_train_step, jit_compile=True, autograph=False)
        with open(os.path.join(out_dir, "train_step.hlo.txt"), "w") as handle:
            handle.write(compiled.experimental_get_compiler_ir(x, y)(stage="hlo"))

    def start_trace(self, out_dir: str) -> None:
        """Start the TensorFlow profiler; its trace goes under out_dir/plugins/profile."""
        self.tf.profiler.experimental.start(out_dir)

    def stop_trace(self) -> None:
        """Stop the profiler and write its trace."""
        self.tf.profiler.experimental.stop()

    @staticmethod
    def to_float(loss: Any) -> float:
        """The value of a loss tensor (waits for the step to finish)."""
        return float(loss.numpy())
