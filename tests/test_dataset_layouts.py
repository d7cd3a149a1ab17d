"""The dataset layouts end to end: the phantom written as BraTS 2019–2021, BraTS 2023+ (glioma with
cavities, meningioma RT; paediatric preprocessed only) and MSD Task01 preprocesses, trains and
predicts, and its masks come back in the layout's own label values on the source grid (the
glioma's run also chooses its postprocessing and predicts with it); bad input of each kind is one
line naming the file."""
import json
import os

import nibabel as nib
import numpy as np
import pytest

from common.errors import UserError
from dataset.conventions import CONVENTIONS
from dataset.phantom.brats import write_brats_phantom
from dataset.preprocess_data import main as preprocess_main
from dataset.preprocess_data import preprocess
from tests.conftest import main_here

# An oblique-free but non-trivial grid: flipped axes, 1.5 mm slices, an offset origin.
AFFINE = np.array([[-1.0, 0, 0, 30], [0, -1.0, 0, 20], [0, 0, 1.5, -10], [0, 0, 0, 1]])
SHAPE = (32, 36, 32)
# (layout, sub-challenge, resection cavities) -> (convention, input channels, metric names)
LAYOUTS = {
    ("brats2021", "GLI", False): ("brats2021", 4, {"TumorCore", "PeritumoralEdema",
                                                   "EnhancingTumor", "MeanDice", "WholeTumor"}),
    ("brats2023", "GLI", True): ("brats-gli-post", 4, {"NETC", "SNFH", "ET", "RC", "MeanDice",
                                                       "WholeTumor"}),
    ("brats2023", "PED", False): ("brats-ped", 4, {"ET", "NETC", "CC", "ED", "MeanDice",
                                                   "WholeTumor"}),
    ("brats2023", "MEN-RT", False): ("brats-men-rt", 1, {"GTV", "MeanDice", "WholeTumor"}),
    ("msd-brain", "GLI", False): ("msd-brain", 4, {"edema", "non-enhancing tumor",
                                                   "enhancing tumour", "MeanDice", "WholeTumor"}),
}


def source_files(nifti_dir, layout, case):
    """(image path, seg path) of `case` as the phantom wrote it."""
    if layout == "msd-brain":
        return (os.path.join(nifti_dir, "imagesTr", f"{case}.nii.gz"),
                os.path.join(nifti_dir, "labelsTr", f"{case}.nii.gz"))
    folder = os.path.join(nifti_dir, case)
    files = sorted(os.listdir(folder))
    seg = next(f for f in files if f.endswith(("seg.nii.gz", "gtv.nii.gz")))
    image = next(f for f in files if f != seg)
    return os.path.join(folder, image), os.path.join(folder, seg)


TRAINED = [key for key in LAYOUTS if key[1] != "PED"]  # PED: one more 5-class set, not trained
IDS = ["-".join(map(str, key[:2])) for key in LAYOUTS]


@pytest.fixture(scope="module")
def written(request, tmp_path_factory):
    """Three phantom cases of one layout (the param), preprocessed (one per file) into records."""
    layout, challenge, cavity = request.param
    root = tmp_path_factory.mktemp(f"{layout}-{challenge}")
    nifti, records = str(root / "nifti"), str(root / "records")
    write_brats_phantom(nifti, 3, shape=SHAPE, seed=7, layout=layout, challenge=challenge,
                        cavity=cavity, affine=AFFINE)
    preprocess(nifti, records, vol_per_file=1, single_data_dir=layout == "brats2021", seed=0,
               workers=1)
    return request.param, root, nifti, records


@pytest.mark.parametrize("written", TRAINED, indirect=True, ids=[i for k, i in zip(LAYOUTS, IDS)
                                                                   if k in TRAINED])
