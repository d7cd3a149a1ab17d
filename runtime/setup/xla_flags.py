"""XLA options the tool sets before TensorFlow or JAX start XLA."""
import os

CHANNELS_LAST = "--xla_gpu_force_conv_nhwc=true"


def prefer_channels_last_convolutions(environ=os.environ):
    """Ask XLA for channels-last (NDHWC) cuDNN convolutions unless XLA_FLAGS already chooses a layout.

    On Hopper GPUs XLA lays 3-D convolutions out channels-first by default, and cuDNN's fast
    kernels then convert every operand to channels-last and back around each call: more than a
    quarter of UNet3D's bf16 training step on an H200. CPUs ignore the option. Returns XLA_FLAGS.
    """
    flags = environ.get("XLA_FLAGS", "")
    if "xla_gpu_force_conv_nhwc" not in flags and "xla_gpu_force_conv_nchw" not in flags:
        environ["XLA_FLAGS"] = f"{flags} {CHANNELS_LAST}".strip()
    return environ["XLA_FLAGS"]
