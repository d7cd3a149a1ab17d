"""--exec_mode export and segment.py: a trained UNet3D (conftest's, with a postprocessing.json) and
V-Net each exported once; the SavedModel and the ONNX model against the Keras model, segment.py
(with TensorFlow, Keras and JAX made unimportable) against main.py predict --save_nifti, both
postprocessed, and the one-line errors on bad input."""
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from tests.conftest import ROOT, assert_one_line_error, main_here, phantom_records

# One test worker runs this file and the other users of conftest's UNet3D run (pytest -n 2 --dist
# loadgroup), so that it is trained once.
pytestmark = pytest.mark.xdist_group("unet3d_run")

BLOCKER = '''import sys


class BlockHeavyImports:
    """Make tensorflow, keras, jax and jaxlib unimportable."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "jax", "jaxlib"):
            raise ImportError(f"{name} is blocked: segment.py must run without it")
        return None


sys.meta_path.insert(0, BlockHeavyImports())
'''


def export_and_predict(model_dir, root, predict_flags):
    """Export model_dir's newest checkpoint into root/export and predict with --save_nifti (fp32)
    into root/predicted, in this process; returns (export_dir, the folder of the NIfTI masks)."""
    from main import main
    export_dir, predicted = os.path.join(root, "export"), os.path.join(root, "predicted")
    assert main(["--exec_mode", "export", "--model_dir", model_dir, "--export_dir", export_dir]) == 0
    assert main(predict_flags + ["--model_dir", model_dir, "--log_dir", os.path.join(root, "logs"),
                                 "--output_dir", predicted, "--exec_mode", "predict", "--save_nifti",
                                 "--dtype", "fp32"]) == 0
    return export_dir, os.path.join(predicted, "nifti")


# Removes the 4-step network's specks (it predicts a hundred), keeps one core, and leaves the
# enhancing tumour only in components of 20 voxels or more.
POSTPROCESSING = {"WT": {"op": "remove_small", "voxels": 10}, "TC": {"op": "keep_largest"},
                  "ET": {"op": "remove_small", "voxels": 20}}


@pytest.fixture(scope="module")
def unet(unet3d_run, tmp_path_factory):
    """conftest's UNet3D run (4 steps), its folder copied (linked) with a postprocessing.json,
    exported, and its sliding-window prediction of the validation case of three 40×40×36 phantom
    cases (a grid that is no multiple of the window), postprocessed, with its probabilities."""
    from dataset.postprocessing import write_postprocessing
    root = str(tmp_path_factory.mktemp("unet"))
    records = phantom_records(root, 3, (40, 40, 36), seed=5)
    model_dir = os.path.join(root, "model")
    shutil.copytree(str(unet3d_run / "model"), model_dir, copy_function=os.link)
    write_postprocessing(os.path.join(model_dir, "postprocessing.json"),
                         {"operations": POSTPROCESSING, "criterion": ["dice", "lesion_f1"]})
    export_dir, masks = export_and_predict(model_dir, root, ["--data_dir", records, "--sliding_window",
                                                             "--save_probabilities"])
    (mask,) = os.listdir(masks)
    case = os.path.join(root, "nifti", mask[:-len(".nii.gz")])
    return {"model_dir": model_dir, "export": export_dir, "case": case, "mask": os.path.join(masks, mask),
            "probabilities": os.path.join(root, "predicted", "vol_0.npz")}