def test_each_layout_preprocesses_trains_and_predicts(written, capsys):
    key, root, nifti, records = written
    layout, _, _ = key
    convention_name, channels, _ = LAYOUTS[key]
    convention = CONVENTIONS[convention_name]
    with open(os.path.join(records, "records.json")) as handle:
        info = json.load(handle)
    assert info["layout"] == layout and info["convention"] == convention.as_dict()
    assert len(info["channels"]) == channels

    model_dir, log_dir = str(root / "model"), str(root / "logs")
    common = ["--data_dir", records, "--model_dir", model_dir, "--log_dir", log_dir, "-d", "fp32",
              "--batch_size", "1", "--num_folds", "3", "--seed", "1"]
    result = main_here(capsys, *common, "--exec_mode", "train_and_predict", "--max_steps", "1",
                       "--save_nifti")
    assert result.returncode == 0, result.stderr
    with open(os.path.join(model_dir, "settings.json")) as handle:
        network = json.load(handle)["network"]
    assert (network["convention"], network["in_channels"], network["n_classes"]) == \
        (convention_name, channels, convention.n_classes)
    (written_mask,) = os.listdir(os.path.join(model_dir, "nifti"))  # fold 0 of 3 files: one case
    case = written_mask[:-len(".nii.gz")]
    image_path, seg_path = source_files(nifti, layout, case)
    mask, source = nib.load(os.path.join(model_dir, "nifti", written_mask)), nib.load(seg_path)
    assert mask.shape == source.shape == nib.load(image_path).shape[:3]
    np.testing.assert_array_equal(mask.affine, source.affine)
    np.testing.assert_array_equal(mask.affine, AFFINE)
    assert set(np.unique(np.asarray(mask.dataobj))) <= set(convention.labels)

    if convention_name == "brats-gli-post":  # multi-lesion glioma, the 1-step network's specks
        check_postprocessing_end_to_end(capsys, common, root, convention, case)

    if convention_name == "brats-men-rt":  # records of another convention do not fit the network
        other = str(root / "described_as_brats2021")
        os.makedirs(other)
        for name in os.listdir(records):  # the same records without records.json: brats2021
            if name.endswith(".tfrecord"):
                os.link(os.path.join(records, name), os.path.join(other, name))
        result = main_here(capsys, *common[2:], "--data_dir", other, "--exec_mode", "evaluate")
        err = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(err) == 1, err
        assert "argument --data_dir" in err[0] and "convention brats2021" in err[0]
        assert "convention brats-men-rt" in err[0]


def criterion_mean(path):
    """The default criterion of --choose_postprocessing from a metrics.csv: the mean over every
    region and case of the mean of dice and lesion_f1."""
    import csv
    rows = list(csv.DictReader(open(path)))
    return np.mean([(float(row["dice"]) + float(row["lesion_f1"])) / 2 for row in rows])


