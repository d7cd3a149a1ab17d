"""The one-line notice for a GPU machine whose backend was installed without CUDA: only the
driver's device listing is faked (a folder laid out as /proc/driver/nvidia/gpus); the run, its
TensorFlow and its CPU are real."""
from runtime.setup import gpus
from tests.conftest import main_here, tiny_vnet_flags


def fake_driver_listing(root, models):
    """A folder laid out as the NVIDIA driver's: one folder per GPU with its `information`."""
    for i, model in enumerate(models):
        bus = root / f"0000:{i + 1:02x}:00.0"
        bus.mkdir(parents=True)
        (bus / "information").write_text(f"Model: \t\t {model}\nIRQ:   \t\t 42\n")
    return str(root)


def test_a_cpu_only_backend_on_a_gpu_machine_says_so(msd_phantom, tmp_path, monkeypatch, capsys):
    listing = fake_driver_listing(tmp_path / "gpus", ["NVIDIA H100 80GB HBM3"] * 2)
    monkeypatch.setattr(gpus, "DRIVER_LISTING", listing)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    # Predicting from an empty model_dir sets the machine up, then stops at the missing checkpoint.
    result = main_here(capsys, *tiny_vnet_flags(msd_phantom, tmp_path, "--exec_mode", "predict"))
    assert result.returncode == 1 and "no checkpoint" in result.stderr
    notices = [line for line in result.stdout.splitlines() if "NVIDIA GPU" in line]
    assert notices == [
        "notice: this machine has 2 NVIDIA GPU(s) (NVIDIA H100 80GB HBM3), but the tensorflow "
        "backend sees none and runs on the CPU, as a TensorFlow without its CUDA libraries does; "
        "install requirements-gpu.txt to train on the GPU (docs/precision.md)"]


def test_no_notice_without_the_driver_or_with_the_gpus_hidden(tmp_path):
    assert gpus.nvidia_gpus(str(tmp_path / "absent")) == []
    listing = fake_driver_listing(tmp_path / "gpus", ["NVIDIA H200"])
    assert gpus.nvidia_gpus(listing) == ["NVIDIA H200"]
    assert gpus.unused_gpu_notice("jax", "cpu", ["NVIDIA H200"], None).startswith(
        "notice: this machine has 1 NVIDIA GPU(s) (NVIDIA H200), but the jax backend")
    assert gpus.unused_gpu_notice("jax", "cpu", ["NVIDIA H200"], "") is None
    assert gpus.unused_gpu_notice("jax", "cpu", ["NVIDIA H200"], "-1") is None
    assert gpus.unused_gpu_notice("jax", "gpu", ["NVIDIA H200"], None) is None
    assert gpus.unused_gpu_notice("tensorflow", "cpu", [], None) is None
