"""5-cross-validation.sh on phantom records: the folds, the table, re-runs and failures, the
pooled postprocessing choice, and WORKERS processes a fold under mpirun."""
import json
import os
import subprocess
import sys

import pytest

from dataset.conventions import CONVENTIONS
from runtime.parse_results import METRICS, table
from tests.conftest import ROOT
from tests.test_postprocessing import cases as postprocessing_cases

GLI = CONVENTIONS["brats-gli"]

SCRIPT = os.path.join(ROOT, "5-cross-validation.sh")


@pytest.fixture(scope="module")
def records(unet3d_records):
    """conftest's six phantom record files: three folds of 2 validation files each."""
    return unet3d_records


def run_script(records, results, *extra, env=None):
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", SCRIPT, records, str(results), "1", "fp32", "--max_steps", "1",
                           "--seed", "0", "--log_every", "1", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


MPI_ENV = {"WORKERS": "2", "MPIRUN_ARGS": "--oversubscribe", "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


@pytest.mark.xdist_group("processes")  # two processes a fold: not beside another launch of several
def test_folds_stop_on_failure_resume_under_mpirun_and_skip_what_is_done(records, tmp_path):
    # Fold 0 trains in one process and the run stops at fold 1 of 3 (a trailing --num_folds; five
    # are the default). Then, with WORKERS=2 and two folds (to keep the launches few), fold 0 is
    # skipped and fold 1 trains in two processes under mpirun.
    results = tmp_path / "results"
    results.mkdir()
    (results / "fold_1").write_text("a file where the fold's folder belongs")  # fails at the start
    failed = run_script(records, results, "--num_folds", "3")
    assert failed.returncode == 1
    assert "fold 1 failed" in failed.stderr and "run the same command again" in failed.stderr
    assert os.path.exists(results / "fold_0" / "log.json") and not os.path.exists(results / "fold_2")

    os.remove(results / "fold_1")
    # 2 steps under mpirun: each of the 2 workers takes 1 (--max_steps is divided among them).
    finished = run_script(records, results, "--num_folds", "2", "--max_steps", "2", env=MPI_ENV)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("already evaluated, skipped") == 1
    assert finished.stdout.count("(2 worker(s))") == 1
    with open(results / "fold_1" / "settings.json") as handle:
        assert json.load(handle)["run"]["devices"] == 2  # one device in each of 2 processes
    steps = [e["step"] for e in map(json.loads, open(results / "fold_1" / "log.json"))
             if e["type"] == "train"]
    assert steps == [1]
    rows = finished.stdout.strip().splitlines()[-4:]
    assert rows[0].split() == ["fold", *METRICS]
    assert [r.split()[0] for r in rows[1:]] == ["0", "1", "mean"]
    values = [[float(v) for v in r.split()[1:]] for r in rows[1:]]
    for column in range(len(METRICS)):
        assert values[2][column] == pytest.approx(sum(v[column] for v in values[:2]) / 2, abs=1e-4)
    assert not os.path.exists(results / "fold_2")

    again = run_script(records, results, "--num_folds", "2")
    assert again.returncode == 0
    assert again.stdout.count("already evaluated, skipped") == 2
    assert not os.path.exists(results / "fold_0" / "postprocessing.json")  # not asked for
    assert again.stdout.strip().splitlines()[-4:] == rows == table(str(results), folds=2).splitlines()


def evaluated_fold(fold_dir, case):
    """A fold as --sliding_window --challenge_metrics --choose_postprocessing leaves it: an
    evaluation in log.json and its validation case kept in postprocessing_cases.npz."""
    from runtime.loops.postprocessing_choice import CASES_FILE, write_cases
    os.makedirs(fold_dir)
    with open(os.path.join(fold_dir, "log.json"), "w") as handle:
        handle.write(json.dumps({"type": "eval", "step": 1, "data": {m: 0.5 for m in METRICS}}) + "\n")
    write_cases(os.path.join(fold_dir, CASES_FILE), GLI, [case])


def test_with_choose_postprocessing_the_folds_cases_are_pooled(tmp_path):
    """Both folds evaluated (so skipped): the script prints the table, then chooses the
    postprocessing on fold 0's case A and fold 1's case B together, into fold_0; a fold without
    its cases stops it with the pooling's one-line error."""
    from runtime.loops.postprocessing_choice import choose_postprocessing
    results = tmp_path / "results"
    for fold, case in enumerate(postprocessing_cases()):
        evaluated_fold(str(results / f"fold_{fold}"), case)
    flags = ["--sliding_window", "--challenge_metrics", "--choose_postprocessing", "--num_folds", "2"]
    pooled = run_script("unused", results, *flags)
    assert pooled.returncode == 0, pooled.stderr[-3000:]
    assert pooled.stdout.count("already evaluated, skipped") == 2
    assert f"wrote {results}/fold_0/postprocessing.json" in pooled.stdout
    with open(results / "fold_0" / "postprocessing.json") as handle:
        chosen = json.load(handle)
    assert chosen["validation_cases"] == ["A", "B"]
    assert chosen["model_dirs"] == [f"{results}/fold_0", f"{results}/fold_1"]
    expected = choose_postprocessing(postprocessing_cases(), GLI).description["operations"]
    assert chosen["operations"] == expected

    os.remove(results / "fold_1" / "postprocessing_cases.npz")
    failed = run_script("unused", results, *flags)
    assert failed.returncode == 1 and failed.stderr.strip().count("\n") == 0
    assert "fold_1/postprocessing_cases.npz: missing" in failed.stderr


def test_bad_worker_count_is_one_line(records, tmp_path):
    result = run_script(records, tmp_path / "results", env={"WORKERS": "two"})
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "WORKERS must be a positive integer, got 'two'" in result.stderr
