"""tf.data pipelines over an MSD task folder for V-Net: split, training with flips, evaluation, test."""
import math
import os

import numpy as np
import tensorflow as tf

from dataset.data_loader import join_streams, prefetch
from dataset.msd import load_case, read_dataset_json
from common.errors import UserError
from common.progress import Progress

AUTOTUNE = tf.data.AUTOTUNE
CT = "CT"


def _load_all(pairs, shape, interpolator, normalize, label):
    images, labels = [], []
    progress = Progress(len(pairs), label)
    for image_path, label_path in pairs:
        image, labels_ = load_case(image_path, label_path, shape, interpolator, normalize)
        images.append(image)
        labels.append(labels_)
        progress.advance()
    progress.close()
    return images, labels


class MsdData:
    """Every MSD case resampled to `input_shape` (x, y, z) in memory, and the pipelines over them."""

    def __init__(self, data_dir, input_shape, batch_size, train_split=1.0, seed=0, augment=False,
                 interpolator="linear", data_normalization="zscore", worker_id=0, num_workers=1,
                 prefetch_device=None, need_eval=False, need_test=False, local_streams=1):
        task = read_dataset_json(data_dir)
        self.label_names = task["labels"]
        self.n_classes = len(self.label_names)
        self.batch_size, self.seed, self.augment = batch_size, seed, augment
        self.worker_id, self.num_workers = worker_id, num_workers
        self.local_streams, self.stream_batch = local_streams, batch_size // local_streams
        self.prefetch_device = prefetch_device
        self.input_shape = tuple(input_shape)
        modality = next(iter(task["modality"].values()), "MRI")
        normalize = data_normalization == "zscore" and modality.upper() != CT
        cases = task["training"]
        n_train = int(math.floor(len(cases) * train_split))
        if n_train == 0:
            raise UserError(f"--train_split {train_split}: no training case out of {len(cases)}")
        self.train_pairs, self.eval_pairs = cases[:n_train], cases[n_train:]
        if need_eval and not self.eval_pairs:
            raise UserError(f"--train_split {train_split} leaves no validation case out of "
                            f"{len(cases)}; use a split below 1.0 (for example 0.8) to evaluate")
        self.test_paths = task["test"]
        if need_test and not self.test_paths:
            raise UserError(f"{os.path.join(data_dir, 'dataset.json')}: no 'test' images to predict")
        load = lambda pairs, label: _load_all(pairs, self.input_shape, interpolator, normalize, label)  # noqa: E731
        self.train_x, self.train_y = load(self.train_pairs, "reading training cases")
        self.eval_x, self.eval_y = load(self.eval_pairs, "reading validation cases")
        self.test_x = load([(p, None) for p in self.test_paths], "reading test images")[0] if need_test else []
        self.n_train, self.n_eval, self.n_test = len(self.train_x), len(self.eval_x), len(self.test_x)
        self.test_names = [os.path.basename(p).split(".")[0] for p in self.test_paths]

    def train_dataset(self, start_step=0):
        """Endless shuffled batches of (x, one-hot y), flipped when augmenting, resumable; one
        process of several devices joins their streams (dataset/data_loader.py's join_streams)."""
        batches = join_streams(lambda k: self._train_stream(k, start_step), self.worker_id,
                               self.local_streams)
        return prefetch(batches, self.prefetch_device)

    def _train_stream(self, stream, start_step):
        ds = tf.data.Dataset.from_tensor_slices((np.stack(self.train_x), np.stack(self.train_y)))
        ds = ds.cache().repeat().shuffle(2 * self.stream_batch, seed=self.seed)
        ds = ds.shard(self.num_workers, stream)
        skipped = start_step * self.stream_batch
        ds = ds.skip(skipped).enumerate(start=skipped)
        seed, augment, n_classes = self.seed, self.augment, self.n_classes

        def transform(index, example):
            x, y = example
            if augment:
                flip_seeds = tf.random.experimental.stateless_split(tf.stack([seed, index]), 2)
                for axis, axis_seed in zip((1, 0), tf.unstack(flip_seeds)):
                    flip = tf.random.stateless_uniform([], axis_seed) > 0.5
                    x = tf.cond(flip, lambda: tf.reverse(x, [axis]), lambda: x)
                    y = tf.cond(flip, lambda: tf.reverse(y, [axis]), lambda: y)
            return x, tf.one_hot(tf.cast(y, tf.int32), n_classes)

        ds = ds.map(transform, num_parallel_calls=AUTOTUNE)
        return ds.batch(self.stream_batch, drop_remainder=True)

    def eval_dataset(self):
        """Every validation case once as (x, one-hot y), in batches."""
        ds = tf.data.Dataset.from_tensor_slices((np.stack(self.eval_x), np.stack(self.eval_y)))
        n_classes = self.n_classes
        ds = ds.map(lambda x, y: (x, tf.one_hot(tf.cast(y, tf.int32), n_classes)))
        return prefetch(ds.batch(self.batch_size), self.prefetch_device)

    def test_dataset(self):
        """Every test image once, in batches."""
        ds = tf.data.Dataset.from_tensor_slices(np.stack(self.test_x))
        return prefetch(ds.batch(self.batch_size), self.prefetch_device)
