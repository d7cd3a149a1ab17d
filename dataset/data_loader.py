"""tf.data pipelines over preprocessed BraTS TFRecords (folds, training, evaluation, test) and the
synthetic data as tf.data."""
import glob
import os
import re

import numpy as np
import tensorflow as tf

from dataset import transforms, windows
from dataset.record_info import read_info
from dataset.records import decode_example, decode_metadata
from dataset.synthetic import SyntheticData, base_seed
from common.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE


def _natural_key(path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", os.path.basename(path))]


def list_records(data_dir):
    """The *.tfrecord files of `data_dir`, in natural order (volume-2 before volume-10)."""
    files = sorted(glob.glob(os.path.join(data_dir, "*.tfrecord")), key=_natural_key)
    if not files:
        raise UserError(f"{data_dir}: no *.tfrecord files; create them with "
                        "dataset/preprocess_data.py, or leave out --data_dir for the phantom data")
    return files


def split_folds(files, fold, num_folds):
    """(training files, validation files): numpy array_split into num_folds parts, part `fold` validates."""
    if not 0 <= fold < num_folds:
        raise UserError(f"--fold {fold} is outside [0, {num_folds}); pick a fold below --num_folds")
    parts = np.array_split(np.array(files), num_folds)
    if len(parts[fold]) == 0:
        raise UserError(f"--fold {fold}: only {len(files)} record files for {num_folds} folds, so this "
                        "fold has no validation files; use fewer --num_folds or more files")
    train = [str(f) for i, part in enumerate(parts) if i != fold for f in part]
    return train, [str(f) for f in parts[fold]]


def scan_records(files):
    """Read every record of `files` once: a list per file of each record's metadata (case, shape, affine).

    A truncated or corrupt file is a UserError naming it.
    """
    found = []
    for path in files:
        records = []
        try:
            for serialized in tf.data.TFRecordDataset(path):
                records.append(decode_metadata(serialized))
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as err:
            raise UserError(f"{path}: corrupt or truncated record after {len(records)} good ones "
                            f"({err.message.splitlines()[0]}); create it again with "
                            "dataset/preprocess_data.py") from None
        found.append(records)
    if not any(found):
        raise UserError(f"{os.path.dirname(files[0])}: the record files hold no records")
    return found


def join_streams(make_stream, first, count):
    """The training batches of this process: batch i joins (in order) batch i of the input streams
    `make_stream(k)` for k in first .. first + count - 1, so that one process of several devices
    reads what as many workers of one device each would, whatever the layout."""
    streams = [make_stream(k) for k in range(first, first + count)]
    if count == 1:
        return streams[0]
    joined = tf.data.Dataset.zip(tuple(streams))
    return joined.map(lambda *batches: tf.nest.map_structure(lambda *parts: tf.concat(parts, 0), *batches),
                      num_parallel_calls=AUTOTUNE)


class BratsData:
    """The training, evaluation and test pipelines of one process over one fold of `data_dir`;
    `info` (its records.json: channels and label convention) sizes the inputs and the one-hot
    labels.

    Training reads `local_streams` of the `num_workers` input streams (one per device in all),
    from stream `worker_id` on, each in batches of batch_size / local_streams; a stream shards
    the training files as a worker of that index would."""

    def __init__(self, data_dir, batch_size, fold=0, num_folds=5, seed=None, augment=True,
                 worker_id=0, num_workers=1, prefetch_device=None, local_streams=1):
        self.batch_size = batch_size
        self.local_streams, self.stream_batch = local_streams, batch_size // local_streams
        self.seed = base_seed(seed)
        self.augment = augment
        self.worker_id, self.num_workers = worker_id, num_workers
        self.prefetch_device = prefetch_device
        self.fold, self.num_folds = fold, num_folds
        self.info = read_info(data_dir)
        self.n_channels, self.n_classes = self.info.n_channels, self.info.convention.n_classes
        self.train_files, self.eval_files = split_folds(list_records(data_dir), fold, num_folds)
        found = scan_records(self.train_files + self.eval_files)
        self.eval_records = [r for records in found[len(self.train_files):] for r in records]
        self.n_train = sum(len(records) for records in found[:len(self.train_files)])
        self.n_eval = len(self.eval_records)
        self.n_test = self.n_eval  # predict runs over the validation volumes
        self.volume_shape = next(r for records in found for r in records)["shape"]
        self.crop_shape = windows.train_crop_shape(self.volume_shape)
        self.window = windows.eval_window(self.volume_shape)

    def _parse(self, serialized):
        return decode_example(serialized, self.volume_shape, self.n_channels)

    def check_trainable(self):
        """A UserError unless every worker's shard of the training files holds a record."""
        if self.n_train == 0:
            n_files = len(self.train_files) + len(self.eval_files)
            raise UserError(f"--num_folds {self.num_folds}: only {n_files} record files for "
                            f"{self.num_folds} folds, so fold {self.fold} leaves no training files; "
                            "use fewer --num_folds or more files")
        if self.n_train < self.num_workers:
            raise UserError(f"{self.n_train} training volumes for {self.num_workers} devices: each "
                            "device's input stream needs one; use fewer devices, fewer --num_folds "
                            "or more files")

    def train_dataset(self, start_step=0):
        """Endless compact batches ({"image": uint8 (B, crop…, 4), "mean", "stdev", "flip", "brighten",
        "factor"}, uint8 labels (B, crop…)), resuming the stream at `start_step`; the training step
        finishes them (dataset/device_transform.py)."""
        self.check_trainable()
        return self._finish(join_streams(lambda k: self._train_stream(k, start_step),
                                         self.worker_id, self.local_streams))

    def _train_stream(self, stream, start_step):
        ds = tf.data.TFRecordDataset(self.train_files)
        ds = ds.shard(self.num_workers, stream).cache()
        ds = ds.shuffle(8 * self.stream_batch, seed=self.seed).repeat()
        ds = ds.map(self._parse, num_parallel_calls=AUTOTUNE)
        skipped = start_step * self.stream_batch
        ds = ds.skip(skipped).enumerate(start=skipped)
        crop, augment, seed = self.crop_shape, self.augment, self.seed

        def transform(index, example):
            x, y, mean, stdev = example
            return transforms.train_transform(x, y, mean, stdev, tf.stack([seed, index]), crop, augment)

        ds = ds.map(transform, num_parallel_calls=AUTOTUNE)
        return ds.batch(self.stream_batch, drop_remainder=True)

    def eval_dataset(self):
        """Every validation volume once, as (x, one-hot y) evaluation windows, in batches."""
        return self._eval(self.window, self.batch_size)

    def eval_volumes(self):
        """Every validation volume once, whole, as (x, one-hot y) in a batch of its own."""
        return self._eval(None, 1)

    def test_dataset(self):
        """Every validation volume once, as image windows alone, in batches."""
        return self._test(self.window, self.batch_size)

    def test_volumes(self):
        """Every validation image once, whole, in a batch of its own."""
        return self._test(None, 1)

    def _eval(self, window, batch_size):
        ds = tf.data.TFRecordDataset(self.eval_files).cache().map(self._parse, num_parallel_calls=AUTOTUNE)
        n_classes = self.n_classes
        ds = ds.map(lambda x, y, m, s: transforms.eval_transform(x, y, m, s, window, n_classes),
                    num_parallel_calls=AUTOTUNE)
        return self._finish(ds.batch(batch_size))

    def _test(self, window, batch_size):
        ds = tf.data.TFRecordDataset(self.eval_files).map(self._parse, num_parallel_calls=AUTOTUNE)
        ds = ds.map(lambda x, y, m, s: transforms.test_transform(x, m, s, window),
                    num_parallel_calls=AUTOTUNE)
        return self._finish(ds.batch(batch_size))

    def _finish(self, ds):
        return prefetch(ds, self.prefetch_device)


class SyntheticTFData(SyntheticData):
    """The NumPy synthetic data as tf.data pipelines (so they can prefetch onto an HPU)."""

    def __init__(self, batch_size, seed=None, augment=True, prefetch_device=None):
        super().__init__(batch_size, seed, augment)
        self.prefetch_device = prefetch_device

    def _as_dataset(self, batches):
        first = next(iter(batches()))
        spec = tf.nest.map_structure(lambda a: tf.TensorSpec(a.shape, tf.as_dtype(a.dtype)), first)
        return prefetch(tf.data.Dataset.from_generator(batches, output_signature=spec),
                        self.prefetch_device)

    def train_dataset(self, start_step=0):
        """Endless compact synthetic training batches."""
        return self._as_dataset(lambda: super(SyntheticTFData, self).train_dataset(start_step))

    def eval_dataset(self):
        """The synthetic evaluation window."""
        return self._as_dataset(lambda: iter(super(SyntheticTFData, self).eval_dataset()))

    def eval_volumes(self):
        """The synthetic evaluation volume, whole."""
        return self._as_dataset(lambda: iter(super(SyntheticTFData, self).eval_volumes()))

    def test_dataset(self):
        """The synthetic test batch."""
        return self._as_dataset(lambda: iter(super(SyntheticTFData, self).test_dataset()))

    def test_volumes(self):
        """The synthetic test volume, whole."""
        return self._as_dataset(lambda: iter(super(SyntheticTFData, self).test_volumes()))


def prefetch(ds, device=None):
    """Prefetch batches, onto `device` (the HPU) when one is named."""
    if device:
        return ds.apply(tf.data.experimental.prefetch_to_device(device))
    return ds.prefetch(AUTOTUNE)
