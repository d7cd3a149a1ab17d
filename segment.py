"""Segment one case with an exported model (main.py --exec_mode export), without TensorFlow, Keras
or JAX: NumPy, nibabel, SimpleITK and ONNX Runtime only.

UNet3D: --input is a BraTS case folder (<case>/<case>_<channel>.nii.gz for the channels that
metadata.json lists); it is read and normalized as the tool's preprocessing does, covered with
overlapping windows blended with a Gaussian, and the mask is written on the case's own grid in
the convention's labels: the computation of
    main.py --exec_mode predict --sliding_window --save_nifti
V-Net: --input is an MSD image; it is resampled onto the network's grid with SimpleITK and the
mask resampled back onto the image's grid: the computation of
    main.py --model vnet --exec_mode predict --save_nifti
--tta adds the tool's --tta (the mean over the 8 mirrorings of the spatial axes). A UNet3D
exported with a postprocessing.json (metadata.json's "postprocessing") has its mask postprocessed
as the tool's predict does; --no_postprocessing leaves it out, as the tool's flag.

The modules imported from the tool (dataset/brats_nifti.py, dataset/msd.py,
dataset/window_layout.py, dataset/postprocessing.py) need NumPy, nibabel, SimpleITK and SciPy
alone.
"""
import argparse
import itertools
import json
import os
import sys

import numpy as np

from common.checksums import sha256
from common.errors import UserError
from common.output_files import replacing

METADATA = "metadata.json"
MIRRORS = tuple(axes for r in range(4) for axes in itertools.combinations((1, 2, 3), r))


def parse_args(argv):
    """The command line of segment.py."""
    parser = argparse.ArgumentParser(
        prog="segment.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Segment one case with a model exported by `main.py --exec_mode export`, on "
                    "ONNX Runtime (its CUDA provider when present, else the CPU).\n"
                    "UNet3D: a BraTS case folder, the computation of\n"
                    "    main.py --exec_mode predict --sliding_window --save_nifti\n"
                    "V-Net: an MSD image, the computation of\n"
                    "    main.py --model vnet --exec_mode predict --save_nifti\n"
                    "(with --tta, of the same command with --tta).")
    parser.add_argument("--model", required=True, metavar="EXPORT_DIR",
                        help="folder written by main.py --exec_mode export")
    parser.add_argument("--input", required=True, metavar="CASE",
                        help="UNet3D: a BraTS case folder; V-Net: an MSD image file")
    parser.add_argument("--output", required=True, metavar="MASK.nii.gz",
                        help="the mask to write (an existing file is not overwritten)")
    parser.add_argument("--tta", action="store_true",
                        help="average the probabilities of the 8 mirrorings of the spatial axes")
    parser.add_argument("--no_postprocessing", action="store_true",
                        help="leave out the postprocessing that metadata.json holds (UNet3D "
                             "exported with a postprocessing.json)")
    return parser.parse_args(argv)


def read_export(folder):
    """metadata.json of an export folder, after checking that every file it lists is there with
    its SHA-256; a UserError names the first file that is not."""
    path = os.path.join(folder, METADATA)
    try:
        with open(path) as handle:
            metadata = json.load(handle)
        files = metadata["files"]
        onnx_file = metadata["onnx"]["file"]
    except FileNotFoundError:
        raise UserError(f"{path}: missing; --model must be a folder written by main.py "
                        "--exec_mode export") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not an export's metadata ({type(err).__name__}: {err}); export "
                        "the model again") from None
    if onnx_file not in files:
        raise UserError(f"{path}: lists no {onnx_file}; export the model again")
    for name, digest in files.items():
        file_path = os.path.join(folder, name)
        if not os.path.isfile(file_path):
            raise UserError(f"{file_path}: missing from the export; export the model again")
        if sha256(file_path) != digest:
            raise UserError(f"{file_path}: its SHA-256 differs from metadata.json's (damaged or "
                            "changed); export the model again")
    return metadata