def check_postprocessing_end_to_end(capsys, common, root, convention, case):
    """On a trained model_dir of BraTS 2023 phantom cases: --choose_postprocessing writes
    postprocessing.json (chosen on the validation case, the criterion after not below before,
    metrics.csv after and metrics_raw.csv before); predict applies it, saying so in one line, to
    its masks and --save_nifti files; the pooled choice of runtime/pool_postprocessing.py on the
    cases it kept is the same."""
    from dataset.postprocessing import operations_text, postprocess
    from runtime.pool_postprocessing import main as pool_main
    model_dir, evaluated, predicted = str(root / "model"), root / "evaluated", root / "predicted"
    result = main_here(capsys, *common, "--exec_mode", "evaluate", "--sliding_window",
                       "--challenge_metrics", "--choose_postprocessing", "--save_png",
                       "--output_dir", str(evaluated))
    assert result.returncode == 0, result.stderr
    with open(os.path.join(model_dir, "postprocessing.json")) as handle:
        chosen = json.load(handle)
    assert chosen["validation_cases"] == [case] and chosen["model_dirs"] == [model_dir]
    assert chosen["criterion"] == ["dice", "lesion_f1"] and chosen["convention"] == convention.name
    assert set(chosen["operations"]) == {"ET", "TC", "WT", "RC"}
    assert any(op["op"] != "none" for op in chosen["operations"].values()), chosen["operations"]
    assert chosen["score_after"] >= chosen["score_before"]
    assert criterion_mean(evaluated / "metrics.csv") == pytest.approx(chosen["score_after"])
    assert criterion_mean(evaluated / "metrics_raw.csv") == pytest.approx(chosen["score_before"])
    assert "postprocessing candidates on 1 validation case" in result.stdout
    assert os.listdir(evaluated / "png") == [f"{case}.png"]

    result = main_here(capsys, *common, "--exec_mode", "predict", "--sliding_window", "--save_nifti",
                       "--save_probabilities", "--output_dir", str(predicted))
    assert result.returncode == 0, result.stderr
    applied = [line for line in result.stdout.splitlines() if "postprocessing" in line]
    assert applied == [f"postprocessing of {model_dir}/postprocessing.json: "
                       f"{operations_text(chosen['operations'])}; --no_postprocessing leaves it out"]
    raw = np.load(predicted / "vol_0.npz")["probabilities"].argmax(-1)
    mask = np.load(predicted / "vol_0.npy")
    expected = postprocess(raw, chosen["operations"], convention, in_classes=True)
    assert np.mean(expected == mask) >= 0.999 and np.mean(raw != mask) > 0.001
    nifti = np.asarray(nib.load(str(predicted / "nifti" / f"{case}.nii.gz")).dataobj)
    np.testing.assert_array_equal(nifti, np.swapaxes(convention.to_source(mask), 0, 1))

    assert pool_main([model_dir]) == 0  # the one fold's kept case: the same choice
    with open(os.path.join(model_dir, "postprocessing.json")) as handle:
        assert json.load(handle)["candidates"] == chosen["candidates"]
    capsys.readouterr()
    assert pool_main([model_dir, model_dir]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"postprocessing_cases.npz: case {case} is a validation case" in err[0]


@pytest.mark.parametrize("key", list(LAYOUTS), ids=IDS)
def test_evaluation_names_the_conventions_classes(key):
    """brats2021 keeps the reference's names; the others report their convention's."""
    from runtime.tasks.unet3d import UNet3DTask
    from runtime.settings import UNet3DSettings, DataSettings
    convention = CONVENTIONS[LAYOUTS[key][0]]
    net = UNet3DSettings(convention=convention.name, n_classes=convention.n_classes)
    _, metrics = UNet3DTask(net, DataSettings(), None).loss_and_metrics(None)
    y = np.eye(convention.n_classes, dtype=np.float32)[np.arange(8) % convention.n_classes]
    scores = metrics(y.reshape(1, 2, 2, 2, -1), y.reshape(1, 2, 2, 2, -1))
    assert set(scores) == LAYOUTS[key][2]
    assert all(float(np.asarray(v)[0]) == pytest.approx(1.0, abs=1e-4) for v in scores.values())


@pytest.mark.parametrize("written", list(LAYOUTS), indirect=True, ids=IDS)
def test_the_mask_writer_gives_back_each_layouts_own_labels_on_its_grid(written, tmp_path):
    """The record's classes written as predict writes masks are the source mask, value for value."""
    import tensorflow as tf

    from dataset.record_info import read_info
    from dataset.records import decode_example, decode_metadata
    from runtime.tasks.masks import brats_nifti_writer
    key, _, nifti, records = written
    info = read_info(records)
    for name in sorted(os.listdir(records)):
        if not name.endswith(".tfrecord"):
            continue
        for serialized in tf.data.TFRecordDataset(os.path.join(records, name)):
            meta = decode_metadata(serialized)
            x, y, _, _ = decode_example(serialized, None, info.n_channels)
            assert x.shape[-1] == LAYOUTS[key][1]
            brats_nifti_writer(str(tmp_path), [meta], info.convention)(0, y.numpy())
            _, seg_path = source_files(nifti, key[0], meta["case"])
            written, source = nib.load(str(tmp_path / f"{meta['case']}.nii.gz")), nib.load(seg_path)
            np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(source.dataobj))
            np.testing.assert_array_equal(written.affine, source.affine)


