"""The TFRecord format of preprocessed brain-tumour volumes.

Each record is a `tf.train.Example` with the reference's four features, `X` (uint8 volume of
shape D×H×W×C, C order, as bytes; C is 4 for BraTS, 1 for BraTS-MEN-RT), `Y` (uint8 classes
D×H×W as bytes), `mean` and `stdev` (C floats each), and the extras this tool adds: `shape` (3
ints), `case` (the case name) and `affine` (the source grid). A record without `shape` is a
240×240×155 BraTS volume, so files written by the reference load unchanged. The folder's
records.json (dataset/record_info.py) gives C and the label convention.
"""
import numpy as np
import tensorflow as tf

from dataset.windows import BRATS_SHAPE, N_MODALITIES

METADATA = {
    "shape": tf.io.FixedLenFeature([3], tf.int64, default_value=BRATS_SHAPE),
    "case": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "affine": tf.io.FixedLenFeature([16], tf.float32, default_value=np.eye(4).ravel().tolist()),
}


def features(n_channels=N_MODALITIES):
    """The parsing spec of a record of `n_channels` input channels."""
    return {"X": tf.io.FixedLenFeature([], tf.string),
            "Y": tf.io.FixedLenFeature([], tf.string),
            "mean": tf.io.FixedLenFeature([n_channels], tf.float32),
            "stdev": tf.io.FixedLenFeature([n_channels], tf.float32)} | METADATA


def _bytes(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _floats(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def encode_example(volume, labels, mean, stdev, case="", affine=None):
    """Serialize one case: `volume` uint8 (D,H,W,C), `labels` uint8 (D,H,W)."""
    features = {
        "X": _bytes(volume.tobytes()),
        "Y": _bytes(labels.tobytes()),
        "mean": _floats(mean),
        "stdev": _floats(stdev),
        "shape": tf.train.Feature(int64_list=tf.train.Int64List(value=list(volume.shape[:3]))),
        "case": _bytes(case.encode()),
    }
    if affine is not None:
        features["affine"] = _floats(np.asarray(affine, np.float32).ravel())
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def decode_metadata(serialized):
    """The extras of one record: {'case': str, 'shape': (D, H, W), 'affine': 4×4 array}."""
    parsed = tf.io.parse_single_example(serialized, METADATA)
    return {"case": parsed["case"].numpy().decode(),
            "shape": tuple(int(s) for s in parsed["shape"].numpy()),
            "affine": parsed["affine"].numpy().reshape(4, 4).astype(np.float64)}


def decode_example(serialized, static_shape=None, n_channels=N_MODALITIES):
    """Parse one record of `n_channels` channels into (X uint8 (D,H,W,C), Y uint8 (D,H,W), mean,
    stdev).

    `static_shape` (D, H, W), when every record of a dataset shares it, gives the tensors a
    static shape.
    """
    parsed = tf.io.parse_single_example(serialized, features(n_channels))
    shape = tf.cast(parsed["shape"], tf.int32)
    x = tf.reshape(tf.io.decode_raw(parsed["X"], tf.uint8), tf.concat([shape, [n_channels]], 0))
    y = tf.reshape(tf.io.decode_raw(parsed["Y"], tf.uint8), shape)
    if static_shape is not None:
        x = tf.ensure_shape(x, tuple(static_shape) + (n_channels,))
        y = tf.ensure_shape(y, tuple(static_shape))
    return x, y, parsed["mean"], parsed["stdev"]
