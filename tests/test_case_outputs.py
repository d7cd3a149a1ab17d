"""What evaluate, predict and training write beside the scores: metrics.csv and the challenge's
means, a PNG per case, and training_curves.png with --eval_every. One tiny run serves all."""
import csv
import json
import os

import numpy as np
import pytest

from runtime.arguments import parse_args
from runtime.loops.challenge_metrics import COLUMNS
from tests.conftest import main_here, phantom_records

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path):
    with open(path, "rb") as handle:
        return handle.read(8) == PNG_SIGNATURE


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Phantom records (one validation case of 32³) and a run trained 2 steps, evaluating after
    each step, then scored on the whole grid with the challenge's metrics and pictured."""
    root = tmp_path_factory.mktemp("outputs")
    records = phantom_records(str(root), 3, (32, 32, 32), seed=4)
    common = ["--data_dir", records, "--num_folds", "3", "-d", "fp32", "--seed", "1",
              "--model_dir", str(root / "model"), "--log_dir", str(root / "logs")]
    return root, records, common


def test_evaluate_writes_metrics_csv_pictures_and_training_curves(trained, capsys):
    from dataset.conventions import CONVENTIONS
    from dataset.data_loader import BratsData
    from runtime.loops.challenge_metrics import ChallengeMetrics, record_spacing
    root, records, common = trained
    out = main_here(capsys, *common, "--exec_mode", "train_and_evaluate", "--max_steps", "2",
                    "--batch_size", "1", "--log_every", "1", "--eval_every", "1", "--sliding_window",
                    "--challenge_metrics", "--save_png", "--output_dir", str(root / "out"))
    assert out.returncode == 0, out.stderr

    # Training: the loss and the validation dice of steps 1 and 2 in log_dir's picture.
    logged = [json.loads(line) for line in open(root / "logs" / "log.json")]
    assert [e["step"] for e in logged if e["type"] == "eval"] == [1, 2, 2]  # the last: whole grid
    assert is_png(root / "logs" / "training_curves.png")

    # metrics.csv: a row per case and region, the header exactly the documented one.
    with open(root / "out" / "metrics.csv") as handle:
        assert handle.readline().strip() == ",".join(COLUMNS)
    rows = list(csv.DictReader(open(root / "out" / "metrics.csv")))
    data = BratsData(records, 1, num_folds=3)
    case = data.eval_records[0]["case"]
    assert [(r["case"], r["region"]) for r in rows] == [(case, "ET"), (case, "TC"), (case, "WT")]

    # Its numbers are those of the predicted mask against the truth, and their means are logged.
    assert main_here(capsys, *common, "--exec_mode", "predict", "--sliding_window", "--save_png",
                     "--output_dir", str(root / "predicted")).returncode == 0
    mask = np.load(root / "predicted" / "vol_0.npy")
    (_, truth), = list(data.eval_volumes().as_numpy_iterator())
    convention = CONVENTIONS["brats2021"]
    expected = ChallengeMetrics(convention).case(
        case, convention.to_source(mask), convention.to_source(np.argmax(truth[0], axis=-1)),
        record_spacing(data.eval_records[0]))
    for row, want in zip(rows, expected):
        np.testing.assert_allclose([float(row[k]) for k in COLUMNS[2:]],
                                   [want[k] for k in COLUMNS[2:]], rtol=1e-6)
    means = [e for e in logged if e["type"] == "challenge"][-1]["data"]
    assert means["WT_lesion_f1"] == pytest.approx(float(rows[2]["lesion_f1"]))
    assert "ET_hd95" in out.stdout and "metrics.csv" in out.stdout
    # Without a postprocessing.json in model_dir nothing is postprocessed, and nothing says so.
    assert "postprocessing" not in out.stdout and not os.path.exists(root / "out" / "metrics_raw.csv")

    # A picture per case from evaluate (truth and prediction) and predict (prediction alone).
    assert os.listdir(root / "out" / "png") == [f"{case}.png"]
    assert is_png(root / "out" / "png" / f"{case}.png")
    assert is_png(root / "predicted" / "png" / f"{case}.png")


