"""The command line: every flag of the reference (its runtime/arguments.py), each default stated
once (in runtime/settings.py, and --help reads it from there), and one-line errors."""
import dataclasses
import re

import pytest

from runtime.arguments import build_parser, parse_args, spelled
from runtime.settings import MODELS, default_value, flag_defaults
from tests.conftest import main_here

REFERENCE_FLAGS = ["--exec_mode", "--model_dir", "--log_dir", "--data_dir", "--batch_size", "--dtype",
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
    for flag in REFERENCE_FLAGS:
        assert flag in out.stdout, flag
    for flag in HIDDEN:
        assert flag not in out.stdout


def test_defaults_are_the_references():
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


def flag_helps(text):
    """{option string: its help text on one line} of every flag in main.py --help's output."""
    helps, lines = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            invocation, _, first = line.strip().partition("  ")
            lines = [first.strip()]
            for option in re.findall(r"(?:^|, )(-{1,2}[\w-]+)", invocation):
                helps[option] = lines
        elif lines is not None and line.startswith("   ") and line.strip():
            lines.append(line.strip())
        else:
            lines = None
    return {option: " ".join(part for part in parts if part) for option, parts in helps.items()}


def stated_default_problems(help_text):
    """Where a flag's help in `help_text` (main.py --help) and runtime/settings.py disagree about its
    default. A help states a default only as "(default: X...)", X running to ";" or ")": X is the
    setting's default ("X", or "words, else X" where something comes first), or per network "X for
    unet3d, Y for vnet" (a network whose default is none may be described after the ";" instead).
    A flag whose setting has a value to state must state it; one whose setting has none (for every
    network) may describe in words what leaving it out does; an off switch states nothing."""
    helps, problems = flag_helps(help_text), []
    for action in build_parser()._actions:
        if not action.option_strings or action.help == "==SUPPRESS==" or action.dest == "help":
            continue
        flag = action.option_strings[0]
        if flag not in helps:
            problems.append(f"{flag}: not in --help")
            continue
        values, text = flag_defaults(action.dest), helps[flag]
        said = re.findall(r"\(default: ([^)]*)\)", text)
        if text.count("default") != len(said):
            problems.append(f"{flag}: states a default other than as '(default: ...)': {text}")
        to_state = {model: spelled(value) for model, value in values.items()
                    if value is not None and value is not False}
        if not to_state:
            if said and None not in values.values():
                problems.append(f"{flag}: states a default ({said}), its setting has none to state")
            continue
        if len(said) != 1:
            problems.append(f"{flag}: states its default {len(said)} times, not once: {text}")
            continue
        stated = said[0].split(";")[0]
        texts = {model: spelled(value) for model, value in values.items()}
        if len(set(texts.values())) == 1:
            wanted = next(iter(texts.values()))
            agrees = stated == wanted or stated.endswith(f", else {wanted}")
        else:
            parts = [part.rpartition(" for ") for part in stated.split(", ")]
            per_model = {model: value for value, sep, model in parts if sep}
            agrees = (len(per_model) == len(parts) and set(per_model) <= set(texts)
                      and all(per_model[model] == texts[model] for model in per_model)
                      and set(to_state) <= set(per_model))
            wanted = ", ".join(f"{text} for {model}" for model, text in texts.items())
        if not agrees:
            problems.append(f"{flag}: its help says (default: {stated}), runtime/settings.py "
                            f"holds {wanted}")
    return problems


def test_each_help_states_the_default_its_setting_holds(capsys):
    out = main_here(capsys, "--help")
    assert out.returncode == 0
    assert stated_default_problems(out.stdout) == []


def test_the_help_check_catches_a_wrong_or_missing_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # each help on one line, to be changed here
    text = main_here(capsys, "--help").stdout
    assert "(default: 1000)" in text and "(default: 2 for unet3d, 8 for vnet)" in text

    def found(changed):
        return set(stated_default_problems(changed)) - set(stated_default_problems(text))

    assert found(text.replace("(default: 1000)", "(default: 500)")) == {
        "--ckpt_every: its help says (default: 500), runtime/settings.py holds 1000"}
    assert found(text.replace(" (default: 1000)", "")) == {
        "--ckpt_every: states its default 0 times, not once: also save a checkpoint every N "
        "training steps, 0 for only at the end"}
    wrong = text.replace("(default: 2 for unet3d, 8 for vnet)", "(default: 2 for unet3d, 4 for vnet)")
    assert found(wrong) == {
        "--batch_size: its help says (default: 2 for unet3d, 4 for vnet), runtime/settings.py "
        "holds 2 for unet3d, 8 for vnet"}


def test_a_flag_left_out_is_none_and_its_setting_takes_the_default():
    """argparse holds no default of its own (a switch left out is False, as its setting's), so a
    run without flags is runtime/settings.py's defaults, for either network."""
    left_out = vars(build_parser().parse_args([]))
    own = {dest: value for dest, value in left_out.items()
           if flag_defaults(dest) and value is not None
           and not (value is False and not any(flag_defaults(dest).values()))}
    assert own == {}
    for model in MODELS:
        settings = parse_args(["--model", model], environ={})
        for section in (settings.run, settings.data, settings.inference, settings.precision,
                        settings.processes, settings.network):
            for field in dataclasses.fields(section):
                if field.name != "model":
                    assert getattr(section, field.name) == default_value(field.name, model), (
                        model, field.name)


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
