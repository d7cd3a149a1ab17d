"""A trained model as files that run without the tool: a TensorFlow SavedModel, an ONNX model and
metadata.json, which holds what a user needs around the network (channel order, preprocessing,
resampling, labels, sliding-window defaults, the postprocessing of model_dir's
postprocessing.json) and a SHA-256 of every exported file.

segment.py (at the top of the repository) reads such a folder with ONNX Runtime alone.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from typing import Any, Optional

from common.checksums import sha256
from common.errors import UserError
from common.version import VERSION
from dataset.brats_nifti import CLIP_FRACTION
from dataset.conventions import CONVENTIONS, DEFAULT_CONVENTION
from dataset.device_transform import ZSCORE_EPS
from dataset.layouts import channel_names
from dataset.windows import MAX_CROP, MULTIPLE
from dataset.window_layout import MIN_IMPORTANCE, SIGMA_SCALE

SAVED_MODEL = "saved_model"
ONNX_FILE = "model.onnx"
METADATA = "metadata.json"
ONNX_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
CATCH_ERRORS = "TF2ONNX_CATCH_ERRORS"  # tf2onnx's switch for rolling back a failed optimizer pass
REPRODUCES = {"unet3d": "main.py --exec_mode predict --sliding_window --save_nifti",
              "vnet": "main.py --model vnet --exec_mode predict --save_nifti"}


def file_hashes(folder: str) -> dict[str, str]:
    """{path relative to `folder`: SHA-256} of every file under it but metadata.json, sorted."""
    hashes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder).replace(os.sep, "/")
            if relative != METADATA:
                hashes[relative] = sha256(path)
    return dict(sorted(hashes.items()))


def label_convention(network: dict[str, Any]) -> dict[str, Any]:
    """The label convention of a UNet3D's saved network fields: its 'convention' when it names
    one, else BraTS 2019-2021's."""
    name = network.get("convention", DEFAULT_CONVENTION)
    if isinstance(name, dict):
        name = name.get("name")
    if name not in CONVENTIONS:
        raise UserError(f"settings.json: label convention {name!r} is none of "
                        f"{', '.join(sorted(CONVENTIONS))}")
    convention = CONVENTIONS[name]
    if convention.n_classes != network["n_classes"]:
        raise UserError(f"settings.json: the {name} convention has {convention.n_classes} classes, "
                        f"the network {network['n_classes']}")
    return convention.as_dict()


def describe(network: dict[str, Any], trained: dict[str, Any], step: int,
             inference: Any) -> dict[str, Any]:
    """metadata.json's body but the file hashes, from the run's saved settings: `network` and
    `trained` (settings.json's network and run sections), the checkpoint's `step`, and the
    InferenceSettings whose overlap the sliding windows take."""
    model = network["model"]
    body = {"tool": "unet3d-medical", "version": VERSION, "network": network,
            "trained": dict(trained, step=step), "reproduces": REPRODUCES[model],
            "onnx": {"file": ONNX_FILE, "opset": ONNX_OPSET},
            "saved_model": {"folder": SAVED_MODEL, "signature": "serving_default",
                            "input": INPUT_NAME, "output": OUTPUT_NAME}}
    if model == "unet3d":
        channels = network["in_channels"]
        body["input"] = {"name": INPUT_NAME, "dtype": "float32", "layout": "NDHWC",
                         "shape": [None, None, None, None, channels],
                         "channels": list(channel_names(network.get("convention", DEFAULT_CONVENTION))),
                         "spatial_multiple": MULTIPLE}
        body["preprocessing"] = {
            "read": "nibabel get_fdata, cast to int16, axes 0 and 1 swapped",
            "clip_fraction": CLIP_FRACTION, "scale": 255, "cast": "uint8",
            "zscore": {"where": "voxel > 0", "statistics": "per channel over voxels > 0 of the "
                       "uint8 volume", "epsilon": ZSCORE_EPS}}
        body["labels"] = label_convention(network)
        body["sliding_window"] = {"window": "per axis the largest multiple of 32 not above the "
                                            "size, at most 128 and at least 32",
                                  "multiple": MULTIPLE, "max": MAX_CROP,
                                  "overlap": inference.overlap, "sigma_scale": SIGMA_SCALE,
                                  "min_importance": MIN_IMPORTANCE,
                                  "batch": inference.sw_batch_size}
    else:
        shape = list(network["input_shape"])
        body["input"] = {"name": INPUT_NAME, "dtype": "float32", "layout": "NXYZC",
                         "shape": [None] + shape + [1], "channels": ["image"]}
        body["preprocessing"] = {"zscore": network["data_normalization"] == "zscore",
                                 "zscore_note": "over the whole resampled volume; the tool "
                                                "skips it for CT tasks"}
        body["resampling"] = {"shape": shape, "axes": "x, y, z (SimpleITK's index order)",
                              "image_interpolator": network["resize_interpolator"],
                              "mask_interpolator": "nearest",
                              "grid": "same origin, direction and extent as the image"}
        n = network["n_classes"]
        body["labels"] = {"name": "msd", "labels": list(range(n)), "names": None, "regions": {}}
    return body