def postprocessing_of(metadata, folder):
    """The {region: operation} of metadata.json's postprocessing, or None without one; a UserError
    names metadata.json when they do not fit its labels."""
    from dataset.postprocessing import check_operations
    body = metadata.get("postprocessing")
    if not body:
        return None
    try:
        return check_operations(body["operations"], metadata["labels"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        reason = f"no {err} entry" if isinstance(err, KeyError) else str(err).splitlines()[0]
        raise UserError(f"{os.path.join(folder, METADATA)}: its postprocessing is not usable "
                        f"({reason}); export the model again") from None


def onnx_runner(path):
    """A function from a float32 batch to the model's probabilities, on ONNX Runtime's CUDA
    provider when it is available, else the CPU."""
    import onnxruntime as ort
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
    providers = [p for p in wanted if p in ort.get_available_providers()]
    try:
        session = ort.InferenceSession(path, providers=providers)
    except Exception as err:  # ONNX Runtime raises its own types for a bad model
        raise UserError(f"{path}: ONNX Runtime cannot load it ({str(err).splitlines()[0]})") from None
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: np.ascontiguousarray(x, np.float32)})[0]


def window_probabilities(run, x, tta):
    """`run(x)` as float32; with `tta`, the mean over the 8 mirrorings of the spatial axes (each
    prediction mirrored back), run as one batch, as runtime/loops/inference.py computes it."""
    if not tta:
        return run(x).astype(np.float32)
    n = x.shape[0]
    probs = run(np.concatenate([np.flip(x, axes) if axes else x for axes in MIRRORS]))
    total = np.float32(0.0)
    for i, axes in enumerate(MIRRORS):
        part = probs[i * n:(i + 1) * n]
        total = total + (np.flip(part, axes) if axes else part)
    return (total / np.float32(len(MIRRORS))).astype(np.float32)


def sliding_window(run, volume, window, settings, tta):
    """The blended probabilities (D, H, W, classes) of a (D, H, W, C) volume: windows laid out and
    weighted as dataset/window_layout.py does, run `settings['batch']` at a time."""
    from dataset.window_layout import gaussian_importance, importance_sum, window_grid
    shape = volume.shape[:3]
    padded_shape, starts = window_grid(shape, window, settings["overlap"])
    padded = np.pad(volume, [(0, p - s) for p, s in zip(padded_shape, shape)] + [(0, 0)])
    importance = gaussian_importance(window, settings["sigma_scale"])
    weight_sum = importance_sum(padded_shape, window, starts, importance)[:shape[0], :shape[1], :shape[2]]
    sums = None
    for first in range(0, len(starts), settings["batch"]):
        corners = starts[first:first + settings["batch"]]
        where = [tuple(slice(s, s + w) for s, w in zip(corner, window)) for corner in corners]
        probs = window_probabilities(run, np.stack([padded[w] for w in where]), tta)
        if sums is None:
            sums = np.zeros(padded_shape + probs.shape[-1:], np.float32)
        for j, w in enumerate(where):
            sums[w] += probs[j] * importance[..., None]
    return sums[:shape[0], :shape[1], :shape[2]] / weight_sum[..., None]


def case_channel_files(case_dir, channels):
    """The NIfTI file of each channel of a BraTS case folder, in metadata.json's order; a
    UserError names the folder when its files are not those channels."""
    if not os.path.isdir(case_dir):
        raise UserError(f"{case_dir}: not a case folder; this UNet3D takes a BraTS case folder "
                        f"with <case>_{{{','.join(channels)}}}.nii.gz")
    name = os.path.basename(os.path.normpath(case_dir))
    paths, missing = [], []
    for channel in channels:  # BraTS 2019-2021 name them <case>_<channel>, BraTS 2023+ <case>-<channel>
        found = [os.path.join(case_dir, f"{name}{sep}{channel}.nii.gz") for sep in "_-"]
        found = [path for path in found if os.path.isfile(path)]
        paths += found[:1]
        missing += [] if found else [f"{name}_{channel}.nii.gz"]
    if missing:
        raise UserError(f"{case_dir}: lacks {', '.join(missing)}; the model's channels are "
                        f"{', '.join(channels)} (metadata.json), one file <case>_<channel>.nii.gz "
                        "(or <case>-<channel>.nii.gz) each")
    return paths