@pytest.fixture(scope="module")
def vnet(tmp_path_factory):
    """A V-Net of one convolution a block (its three levels and batch normalization kept)
    trained two steps on four rotated, anisotropic phantom hippocampus images, exported, and its
    --tta prediction of the test image."""
    from dataset.phantom.msd import write_msd_phantom
    from main import main
    root = str(tmp_path_factory.mktemp("vnet"))
    c, s = np.cos(0.4), np.sin(0.4)
    task = write_msd_phantom(os.path.join(root, "task"), 4, 1, seed=1, spacing=(0.8, 1.3, 2.1),
                             direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    data = ["--model", "vnet", "--data_dir", task]
    model_dir = os.path.join(root, "model")
    assert main(data + ["--batch_size", "2", "--input_shape", "32", "32", "16", "--downscale_blocks", "1",
                        "1", "1", "--upscale_blocks", "1", "1", "--model_dir", model_dir, "--log_dir",
                        os.path.join(root, "logs"), "--exec_mode", "train", "--dtype", "fp32",
                        "--seed", "0"]) == 0
    export_dir, masks = export_and_predict(model_dir, root, data + ["--tta"])
    image = os.path.join(task, "imagesTs", "hippocampus_004.nii.gz")
    return {"model_dir": model_dir, "export": export_dir, "image": image,
            "mask": os.path.join(masks, "hippocampus_004.nii.gz")}


def keras_model(model_dir):
    """The Keras model of model_dir's newest checkpoint, built from its settings.json."""
    from runtime import run_record
    from runtime.settings import DataSettings, NETWORK_SECTIONS
    from runtime.loops import checkpoint
    from runtime.run import ClassCount
    from runtime.tasks.base import make_task
    network = run_record.read(model_dir)["network"]
    section = NETWORK_SECTIONS[network["model"]]
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in network.items()
              if k in section.NETWORK_FIELDS}
    model = make_task(network["model"], section(**fields), DataSettings()).model(
        ClassCount(network["n_classes"]))
    checkpoint.restore(checkpoint.latest_checkpoint(model_dir)[1], model)
    return model


