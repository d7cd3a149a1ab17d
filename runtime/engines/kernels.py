"""Which implementation computes a layer besides Keras's own, per backend and device."""
from __future__ import annotations

from typing import Any, Callable, Optional


def conv_implementation(machine: Any) -> Optional[Callable]:
    """What computes UNet3D's 3×3×3 convolutions besides Keras: with --conv_kernel auto, bf16 and
    the JAX backend on Hopper GPUs in one process, runtime/engines/mosaic_conv.py's kernels (with a one-line notice;
    runtime/engines/mosaic_wgrad.py computes the kernel gradients it routes there);
    else None, Keras's convolution everywhere."""
    if machine.conv_kernel != "auto" or machine.backend != "jax" or machine.dtype != "bf16":
        return None
    try:
        from runtime.engines.mosaic_conv import hopper_convolution
    except ImportError:  # a JAX without Pallas' Mosaic GPU backend
        return None
    implementation = hopper_convolution()
    if implementation is not None:
        print("--conv_kernel auto: the bf16 3×3×3 convolutions of up to 32 channels run on the tool's "
              "Mosaic GPU kernels, and the kernel gradients of the 128³ level's 32→32, 64→32 and "
              "32→classes convolutions, and of the image's from batch 4 per GPU (--conv_kernel keras "
              "for XLA's)", flush=True)
    return implementation