def test_post_treatment_labels_only_when_a_mask_holds_a_cavity(tmp_path):
    for challenge, cavity, expected in (("MET", False, "brats-gli"), ("MET", True, "brats-gli-post"),
                                        ("SSA", False, "brats-gli"), ("MEN", False, "brats-gli")):
        nifti, records = str(tmp_path / f"{challenge}{cavity}"), str(tmp_path / f"r{challenge}{cavity}")
        write_brats_phantom(nifti, 2, shape=(32, 32, 32), seed=3, layout="brats2023",
                            challenge=challenge, cavity=cavity)
        preprocess(nifti, records, workers=1, seed=0)
        with open(os.path.join(records, "records.json")) as handle:
            assert json.load(handle)["convention"]["name"] == expected


# ---- bad input --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_case(tmp_path_factory):
    """One 32³ phantom case in each layout, to be copied and spoiled."""
    root = tmp_path_factory.mktemp("one")
    for layout, challenge in (("brats2021", "GLI"), ("brats2023", "MEN"), ("brats2023", "MEN-RT"),
                              ("msd-brain", "GLI")):
        write_brats_phantom(str(root / f"{layout}-{challenge}"), 1, shape=(32, 32, 32), seed=2,
                            layout=layout, challenge=challenge, affine=AFFINE)
    return root


def spoiled(one_case, tmp_path, name):
    """A copy of the one-case dataset `name` to spoil."""
    import shutil
    target = tmp_path / name
    shutil.copytree(one_case / name, target)
    return target


def preprocess_error(capsys, tmp_path, input_dir, *extra):
    """The stderr line of dataset/preprocess_data.py on `input_dir` (it must fail with one line)."""
    capsys.readouterr()
    code = preprocess_main(["-i", str(input_dir), "-o", str(tmp_path / "out"), "--workers", "1",
                            *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1, lines
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")
    return lines[0]


def test_a_case_mixing_layouts(one_case, tmp_path, capsys):
    data = spoiled(one_case, tmp_path, "brats2021-GLI")
    case = data / "Phantom_000"
    os.link(case / "Phantom_000_t2.nii.gz", case / "Phantom_000-t2w.nii.gz")
    line = preprocess_error(capsys, tmp_path, data, "--single_data_dir")
    assert str(case / "Phantom_000-t2w.nii.gz") in line and "mixes layouts" in line


def test_a_dataset_mixing_layouts(one_case, tmp_path, capsys):
    data = spoiled(one_case, tmp_path, "brats2023-MEN")
    import shutil
    shutil.copytree(one_case / "brats2021-GLI" / "Phantom_000", data / "Phantom_000")
    line = preprocess_error(capsys, tmp_path, data, "--single_data_dir")
    assert str(data / "Phantom_000" / "Phantom_000_t1.nii.gz") in line
    assert "BraTS 2019-2021 file in a BraTS 2023+ dataset" in line


@pytest.mark.parametrize("name, removed, expected", [
    ("brats2023-MEN", "BraTS-MEN-00000-000-t2w.nii.gz", "BraTS-MEN-00000-000-t1n.nii.gz, "
     "BraTS-MEN-00000-000-t1c.nii.gz, BraTS-MEN-00000-000-t2w.nii.gz, BraTS-MEN-00000-000-t2f.nii.gz, "
     "BraTS-MEN-00000-000-seg.nii.gz"),
    ("brats2021-GLI", "Phantom_000_flair.nii.gz", "Phantom_000_t1.nii.gz, Phantom_000_t1ce.nii.gz, "
     "Phantom_000_t2.nii.gz, Phantom_000_flair.nii.gz, Phantom_000_seg.nii.gz"),
    ("brats2023-MEN-RT", "BraTS-MEN-RT-0000-1_gtv.nii.gz", "BraTS-MEN-RT-0000-1_t1c.nii.gz and "
     "BraTS-MEN-RT-0000-1_gtv.nii.gz"),
], ids=["brats2023", "brats2021", "men-rt"])
def test_a_missing_modality_names_the_expected_files(one_case, tmp_path, capsys, name, removed,
                                                     expected):
    data = spoiled(one_case, tmp_path, name)
    case = next(p for p in data.iterdir() if p.is_dir())
    os.remove(case / removed)
    line = preprocess_error(capsys, tmp_path, data, *(["--single_data_dir"] * (name == "brats2021-GLI")))
    assert str(case / removed) in line and expected in line


def test_labels_outside_the_convention(one_case, tmp_path, capsys):
    data = spoiled(one_case, tmp_path, "brats2023-MEN")
    seg_path = data / "BraTS-MEN-00000-000" / "BraTS-MEN-00000-000-seg.nii.gz"
    seg = nib.load(str(seg_path))
    values = np.asarray(seg.dataobj).copy()
    values[0, 0, :2] = (4, 7)  # a cavity label, which meningioma data does not have, and a stray 7
    nib.save(nib.Nifti1Image(values, seg.affine), str(seg_path))
    line = preprocess_error(capsys, tmp_path, data)
    assert str(seg_path) in line and "labels [4, 7] are not in the brats-gli convention" in line


def test_a_4d_image_whose_channels_disagree_with_dataset_json(one_case, tmp_path, capsys):
    data = spoiled(one_case, tmp_path, "msd-brain-GLI")
    image_path = data / "imagesTr" / "BRATS_001.nii.gz"
    image = nib.load(str(image_path))
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[..., :3], image.affine), str(image_path))
    line = preprocess_error(capsys, tmp_path, data)
    assert str(image_path) in line and "3 channels, but dataset.json's 'modality' names 4" in line


