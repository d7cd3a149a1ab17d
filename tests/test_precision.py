"""Precision and accelerators: bf16 keeps the sensitive parts in float32, AMP trains, Habana wiring
(through a stand-in package: Habana software cannot run here), and --dump_config."""
import glob
import importlib
import json
import os
import subprocess
import sys
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from dataset.data_loader import BratsData
from main import main
from model.layers import InstanceNormalization, make_normalization
from model.losses import dice_ce_loss, eval_dice_per_sample
from model.unet3d import build_unet3d
from runtime.arguments import parse_args
from runtime.setup.hpu import HPU_DEVICE, setup_hpu
from runtime.setup import precision
from runtime.setup.precision import FP16_CPU_SLOWDOWN, Device, choose_dtype, cpu_flags
from runtime.tasks.base import make_task
from tests.conftest import ROOT, assert_one_line_error, main_here, tiny_vnet_flags


@pytest.fixture
def bf16_policy():
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.parametrize("kind", ["instancenorm", "groupnorm", "batchnorm"])
def test_normalization_statistics_run_in_float32_under_bf16(bf16_policy, kind):
    # bf16 holds 8 significant bits: values near 1000 sit 4 apart. Summing them in bf16 loses the
    # mean; in float32 it is exact, and the normalized output then matches float64.
    rng = np.random.default_rng(0)
    x = (1000 + 4 * rng.integers(-3, 4, size=(2, 4, 4, 4, 32))).astype(np.float32)
    x_bf16 = tf.cast(x, tf.bfloat16)
    layer = make_normalization(kind, name="norm")
    out = layer(x_bf16, training=True) if kind == "batchnorm" else layer(x_bf16)
    axes = {"instancenorm": (1, 2, 3), "batchnorm": (0, 1, 2, 3)}.get(kind)
    xs = x.astype(np.float64)
    if kind == "groupnorm":  # 16 groups of 2 channels
        g = xs.reshape(2, 4, 4, 4, 16, 2)
        ref = ((g - g.mean((1, 2, 3, 5), keepdims=True)) / np.sqrt(g.var((1, 2, 3, 5), keepdims=True) + 1e-3))
        ref = ref.reshape(xs.shape)
    else:
        eps = 1e-6 if kind == "instancenorm" else layer.epsilon
        ref = (xs - xs.mean(axes, keepdims=True)) / np.sqrt(xs.var(axes, keepdims=True) + eps)
    np.testing.assert_allclose(np.asarray(tf.cast(out, tf.float32)), ref, atol=0.02)


def test_bf16_model_computes_convolutions_in_bf16_and_the_rest_in_float32(bf16_policy):
    model = build_unet3d(in_channels=4, seed=0)
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv3D)]
    assert all(l.compute_dtype == "bfloat16" and l.kernel.dtype == "float32" for l in convs)
    norms = [l for l in model.layers if isinstance(l, InstanceNormalization)]
    assert len(norms) == 22
    probs = model(np.random.default_rng(1).normal(size=(1, 32, 32, 32, 4)).astype(np.float32))
    assert probs.dtype == tf.float32  # the softmax runs in float32
    y = tf.one_hot(tf.zeros((1, 32, 32, 32), tf.int32), 4)
    assert dice_ce_loss(y, tf.cast(probs, tf.bfloat16)).dtype == tf.float32
    assert eval_dice_per_sample(y, tf.cast(probs, tf.bfloat16))["WholeTumor"].dtype == tf.float32


@pytest.fixture(scope="module")
def records(unet3d_records):
    return unet3d_records


# The flags of a Sapphire Rapids Xeon: AVX512_FP16 and AMX-BF16, no AMX-FP16.
SAPPHIRE_RAPIDS_FLAGS = ("fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 "
                         "amx_tile")


def test_amp_trains_on_cpu(msd_phantom, tmp_path, monkeypatch, capsys):
    # On the tool's smallest network (the loss scaling and the float16 policy are the same for
    # either): 6 training cases in batches of 2, 3 steps. The CPU's flag listing is a Sapphire
    # Rapids', whatever this machine's is: the run warns that float16 trains slowly there.
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {SAPPHIRE_RAPIDS_FLAGS}\n")
    monkeypatch.setattr(precision, "cpu_flags", lambda: cpu_flags(str(cpuinfo)))
    try:
        result = main_here(capsys, *tiny_vnet_flags(
            msd_phantom, tmp_path, "--exec_mode", "train", "--use_amp", "--train_split", "0.6",
            "--batch_size", "2", "--optimizer", "adam", "--base_lr", "0.001",
            "--disable_ckpt_saving"))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(
        "warning: --use_amp: this CPU has AVX512_FP16 but no AMX-FP16")
    with open(tmp_path / "logs" / "log.json") as handle:
        log = [json.loads(line) for line in handle]
    losses = [e["data"]["loss"] for e in log if e["type"] == "train"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]