@pytest.mark.parametrize("argv, flag", [
    (["--exec_mode", "evaluate", "--challenge_metrics"], "add --sliding_window"),
    (["--exec_mode", "predict", "--sliding_window", "--challenge_metrics"], "--challenge_metrics"),
    (["--model", "vnet", "--exec_mode", "evaluate", "--challenge_metrics"], "--challenge_metrics"),
    (["--exec_mode", "train", "--save_png"], "--save_png"),
    (["--exec_mode", "evaluate", "--sliding_window", "--choose_postprocessing"],
     "argument --choose_postprocessing: it scores the candidates on the validation cases with the "
     "challenge's metrics; add --challenge_metrics"),
    (["--exec_mode", "evaluate", "--sliding_window", "--challenge_metrics", "--choose_postprocessing",
      "--synth_data"], "argument --choose_postprocessing: synthetic data has no validation cases"),
    (["--exec_mode", "evaluate", "--sliding_window", "--challenge_metrics", "--choose_postprocessing",
      "--no_postprocessing"], "argument --no_postprocessing"),
    (["--exec_mode", "evaluate", "--sliding_window", "--challenge_metrics", "--choose_postprocessing",
      "--postprocessing_criterion", "dice,hd95"], "argument --postprocessing_criterion"),
    (["--exec_mode", "evaluate", "--postprocessing_criterion", "hd95"],
     "argument --postprocessing_criterion: only --choose_postprocessing uses it"),
    (["--exec_mode", "evaluate", "--eval_every", "5"], "--eval_every"),
    (["--benchmark", "--eval_every", "5"], "--eval_every"),
])
def test_output_flags_that_cannot_work_give_one_line_errors(argv, flag, capsys, tmp_path):
    with pytest.raises(SystemExit) as exited:
        parse_args(["--model_dir", str(tmp_path), *argv])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], lines


def test_choosing_postprocessing_without_validation_cases_is_one_line(trained, tmp_path, capsys):
    """Records whose validation fold holds no case: --choose_postprocessing stops before the model
    is built, naming the flag."""
    root, records, common = trained
    data = tmp_path / "records"
    data.mkdir()
    for name in os.listdir(records):
        os.link(os.path.join(records, name), data / name)
    os.remove(data / "volume-0.tfrecord")  # fold 0 of 3: the first file, now without a record
    (data / "volume-0.tfrecord").write_bytes(b"")
    out = main_here(capsys, *common, "--data_dir", str(data), "--model_dir", str(tmp_path / "m"),
                    "--exec_mode", "evaluate", "--sliding_window", "--challenge_metrics",
                    "--choose_postprocessing")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert "argument --choose_postprocessing: fold 0 of the data has no validation case" in lines[0]
    assert not os.listdir(tmp_path / "m")  # nothing written


def test_an_evaluation_within_training_keeps_the_training_bar_and_curves(tmp_path):
    import io

    from runtime.loops.hooks import Hooks, ProgressHook, TrainingCurvesHook

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    progress, curves = ProgressHook(Terminal()), TrainingCurvesHook(str(tmp_path), ckpt_every=2)
    hooks = Hooks([progress, curves])
    hooks.begin("train", 4, 0)
    training_bar = progress.bar
    hooks.after_step("train", 1, 1, 0.9)
    assert not (tmp_path / "training_curves.png").exists()
    hooks.after_step("train", 2, 1, 0.8)  # a checkpoint step
    assert is_png(tmp_path / "training_curves.png")
    for dice in (0.2, 0.3):  # an evaluation during training, then a later one of the same step
        hooks.begin("eval", 1, 0)
        assert progress.bar is not training_bar
        hooks.after_step("eval", 1, 1, None)
        hooks.end("eval", 2, {"MeanDice": dice})
    assert progress.bar is training_bar
    assert curves.losses == [(1, 0.9), (2, 0.8)] and curves.evaluations == [(2, {"MeanDice": 0.3})]
