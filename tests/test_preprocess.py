"""dataset/preprocess_data.py against the reference's conversion, read back with plain tf.train.Example parsing."""
import gzip
import os

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from dataset.preprocess_data import main as preprocess_main, preprocess
from common.errors import UserError
from tests.brats_files import AFFINE, expected_record, write_case
from tests.conftest import main_here


def read_examples(path):
    out = []
    for raw in tf.data.TFRecordDataset(path):
        example = tf.train.Example.FromString(raw.numpy())
        f = example.features.feature
        shape = tuple(f["shape"].int64_list.value)
        out.append({
            "case": f["case"].bytes_list.value[0].decode(),
            "X": np.frombuffer(f["X"].bytes_list.value[0], np.uint8).reshape(shape + (4,)),
            "Y": np.frombuffer(f["Y"].bytes_list.value[0], np.uint8).reshape(shape),
            "mean": np.float32(f["mean"].float_list.value),
            "stdev": np.float32(f["stdev"].float_list.value),
            "affine": np.float32(f["affine"].float_list.value).reshape(4, 4),
        })
    return out


@pytest.fixture(scope="module")
def brats_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats")
    arrays = {}
    for i in range(6):
        group = "HGG" if i < 4 else "LGG"
        arrays[f"Case_{i}"] = write_case(str(root / group), f"Case_{i}", seed=i)
    return root, arrays


def test_records_match_the_spec(brats_input, tmp_path):
    root, arrays = brats_input
    files = preprocess(str(root), str(tmp_path / "out"), vol_per_file=4, seed=3, workers=2)
    assert [os.path.basename(f) for f in files] == ["volume-0.tfrecord", "volume-1.tfrecord"]
    examples = [e for f in files for e in read_examples(f)]
    assert [len(read_examples(f)) for f in files] == [4, 2]  # packing and the remainder file
    assert sorted(e["case"] for e in examples) == sorted(arrays)
    for e in examples:
        x, y, mean, stdev = expected_record(arrays[e["case"]])
        assert e["X"].shape == (36, 40, 33, 4)  # axes 0 and 1 swapped
        np.testing.assert_array_equal(e["X"], x)
        np.testing.assert_array_equal(e["Y"], y)
        assert set(np.unique(e["Y"])) <= {0, 1, 2, 3}
        np.testing.assert_array_equal(e["mean"], mean)
        np.testing.assert_array_equal(e["stdev"], stdev)
        assert e["X"].max() == 255
        np.testing.assert_array_equal(e["affine"], AFFINE)


def test_clip_and_scale_on_hand_made_values(tmp_path):
    arrays = write_case(str(tmp_path / "in"), "Hand", seed=9)
    t1 = np.zeros_like(arrays["t1"])
    t1[0, 0, 0], t1[1, 0, 0], t1[2, 0, 0], t1[3, 0, 0] = 1000, 900, 425, 10
    nib.save(nib.Nifti1Image(t1, AFFINE), str(tmp_path / "in" / "Hand" / "Hand_t1.nii.gz"))
    files = preprocess(str(tmp_path / "in"), str(tmp_path / "out"), single_data_dir=True, workers=1)
    x = read_examples(files[0])[0]["X"][..., 0]
    # max 1000 -> clipped at 850; 1000 and 900 become 255, 425 -> 127.5 -> 127, 10 -> 3.
    assert [x[0, 0, 0], x[0, 1, 0], x[0, 2, 0], x[0, 3, 0]] == [255, 255, 127, 3]


def test_seed_fixes_the_case_order(brats_input, tmp_path):
    root, _ = brats_input

    def order(out, seed):
        files = preprocess(str(root), str(tmp_path / out), seed=seed, workers=1)
        return [e["case"] for f in files for e in read_examples(f)]

    first = order("a", 5)
    assert order("b", 5) == first
    assert order("c", 6) != first


def run_cli(capsys, *argv):
    """dataset/preprocess_data.py's main() with `argv`, in this process: exit code and output."""
    return main_here(capsys, *argv, main=preprocess_main)


def assert_one_line_error(result, name):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert name in errors[0]


def test_command_line_runs(brats_input, tmp_path, capsys):
    root, _ = brats_input
    result = run_cli(capsys, "-i", str(root), "-o", str(tmp_path / "out"), "--vol_per_file", "5", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["records.json", "volume-0.tfrecord",
                                                    "volume-1.tfrecord"]


def broken_input(tmp_path, how):
    root = tmp_path / "in"
    write_case(str(root), "Good", seed=1)
    arrays = write_case(str(root), "Bad", seed=2)
    path = root / "Bad" / "Bad_t2.nii.gz"
    if how == "missing":
        os.remove(path)
    elif how == "shape":
        nib.save(nib.Nifti1Image(arrays["t2"][:, :, :20], np.eye(4)), str(path))
    elif how == "labels":
        path = root / "Bad" / "Bad_seg.nii.gz"
        seg = arrays["seg"].copy()
        seg[0, 0, 0] = 3
        nib.save(nib.Nifti1Image(seg, AFFINE), str(path))
    elif how == "empty":
        nib.save(nib.Nifti1Image(np.zeros_like(arrays["t2"]), np.eye(4)), str(path))
    elif how == "unreadable":
        path.write_bytes(gzip.compress(b"not a nifti file"))
    return root, path


@pytest.mark.parametrize("how", ["missing", "shape", "labels", "empty", "unreadable"])
def test_bad_cases_give_one_line_errors_and_no_output(tmp_path, how, capsys):
    root, path = broken_input(tmp_path, how)
    out = tmp_path / "out"
    result = run_cli(capsys, "-i", str(root), "-o", str(out), "--single_data_dir", "--vol_per_file", "1")
    assert_one_line_error(result, str(path))
    assert not out.exists() or os.listdir(out) == []  # nothing partial left behind


def test_output_folder_with_records_is_refused(brats_input, tmp_path, capsys):
    root, _ = brats_input
    out = tmp_path / "out"
    out.mkdir()
    (out / "volume-0.tfrecord").write_bytes(b"mine")
    result = run_cli(capsys, "-i", str(root), "-o", str(out))
    assert_one_line_error(result, str(out))
    assert (out / "volume-0.tfrecord").read_bytes() == b"mine"


def test_missing_groups_suggest_single_data_dir(tmp_path):
    write_case(str(tmp_path / "in"), "Only", seed=1)
    with pytest.raises(UserError, match="--single_data_dir"):
        preprocess(str(tmp_path / "in"), str(tmp_path / "out"))