@pytest.mark.parametrize("network, shape", [("unet", (2, 32, 32, 64, 4)), ("vnet", (3, 32, 32, 16, 1))])
def test_saved_model_and_onnx_match_keras(network, shape, request):
    import onnxruntime as ort
    import tensorflow as tf
    run = request.getfixturevalue(network)
    with open(os.path.join(run["export"], "metadata.json")) as handle:
        metadata = json.load(handle)
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    expected = np.asarray(keras_model(run["model_dir"])(x))
    serving = tf.saved_model.load(os.path.join(run["export"], "saved_model")).signatures["serving_default"]
    saved = serving(image=tf.constant(x))["probabilities"].numpy()
    session = ort.InferenceSession(os.path.join(run["export"], "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    onnx = session.run(None, {metadata["onnx"]["input"]: x})[0]
    assert expected.shape == shape[:4] + (metadata["network"]["n_classes"],)
    np.testing.assert_allclose(saved, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(onnx, expected, atol=1e-4, rtol=0)
    assert len(session.get_inputs()[0].shape) == 5 and not isinstance(session.get_inputs()[0].shape[0], int)


def test_metadata(unet, vnet):
    from common.checksums import sha256
    with open(os.path.join(unet["export"], "metadata.json")) as handle:
        meta = json.load(handle)
    assert meta["input"]["channels"] == ["t1", "t1ce", "t2", "flair"]
    assert meta["labels"]["labels"] == [0, 1, 2, 4] and meta["labels"]["name"] == "brats2021"
    assert meta["preprocessing"]["clip_fraction"] == 0.85
    assert {k: meta["sliding_window"][k] for k in ("overlap", "sigma_scale", "min_importance")} == \
        {"overlap": 0.5, "sigma_scale": 0.125, "min_importance": 1e-3}
    assert meta["onnx"]["opset"] == 17 and meta["trained"]["step"] == 4
    assert meta["postprocessing"]["operations"] == POSTPROCESSING  # the model_dir's file
    assert "model.onnx" in meta["files"] and "saved_model/saved_model.pb" in meta["files"]
    for name, digest in meta["files"].items():
        assert sha256(os.path.join(unet["export"], name)) == digest
    with open(os.path.join(vnet["export"], "metadata.json")) as handle:
        meta = json.load(handle)
    assert meta["resampling"]["shape"] == [32, 32, 16] and meta["input"]["shape"] == [None, 32, 32, 16, 1]
    assert meta["labels"]["labels"] == [0, 1, 2] and "sliding_window" not in meta
    assert "postprocessing" not in meta  # no postprocessing.json: none


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory):
    """An environment whose Python cannot import tensorflow, keras or jax."""
    folder = tmp_path_factory.mktemp("blocker")
    (folder / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=str(folder))
    blocked = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env,
                             capture_output=True, text=True)
    assert blocked.returncode != 0 and "is blocked" in blocked.stderr
    return env


def segment(env, *argv):
    """segment.py with `argv` in a subprocess; the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "segment.py"), *argv], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_segment_reproduces_unet3d_predict(unet, blocked_env, tmp_path):
    """segment.py, predict's masks and its --save_nifti files are the same postprocessed masks."""
    from dataset.conventions import CONVENTIONS
    from dataset.postprocessing import postprocess
    from segment import segment as segment_here
    out = str(tmp_path / "mask.nii.gz")
    result = segment(blocked_env, "--model", unet["export"], "--input", unet["case"], "--output", out)
    assert result.returncode == 0, result.stderr
    assert "postprocessing of " + os.path.join(unet["export"], "metadata.json") in result.stdout
    ours, tools = nib.load(out), nib.load(unet["mask"])
    assert ours.shape == tools.shape == (40, 40, 36)
    np.testing.assert_array_equal(ours.affine, tools.affine)
    same = np.mean(np.asarray(ours.dataobj) == np.asarray(tools.dataobj))
    assert same >= 0.999, same
    assert set(np.unique(np.asarray(ours.dataobj))) <= {0, 1, 2, 4}
    # The tool postprocessed its mask, .npy and NIfTI alike: the argmax of its probabilities (saved
    # in float16) differs from it, and postprocessed gives it.
    brats2021 = CONVENTIONS["brats2021"]
    raw = np.load(unet["probabilities"])["probabilities"].argmax(-1)
    mask = np.load(unet["probabilities"].replace(".npz", ".npy"))
    np.testing.assert_array_equal(np.swapaxes(brats2021.to_source(mask), 0, 1), tools.dataobj)
    assert np.mean(postprocess(raw, POSTPROCESSING, brats2021, in_classes=True) == mask) >= 0.999
    assert np.mean(raw != mask) > 0.005
    # segment.py --no_postprocessing leaves it out: the raw argmax (here in this process).
    segment_here(unet["export"], unet["case"], str(tmp_path / "raw.nii.gz"), postprocessing=False)
    raw_ours = np.asarray(nib.load(str(tmp_path / "raw.nii.gz")).dataobj)
    assert np.mean(raw_ours == np.swapaxes(brats2021.to_source(raw), 0, 1)) >= 0.999


def test_segment_reproduces_vnet_predict_with_tta(vnet, blocked_env, tmp_path):
    out = str(tmp_path / "mask.nii.gz")
    result = segment(blocked_env, "--model", vnet["export"], "--input", vnet["image"], "--output", out,
                     "--tta")
    assert result.returncode == 0, result.stderr
    ours, tools, source = (sitk.ReadImage(p) for p in (out, vnet["mask"], vnet["image"]))
    assert ours.GetSize() == source.GetSize()
    np.testing.assert_allclose(ours.GetDirection(), source.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(ours.GetSpacing(), source.GetSpacing(), atol=1e-6)
    a, b = sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(tools)
    assert np.mean(a == b) >= 0.999 and len(np.unique(b)) > 1


def copy_export(export, target, leave_out=()):
    """A copy of an export folder without the files `leave_out` (relative paths)."""
    shutil.copytree(export, target)
    for name in leave_out:
        os.remove(os.path.join(target, name))
    return str(target)


def test_bad_export(vnet, tmp_path):
    out = str(tmp_path / "mask.nii.gz")
    missing = copy_export(vnet["export"], tmp_path / "missing", ["saved_model/variables/variables.index"])
    assert_one_line_error(segment(None, "--model", missing, "--input", vnet["image"], "--output", out),
                          os.path.join(missing, "saved_model/variables/variables.index") + ": missing")
    changed = copy_export(vnet["export"], tmp_path / "changed")
    with open(os.path.join(changed, "model.onnx"), "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 1]))
    result = segment(None, "--model", changed, "--input", vnet["image"], "--output", out)
    assert_one_line_error(result, os.path.join(changed, "model.onnx") + ": its SHA-256 differs")
    result = segment(None, "--model", str(tmp_path), "--input", vnet["image"], "--output", out)
    assert_one_line_error(result, os.path.join(str(tmp_path), "metadata.json") + ": missing")
    lacking = copy_export(vnet["export"], tmp_path / "lacking")  # MSD hippocampus: no regions
    with open(os.path.join(lacking, "metadata.json")) as handle:
        meta = json.load(handle)
    meta["postprocessing"] = {"operations": {"WT": {"op": "keep_largest"}}}
    with open(os.path.join(lacking, "metadata.json"), "w") as handle:
        json.dump(meta, handle)
    result = segment(None, "--model", lacking, "--input", vnet["image"], "--output", out)
    assert_one_line_error(result, os.path.join(lacking, "metadata.json") + ": its postprocessing "
                          "is not usable (names region 'WT', which the msd convention lacks")
    assert not os.path.exists(out)


def test_bad_case(unet, vnet, tmp_path):
    out = str(tmp_path / "mask.nii.gz")
    name = os.path.basename(unet["case"])
    three = tmp_path / "three" / name
    os.makedirs(three)
    for channel in ("t1", "t1ce", "t2"):
        shutil.copy(os.path.join(unet["case"], f"{name}_{channel}.nii.gz"), three)
    result = segment(None, "--model", unet["export"], "--input", str(three), "--output", out)
    assert_one_line_error(result, f"{three}: lacks {name}_flair.nii.gz")

    broken = tmp_path / "broken" / name
    shutil.copytree(unet["case"], broken)
    (broken / f"{name}_t2.nii.gz").write_bytes(b"not a NIfTI file")
    result = segment(None, "--model", unet["export"], "--input", str(broken), "--output", out)
    assert_one_line_error(result, f"{broken / f'{name}_t2.nii.gz'}: unreadable NIfTI")

    image = tmp_path / "image.nii.gz"
    image.write_bytes(b"\x1f\x8b garbage")
    result = segment(None, "--model", vnet["export"], "--input", str(image), "--output", out)
    assert_one_line_error(result, f"{image}: unreadable image")
    assert not os.path.exists(out)

    shutil.copy(vnet["mask"], out)
    before = open(out, "rb").read()
    result = segment(None, "--model", vnet["export"], "--input", vnet["image"], "--output", out)
    assert_one_line_error(result, f"{out}: already exists")
    assert open(out, "rb").read() == before


def test_export_flag_errors(unet, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    result = main_here(capsys, "--exec_mode", "export", "--model_dir", unet["model_dir"],
                       "--export_dir", str(tmp_path / "full"))
    assert_one_line_error(result, "--export_dir")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert_one_line_error(main_here(capsys, "--exec_mode", "export", "--model_dir", unet["model_dir"]),
                          "--export_dir")
    result = main_here(capsys, "--exec_mode", "export", "--model_dir", str(tmp_path / "untrained"),
                       "--export_dir", str(tmp_path / "out"))
    assert_one_line_error(result, "no checkpoint to export")
    assert not (tmp_path / "out").exists()
    # A postprocessing.json the convention does not fit stops the export, naming the file.
    model_dir = str(tmp_path / "model")
    shutil.copytree(unet["model_dir"], model_dir, copy_function=os.link)
    os.remove(os.path.join(model_dir, "postprocessing.json"))  # a link: the fixture's stays
    with open(os.path.join(model_dir, "postprocessing.json"), "w") as handle:
        json.dump({"operations": {"RC": {"op": "keep_largest"}}}, handle)
    result = main_here(capsys, "--exec_mode", "export", "--model_dir", model_dir, "--export_dir",
                       str(tmp_path / "out"))
    assert_one_line_error(result, os.path.join(model_dir, "postprocessing.json") + ": not a usable "
                          "postprocessing file (names region 'RC', which the brats2021 convention")
    assert not (tmp_path / "out").exists()
