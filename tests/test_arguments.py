"""The command line of SPEC §1.1: every flag, its default, and one-line errors."""
import subprocess
import sys

import pytest

from runtime.arguments import parse_args
from tests.conftest import ROOT

SPEC_FLAGS = ["--exec_mode", "--model_dir", "--log_dir", "--data_dir", "--batch_size", "--dtype",
              "--bf16_config_path", "--fold", "--num_folds", "--max_steps", "--seed", "--log_every",
              "--learning_rate", "--loss", "--normalization", "--include_background", "--augment",
              "--no-augment", "--benchmark", "--warmup_steps", "--resume_training", "--use_xla",
              "--xla", "--no_xla", "--use_amp", "--amp", "--no_hpu", "--dump_config", "--synth_data",
              "--disable_ckpt_saving", "--use_horovod", "--tensorboard_logging", "--log_all_workers",
              "--tf_verbosity"]
HIDDEN = ["--num_workers_per_hls", "--hls_type", "--kubernetes_run"]


def run_main(*argv):
    return subprocess.run([sys.executable, "main.py", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_help_lists_every_flag():
    out = run_main("--help")
    assert out.returncode == 0
    for flag in SPEC_FLAGS:
        assert flag in out.stdout, flag
    for flag in HIDDEN:
        assert flag not in out.stdout


def test_defaults_match_spec():
    args = parse_args([])
    assert args.exec_mode == "train_and_evaluate"
    assert args.batch_size == 2 and args.dtype is None and args.fold == 0  # None: by device and args.num_folds == 5
    assert args.max_steps == 16000 and args.seed is None and args.log_every == 100
    assert args.learning_rate == 0.0002 and args.loss == "dice+ce"
    assert args.normalization == "instancenorm" and args.include_background is False
    assert args.augment is True and args.warmup_steps == 40 and args.log_dir == "/tmp/unet3d_logs"
    assert args.bf16_config_path.endswith("bf16_config/unet.json")
    assert args.num_workers_per_hls == 1 and args.hls_type == "HLS1"


def test_aliases():
    assert parse_args(["--xla"]).use_xla is True
    assert parse_args(["--no_xla"]).use_xla is False
    assert parse_args(["--amp"]).use_amp is True
    assert parse_args(["-d", "fp32"]).dtype == "fp32"
    assert parse_args(["--no-augment"]).augment is False
    assert parse_args(["--exec_mode", "train_and_predict"]).exec_mode == "train_and_predict"


@pytest.mark.parametrize("argv, flag", [
    (["--loss", "focal"], "--loss"),
    (["--normalization", "layernorm"], "--normalization"),
    (["--exec_mode", "fit"], "--exec_mode"),
    (["--dtype", "fp16"], "--dtype"),
    (["--batch_size", "-2"], "--batch_size"),
    (["--batch_size", "0"], "--batch_size"),
    (["--fold", "5"], "--fold"),
    (["--fold", "2", "--num_folds", "2"], "--fold"),
    (["--data_dir", "/no/such/folder"], "--data_dir"),
    (["--num_processes", "2"], "--num_processes"),  # the TensorFlow backend
    (["--backend", "jax", "--coordinator_address", "localhost"], "--coordinator_address"),
    (["--backend", "jax", "--coordinator_address", "localhost:1234"], "--num_processes"),
    (["--backend", "jax", "--num_processes", "2", "--process_id", "1"], "--coordinator_address"),
    (["--backend", "jax", "--coordinator_address", "h:1", "--num_processes", "2", "--process_id", "2"],
     "--process_id"),
])
def test_bad_flags_give_one_line_errors(argv, flag):
    out = run_main(*argv)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert flag in lines[0] and "error" in lines[0]


def test_jax_process_flags_come_from_the_environment_too(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "node0:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    args = parse_args(["--backend", "jax"])
    assert (args.coordinator_address, args.num_processes, args.process_id) == ("node0:1234", 4, 3)
    args = parse_args(["--backend", "jax", "--process_id", "1"])  # a flag wins
    assert args.process_id == 1
    assert parse_args([]).num_processes is None  # TensorFlow: the JAX variables are not its own
    monkeypatch.setenv("JAX_NUM_PROCESSES", "four")
    with pytest.raises(SystemExit):
        parse_args(["--backend", "jax"])