def kept_postprocessing(model_dir: str, labels: dict[str, Any]) -> Optional[dict[str, Any]]:
    """model_dir/postprocessing.json's body, for metadata.json's "postprocessing" (segment.py
    applies its operations), or None without the file; a UserError names the file when it is
    unreadable or names a region the `labels` convention (metadata.json's) lacks."""
    from dataset.postprocessing import FILE, read_postprocessing
    path = os.path.join(model_dir, FILE)
    if not os.path.exists(path):
        return None
    read_postprocessing(path, labels)
    with open(path) as handle:
        return json.load(handle)


def _write_saved_model(model, path, signature):
    import keras
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", lambda image: {OUTPUT_NAME: model(image, training=False)},
                         input_signature=[signature])
    archive.write_out(path, verbose=False)


def _write_onnx(model, path, signature):
    """Convert `model` with tf2onnx. Told to let its graph optimizers' errors through, tf2onnx no
    longer copies the whole graph, weights included, before each optimizer pass to roll a failed
    one back: both networks convert to the same file either way, and a failing pass now fails the
    export instead of leaving a less optimized model."""
    saved = os.environ.get(CATCH_ERRORS)
    os.environ[CATCH_ERRORS] = "FALSE"
    try:
        with warnings.catch_warnings():  # Keras' tf2onnx patch probes np.object, a FutureWarning
            warnings.simplefilter("ignore", FutureWarning)
            model.export(path, format="onnx", input_signature=[signature],
                         opset_version=ONNX_OPSET, verbose=False)
    finally:
        if saved is None:
            del os.environ[CATCH_ERRORS]
        else:
            os.environ[CATCH_ERRORS] = saved


def write_export(model: Any, export_dir: str, body: dict[str, Any]) -> dict[str, Any]:
    """Write `model` (a Keras model on the TensorFlow backend, float32) as export_dir/saved_model,
    export_dir/model.onnx and export_dir/metadata.json (`body` plus the files' SHA-256 and the
    ONNX model's input and output names). The files are made in a temporary folder beside it and
    moved into place complete; export_dir must not exist or be empty."""
    import tensorflow as tf
    signature = tf.TensorSpec(body["input"]["shape"], tf.float32, name=INPUT_NAME)
    parent = os.path.dirname(os.path.abspath(export_dir))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".export-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp's folder is private; the export is not
    try:
        _write_saved_model(model, os.path.join(work, SAVED_MODEL), signature)
        onnx_path = os.path.join(work, ONNX_FILE)
        _write_onnx(model, onnx_path, signature)
        body = dict(body, onnx=dict(body["onnx"], **onnx_names(onnx_path)), files=file_hashes(work))
        with open(os.path.join(work, METADATA), "w") as handle:
            json.dump(body, handle, indent=2)
            handle.write("\n")
        os.replace(work, export_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return body


def onnx_names(path: str) -> dict[str, str]:
    """{'input': name, 'output': name} of the ONNX model's graph."""
    import onnx
    graph = onnx.load(path, load_external_data=False).graph
    return {"input": graph.input[0].name, "output": graph.output[0].name}
