"""The command line of SPEC §1.1: every flag, its default, and one-line errors."""
import pytest

from runtime.arguments import parse_args
from tests.conftest import main_here

SPEC_FLAGS = ["--exec_mode", "--model_dir", "--log_dir", "--data_dir", "--batch_size", "--dtype",
              "--bf16_config_path", "--fold", "--num_folds", "--max_steps", "--seed", "--log_every",
              "--learning_rate", "--loss", "--normalization", "--include_background", "--augment",
              "--no-augment", "--benchmark", "--warmup_steps", "--resume_training", "--use_xla",
              "--xla", "--no_xla", "--use_amp", "--amp", "--no_hpu", "--dump_config", "--synth_data",
              "--disable_ckpt_saving", "--use_horovod", "--tensorboard_logging", "--log_all_workers",
              "--tf_verbosity"]
HIDDEN = ["--num_workers_per_hls", "--hls_type", "--kubernetes_run"]


def test_help_lists_every_flag(capsys):
    out = main_here(capsys, "--help")
    assert out.returncode == 0
    for flag in SPEC_FLAGS:
        assert flag in out.stdout, flag
    for flag in HIDDEN:
        assert flag not in out.stdout


def test_defaults_match_spec():
    settings = parse_args([])
    run, data, net, precision = settings.run, settings.data, settings.network, settings.precision
    assert run.exec_mode == "train_and_evaluate"
    assert data.batch_size == 2 and precision.dtype is None and net.fold == 0  # None: by device
    assert net.num_folds == 5
    assert net.max_steps == 16000 and data.seed is None and run.log_every == 100
    assert net.learning_rate == 0.0002 and net.loss == "dice+ce"
    assert net.normalization == "instancenorm" and net.include_background is False
    assert data.augment is True and run.warmup_steps == 40 and run.log_dir == "/tmp/unet3d_logs"
    assert precision.bf16_config_path.endswith("bf16_config/unet.json")
    assert parse_args(["--num_workers_per_hls", "8", "--hls_type", "HLS2"]) == settings  # ignored


def test_aliases():
    assert parse_args(["--xla"]).precision.use_xla is True
    assert parse_args(["--no_xla"]).precision.use_xla is False
    assert parse_args(["--amp"]).precision.use_amp is True
    assert parse_args(["-d", "fp32"]).precision.dtype == "fp32"
    assert parse_args(["--no-augment"]).data.augment is False
    assert parse_args(["--exec_mode", "train_and_predict"]).run.exec_mode == "train_and_predict"


def test_settings_are_frozen():
    import dataclasses
    settings = parse_args([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.data.batch_size = 4


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
def test_bad_flags_give_one_line_errors(argv, flag, capsys):
    out = main_here(capsys, *argv)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert flag in lines[0] and "error" in lines[0]


def test_jax_process_flags_come_from_the_environment_too(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "node0:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    processes = parse_args(["--backend", "jax"]).processes
    assert (processes.coordinator_address, processes.num_processes, processes.process_id) == (
        "node0:1234", 4, 3)
    assert parse_args(["--backend", "jax", "--process_id", "1"]).processes.process_id == 1  # a flag wins
    assert parse_args([]).processes.num_processes is None  # TensorFlow: the JAX variables are not its own
    monkeypatch.setenv("JAX_NUM_PROCESSES", "four")
    with pytest.raises(SystemExit):
        parse_args(["--backend", "jax"])