def segment_unet3d(metadata, run, case_dir, output, tta, operations=None):
    """Read, normalize and segment a BraTS case folder; write the mask as NIfTI on its grid,
    postprocessed by `operations` ({region: operation}) when given."""
    import nibabel as nib

    from dataset.brats_nifti import convert_images, load_nifti
    from dataset.window_layout import sliding_window_shape
    prep = metadata["preprocessing"]
    paths = case_channel_files(case_dir, metadata["input"]["channels"])
    volume, mean, stdev = convert_images([(path, load_nifti(path)[0]) for path in paths],
                                         prep["clip_fraction"])
    x = volume.astype(np.float32)
    x = np.where(x > 0, (x - mean) / (stdev + np.float32(prep["zscore"]["epsilon"])), x)
    probs = sliding_window(run, x, sliding_window_shape(x.shape[:3]), metadata["sliding_window"], tta)
    classes = np.argmax(probs, axis=-1)
    labels = np.asarray(metadata["labels"]["labels"], np.uint8)[classes]
    if operations:
        from dataset.postprocessing import postprocess
        labels = postprocess(labels, operations, metadata["labels"])
    affine = nib.load(paths[0]).affine
    nib.save(nib.Nifti1Image(np.swapaxes(labels, 0, 1).copy(), affine), output)


def segment_vnet(metadata, run, image_path, output, tta):
    """Resample, normalize and segment an MSD image; write the mask resampled onto its grid."""
    import SimpleITK as sitk

    from dataset.msd import INTERPOLATORS, mask_to_source_grid, read_image, resample, to_array, zscore
    if not os.path.isfile(image_path):
        raise UserError(f"{image_path}: no such image file; this V-Net takes one MSD image")
    sampling = metadata["resampling"]
    image = read_image(image_path)
    array = to_array(resample(image, sampling["shape"], INTERPOLATORS[sampling["image_interpolator"]]))
    array = array.astype(np.float32)
    if metadata["preprocessing"]["zscore"]:
        array = zscore(array)
    probs = window_probabilities(run, array[None, ..., None], tta)
    mask = np.argmax(probs[0], axis=-1).astype(np.int8)
    sitk.WriteImage(mask_to_source_grid(mask, image_path), output)


def segment(model_dir, case, output, tta=False, postprocessing=True):
    """Segment `case` with the export in `model_dir` into `output` (see the module docstring);
    `postprocessing` False leaves out metadata.json's."""
    metadata = read_export(model_dir)
    operations = postprocessing_of(metadata, model_dir) if postprocessing else None
    if os.path.exists(output):
        raise UserError(f"{output}: already exists; choose another --output (nothing is overwritten)")
    run = onnx_runner(os.path.join(model_dir, metadata["onnx"]["file"]))
    folder = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise UserError(f"{output}: its folder cannot be made ({err.strerror}); choose another "
                        "--output") from None
    if metadata["network"]["model"] == "unet3d" and operations:
        from dataset.postprocessing import operations_text
        print(f"postprocessing of {os.path.join(model_dir, METADATA)}: "
              f"{operations_text(operations)}; --no_postprocessing leaves it out", flush=True)
    # Written under a temporary name and renamed when complete: a failed or interrupted run
    # leaves no partial mask under --output.
    with replacing(output, keep_extension=True) as partial:
        if metadata["network"]["model"] == "unet3d":
            segment_unet3d(metadata, run, case, partial, tta, operations)
        else:
            segment_vnet(metadata, run, case, partial, tta)


def main(argv=None):
    """Run segment.py; returns the exit code (1 with a one-line error on bad input)."""
    args = parse_args(argv)
    try:
        segment(args.model, args.input, args.output, args.tta, not args.no_postprocessing)
    except UserError as err:
        print(f"segment.py: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