@pytest.mark.parametrize("change", ["shape", "affine"])
def test_a_seg_grid_differing_from_its_images(one_case, tmp_path, capsys, change):
    data = spoiled(one_case, tmp_path, "brats2023-MEN-RT")
    seg_path = data / "BraTS-MEN-RT-0000-1" / "BraTS-MEN-RT-0000-1_gtv.nii.gz"
    seg = nib.load(str(seg_path))
    values, affine = np.asarray(seg.dataobj), seg.affine.copy()
    if change == "shape":
        values = values[:, :, :-1]
    else:
        affine[2, 3] += 1.5  # one slice further up
    nib.save(nib.Nifti1Image(values, affine), str(seg_path))
    line = preprocess_error(capsys, tmp_path, data)
    assert str(seg_path) in line and "must be on its images' grid" in line


def test_a_forced_layout_that_the_files_do_not_follow(one_case, tmp_path, capsys):
    data = spoiled(one_case, tmp_path, "brats2023-MEN")
    line = preprocess_error(capsys, tmp_path, data, "--layout", "brats2021", "--single_data_dir")
    assert "BraTS-MEN-00000-000-t1n.nii.gz" in line and "BraTS 2023+ file in a BraTS 2019-2021" in line


def test_user_error_for_an_unknown_case_name(tmp_path):
    write_brats_phantom(str(tmp_path / "in"), 1, shape=(32, 32, 32), layout="brats2023",
                        challenge="MEN")
    os.rename(tmp_path / "in" / "BraTS-MEN-00000-000", tmp_path / "in" / "Other-00000")
    with pytest.raises(UserError, match="not a BraTS 2023"):
        preprocess(str(tmp_path / "in"), str(tmp_path / "out"), single_data_dir=True,
                   layout="brats2023")


def test_settings_take_the_records_convention_and_refuse_a_contradicting_saved_network():
    from runtime.settings import FlagError, resolve
    ped = {"convention": "brats-ped", "in_channels": 4, "n_classes": 5}
    net = resolve({}, environ={}, records=ped).network
    assert (net.convention, net.in_channels, net.n_classes) == ("brats-ped", 4, 5)
    assert resolve({}, environ={}).network.convention == "brats2021"  # the phantom's
    saved = ("runs/ped", dict(ped, normalization="instancenorm", include_background=False,
                              model="unet3d"))
    assert resolve({"exec_mode": "evaluate"}, environ={}, saved=saved, records=ped).network == net
    before_conventions = ("runs/old", {"normalization": "instancenorm", "in_channels": 4,
                                       "n_classes": 4, "include_background": False})
    with pytest.raises(FlagError, match=r"^argument --data_dir: its records \(convention "
                                        r"brats-ped, n_classes 5\) do not fit .* runs/old was "
                                        r"trained for \(convention brats2021, n_classes 4"):
        resolve({"exec_mode": "evaluate"}, environ={}, saved=before_conventions, records=ped)
