"""Convolution implementations for UNet3D's KernelConv3D layers, to compare them in the training step.

`implementation(kind)` gives what `build_unet3d(conv_implementation=...)` takes: `xla` None (Keras's
convolution everywhere), `mosaic` the tool's Mosaic GPU kernel (runtime/mosaic_conv.py, which the
tool uses on a Hopper GPU), `triton` the Pallas (Triton) kernels of bench/pallas_conv3d.py for the
32 → 32 convolutions, where they came closest to cuDNN (docs/performance.md). Both kernels compute
the forward pass and the input gradient, XLA the kernel gradient.
"""
from bench import pallas_conv3d
from runtime import mosaic_conv

KINDS = ("xla", "triton", "mosaic")

_TRITON_OPTIONS = dict(block_m=256, num_warps=4, num_stages=2, loop=True)
_triton_convolution = mosaic_conv.kernel_convolution(
    lambda x, k: pallas_conv3d.forward(x, k, **_TRITON_OPTIONS),
    lambda g, k: pallas_conv3d.data_grad(g, k, **_TRITON_OPTIONS))


def _triton_takes(shape, c_out):
    """32 → 32 calls whose planes split into 256-voxel blocks."""
    _, _, height, width, c_in = shape
    return None not in (height, width) and (c_in, c_out) == (32, 32) and (height * width) % 256 == 0


_triton = mosaic_conv.layer_implementation_of(_triton_convolution, _triton_takes)


def implementation(kind):
    """The conv_implementation of `kind` (one of KINDS)."""
    if kind not in KINDS:
        raise ValueError(f"unknown convolution kernel {kind!r}; choose one of {KINDS}")
    return {"xla": None, "triton": _triton, "mosaic": mosaic_conv.layer_implementation}[kind]