def test_dump_config_writes_hlo_and_a_trace(msd_phantom, tmp_path):
    # The tool's smallest network: the dump is the same code for either.
    dump = tmp_path / "dump"
    assert main(tiny_vnet_flags(msd_phantom, tmp_path, "--exec_mode", "train", "--batch_size", "2",
                                "--disable_ckpt_saving", "--dump_config", str(dump))) == 0
    hlo = (dump / "train_step.hlo.txt").read_text()
    assert "HloModule" in hlo and "ENTRY" in hlo
    assert os.path.getsize(dump / "train_step_graph.pbtxt") > 0
    traces = glob.glob(str(dump / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert traces and all(os.path.getsize(t) > 0 for t in traces)


HABANA_STANDIN = {
    "habana_frameworks/__init__.py": "",
    "habana_frameworks/tensorflow/__init__.py": '''
"""Stand-in for Habana's TensorFlow bridge (no Gaudi card here): records the calls made to it."""
import os

LOADED = []


def load_habana_module():
    LOADED.append(os.environ.get("TF_BF16_CONVERSION"))
''',
    "habana_frameworks/tensorflow/ops/__init__.py": "",
    "habana_frameworks/tensorflow/ops/instance_norm.py": '''
from model.layers import InstanceNormalization


class HabanaInstanceNormalization(InstanceNormalization):
    """Stand-in for Habana's fused instance-norm layer."""
''',
}


@pytest.fixture
def habana(tmp_path, monkeypatch):
    for name, text in HABANA_STANDIN.items():
        path = tmp_path / "standin" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path / "standin"))
    monkeypatch.delenv("TF_BF16_CONVERSION", raising=False)
    yield
    for name in [m for m in sys.modules if m.startswith("habana_frameworks")]:
        del sys.modules[name]


def copy_targets(dataset):
    """The devices a tf.data pipeline copies its elements to (prefetch_to_device's copy stage)."""
    targets = []
    while dataset is not None:
        if hasattr(dataset, "_target_device"):
            targets.append(dataset._target_device)
        dataset = getattr(dataset, "_input_dataset", None)
    return targets


def test_habana_wiring_with_bf16(habana, records):
    settings = parse_args(["--data_dir", records, "--num_folds", "3", "--dtype", "bf16"])
    hpu = setup_hpu(settings.precision)
    bridge = importlib.import_module("habana_frameworks.tensorflow")
    config = os.path.abspath(settings.precision.bf16_config_path)
    assert bridge.LOADED == [config]  # loaded once, after TF_BF16_CONVERSION was set
    assert os.environ["TF_BF16_CONVERSION"] == config
    assert hpu.device == HPU_DEVICE
    assert hpu.dtype == "bf16"
    # The machine as runtime/setup/machine.py resolves it on an HPU, in the fields a task reads.
    machine = types.SimpleNamespace(hpu=hpu, seed=None, backend="tensorflow", gpu=False,
                                    conv_kernel="auto", dtype=hpu.dtype)
    task = make_task("unet3d", settings.network, settings.data, machine)
    norms = {type(l).__name__ for l in task.model(None).layers if "norm" in l.name}
    assert norms == {"HabanaInstanceNormalization"}
    data = task.data()
    assert data.prefetch_device == HPU_DEVICE
    for dataset in (data.train_dataset(), data.eval_dataset(), data.test_dataset()):
        assert HPU_DEVICE in copy_targets(dataset)


def test_habana_wiring_with_fp32_and_no_hpu(habana, records):
    hpu = setup_hpu(parse_args(["--data_dir", records, "--num_folds", "3", "--dtype", "fp32"]).precision)
    assert hpu is not None and "TF_BF16_CONVERSION" not in os.environ
    assert importlib.import_module("habana_frameworks.tensorflow").LOADED == [None]
    del sys.modules["habana_frameworks.tensorflow"]
    assert setup_hpu(parse_args(["--data_dir", records, "--num_folds", "3", "--no_hpu"]).precision) is None
    assert "habana_frameworks.tensorflow" not in sys.modules  # not even imported


def test_without_habana_software_a_notice_only_where_it_matters(records, capsys):
    assert setup_hpu(parse_args(["--data_dir", records, "--num_folds", "3"]).precision) is None
    assert capsys.readouterr().out == ""  # a plain CPU/GPU run: no Habana noise
    for extra in (["--bf16_config_path", parse_args([]).precision.bf16_config_path],
                  ["--tf_verbosity", "1"]):
        settings = parse_args(["--data_dir", records, "--num_folds", "3", *extra])
        assert setup_hpu(settings.precision, settings.run.tf_verbosity) is None
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1 and "no Habana software found" in out[0]
    data = BratsData(records, 1, num_folds=3)
    assert copy_targets(data.train_dataset()) == []


