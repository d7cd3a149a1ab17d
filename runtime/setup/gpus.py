"""NVIDIA GPUs the machine has but the backend in use cannot compute on (a CPU-only TensorFlow
or JAX install on a GPU machine): the run says so in one line instead of crawling silently."""
import os
from typing import Optional

# The NVIDIA driver lists each GPU as a folder named by its PCI bus id, with an `information` file.
DRIVER_LISTING = "/proc/driver/nvidia/gpus"
INSTALLS = {"tensorflow": "a TensorFlow without its CUDA libraries",
            "jax": "a JAX without its CUDA plugin"}


def nvidia_gpus(listing: Optional[str] = None) -> list[str]:
    """The model name of each GPU the NVIDIA driver lists (in `listing`, default the driver's
    folder; its bus id where the name is unreadable); empty without the driver."""
    listing = listing or DRIVER_LISTING
    try:
        buses = sorted(os.listdir(listing))
    except OSError:
        return []
    names = []
    for bus in buses:
        name = bus
        try:
            with open(os.path.join(listing, bus, "information")) as handle:
                for line in handle:
                    key, _, value = line.partition(":")
                    if key.strip() == "Model" and value.strip():
                        name = value.strip()
        except OSError:
            pass
        names.append(name)
    return names


def unused_gpu_notice(backend: str, device_kind: str, gpus: list[str],
                      cuda_visible: Optional[str]) -> Optional[str]:
    """The line to print when the machine has NVIDIA GPUs, the run computes on the CPU and the
    user did not hide them (CUDA_VISIBLE_DEVICES empty or -1); None otherwise."""
    if device_kind != "cpu" or not gpus or (cuda_visible is not None
                                            and cuda_visible.strip() in ("", "-1")):
        return None
    listed = ", ".join(sorted(set(gpus)))
    return (f"notice: this machine has {len(gpus)} NVIDIA GPU(s) ({listed}), but the {backend} "
            f"backend sees none and runs on the CPU, as {INSTALLS[backend]} does; install "
            "requirements-gpu.txt to train on the GPU (docs/precision.md)")