def test_a_malformed_bf16_config_is_a_one_line_error(records, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"allowlist": ["Conv3D"]')
    argv = ["--data_dir", records, "--num_folds", "3", "--bf16_config_path", str(bad),
            "--model_dir", str(tmp_path / "m"), "--log_dir", str(tmp_path / "l")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "not valid JSON" in err[0]


AVX2 = Device("cpu", {"fpu", "sse4_2", "avx", "avx2", "fma"})
AVX512_BF16 = Device("cpu", {"avx2", "avx512f", "avx512_bf16"})


def choose(argv, device, capsys):
    """(dtype chosen, stdout lines, stderr lines) of choose_dtype for a command line on `device`."""
    dtype = choose_dtype(parse_args(argv).precision, device)
    captured = capsys.readouterr()
    return dtype, captured.out.strip().splitlines(), captured.err.strip().splitlines()


def test_default_dtype_is_bf16_only_where_the_device_runs_it_natively(capsys):
    for device, expected in ((AVX2, "fp32"), (AVX512_BF16, "bf16"), (Device("cpu", {"amx_bf16"}), "fp32"),
                             (Device("gpu", capability=(9, 0)), "bf16"),
                             (Device("gpu", capability=(7, 0)), "fp32"), (Device("hpu"), "bf16")):
        dtype, out, err = choose([], device, capsys)
        assert dtype == expected and err == []
        assert len(out) == 1 and out[0].startswith(f"--dtype {expected} chosen: ")
    _, (notice,), _ = choose([], AVX2, capsys)
    assert "no native bf16" in notice and "--dtype bf16 forces it" in notice
    assert choose(["--model", "vnet"], AVX512_BF16, capsys) == ("fp32", [], [])  # V-Net: fp32


def test_bf16_stays_off_by_default_where_a_native_cpu_does_not_pay(capsys):
    """AMX under TensorFlow (wrong AMX kernels, slower AVX512_BF16 ones) and JAX on any CPU
    (slower than fp32): fp32 by default, and the notice says why; an explicit bf16 on AMX warns,
    on JAX it just runs."""
    amx = Device("cpu", {"avx512_bf16", "amx_bf16"})
    dtype, (notice,), err = choose([], amx, capsys)
    assert dtype == "fp32" and err == []
    assert notice.startswith("--dtype fp32 chosen: this CPU has AMX_BF16, but oneDNN's AMX kernels "
                             "compute some bf16 convolutions wrongly")
    assert notice.endswith("; --dtype bf16 forces it")
    dtype, out, (warning,) = choose(["--dtype", "bf16"], amx, capsys)
    assert dtype == "bf16" and out == [] and warning.startswith("warning: --dtype bf16: this CPU has "
                                                                "AMX_BF16, but oneDNN's AMX")
    dtype, (notice,), err = choose(["--backend", "jax"], AVX512_BF16, capsys)
    assert dtype == "fp32" and err == [] and "JAX's CPU kernels run bf16 slower than fp32" in notice
    assert choose(["--backend", "jax", "--dtype", "bf16"], amx, capsys) == ("bf16", [], [])
    assert choose(["--backend", "jax"], Device("gpu", capability=(9, 0)), capsys)[0] == "bf16"


def test_bf16_on_amx_under_tensorflow_keeps_onednn_off_amx_unless_the_user_chose():
    amx = Device("cpu", {"avx512_bf16", "amx_bf16"})
    environ = {}
    notice = precision.amx_off_for_bf16("bf16", "tensorflow", amx, environ)
    assert environ == {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
    assert notice.startswith("bf16 on this CPU's AVX512_BF16 kernels: "
                             "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 set")
    chosen = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}
    assert precision.amx_off_for_bf16("bf16", "tensorflow", amx, chosen) is None
    assert chosen == {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}
    for dtype, backend, device in (("fp32", "tensorflow", amx), ("bf16", "jax", amx),
                                   ("bf16", "tensorflow", AVX512_BF16)):
        environ = {}
        assert precision.amx_off_for_bf16(dtype, backend, device, environ) is None and environ == {}


AMX_CONVOLUTION = """
import os, sys
import numpy as np
import tensorflow as tf
from runtime.setup.precision import Device, amx_off_for_bf16, cpu_flags
if sys.argv[1] == "tool":
    amx_off_for_bf16("bf16", "tensorflow", Device("cpu", cpu_flags()))
rng = np.random.default_rng(0)
x = np.maximum(rng.standard_normal((1, 4, 4, 2, 320)), 0).astype(np.float32)
k = (rng.standard_normal((3, 3, 3, 320, 320)) / np.sqrt(27 * 320)).astype(np.float32)
reference = tf.nn.conv3d(x, k, (1, 2, 2, 2, 1), "SAME").numpy()
y = tf.nn.conv3d(tf.cast(x, tf.bfloat16), tf.cast(k, tf.bfloat16), (1, 2, 2, 2, 1), "SAME")
y = tf.cast(y, tf.float32).numpy()
print(float(np.abs(y - reference).max() / np.abs(reference).max()) if np.isfinite(y).all() else "nan")
"""


@pytest.mark.skipif("amx_bf16" not in cpu_flags(), reason="needs a CPU with AMX")
def test_the_amx_convolution_oneDNN_gets_wrong_is_right_under_the_tools_setting():
    """UNet3D's last downsampling at the demo's crop (4×4×2 voxels of 320 channels, stride 2, an
    output of last axis 1), in bf16 after the same convolution in float32, as in a training step:
    oneDNN's AMX kernel gives NaN or values far off (which, depends on what ran before), the
    AVX512_BF16 one the tool chooses the float32 values."""
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    results = {}
    for how in ("tool", "amx"):
        run = subprocess.run([sys.executable, "-c", AMX_CONVOLUTION, how], capture_output=True,
                             text=True, env=env, cwd=ROOT, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        results[how] = run.stdout.strip().splitlines()[-1]
    assert results["tool"] != "nan" and float(results["tool"]) < 0.01
    wrong = results["amx"] == "nan" or float(results["amx"]) > 0.1
    assert wrong, "oneDNN's AMX kernel now computes it right: amx_off_for_bf16 may go"


def test_explicit_bf16_or_amp_without_native_support_runs_after_one_warning(capsys):
    dtype, out, err = choose(["--dtype", "bf16"], AVX2, capsys)
    assert dtype == "bf16" and out == []
    assert len(err) == 1 and err[0].startswith("warning: --dtype bf16: this CPU has no native bf16")
    assert choose(["--dtype", "bf16"], AVX512_BF16, capsys) == ("bf16", [], [])
    assert choose(["--dtype", "fp32"], AVX2, capsys) == ("fp32", [], [])
    _, _, err = choose(["--use_amp"], AVX2, capsys)
    assert len(err) == 1
    assert err[0].startswith("warning: --use_amp: this CPU has no AVX512_FP16 or AMX-FP16")
    assert f"took {FP16_CPU_SLOWDOWN['other']} an fp32 one" in err[0]
    assert choose(["--use_amp"], Device("gpu", capability=(7, 0)), capsys)[2] == []


def test_amp_on_a_cpu_with_avx512_fp16_warns_with_the_measured_slowdown(capsys):
    # AVX512_FP16 without AMX-FP16: TensorFlow's float16 weight gradients run oneDNN's reference
    # kernel. bf16 stays native there, and AMX-FP16 has kernels for all three passes.
    sapphire_rapids = Device("cpu", SAPPHIRE_RAPIDS_FLAGS.split())
    dtype, out, err = choose(["--use_amp"], sapphire_rapids, capsys)
    assert dtype == "fp16" and out == [] and len(err) == 1
    assert err[0].startswith("warning: --use_amp: this CPU has AVX512_FP16 but no AMX-FP16")
    assert f"took {FP16_CPU_SLOWDOWN['avx512_fp16']} an fp32 one" in err[0]
    assert err[0].endswith("; leave out --use_amp")
    assert choose([], sapphire_rapids, capsys)[0] == "fp32"  # AMX: bf16 is not the default
    granite_rapids = Device("cpu", SAPPHIRE_RAPIDS_FLAGS.split() + ["amx_fp16"])
    assert choose(["--use_amp"], granite_rapids, capsys) == ("fp16", [], [])


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(str(x86)) == {"fpu", "avx2", "avx512_bf16"}
    assert Device("cpu", cpu_flags(str(arm))).native("bf16")[0]
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_the_run_says_which_dtype_it_chose(records, tmp_path, capsys):
    try:
        result = main_here(capsys, "--data_dir", records, "--num_folds", "3", "--exec_mode", "evaluate",
                           "--model_dir", str(tmp_path / "m"), "--log_dir", str(tmp_path / "l"))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    # What the tool chooses on the CPU this test runs on (the choice itself is checked above).
    expected = choose_dtype(parse_args([]).precision, Device("cpu", cpu_flags()))
    capsys.readouterr()
    chosen = [line for line in result.stdout.splitlines() if "chosen:" in line]
    assert len(chosen) == 1 and chosen[0].startswith(f"--dtype {expected} chosen: ")
    assert_one_line_error(result, "no checkpoint")  # the notice went to stdout, not stderr
