"""The Mosaic GPU convolution kernel of runtime/engines/mosaic_conv.py against XLA's convolution, on the CPU.

The kernel targets Hopper GPUs (TMA copies, wgmma); here it runs, unchanged, in Pallas' GPU
interpreter, which simulates its shared memory, barriers, copies and matrix products with NumPy.
bench/pallas_conv.py prints the kernel's difference from cuDNN on the H100, and
bench/step_profile.py --loss_check compares 50 training losses with XLA's convolutions there.
"""
import types
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runtime.engines import mosaic_conv, mosaic_wgrad
from runtime.engines.kernels import conv_implementation
from tests.conftest import ROOT

pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: E402

# Two volumes of 2 planes of 4 rows of 64 voxels, 32 channels in and out: every tap meets the
# volume's faces, and with 4 rows a program the ring of 4 input rows is reused.
SHAPE = (2, 2, 4, 64)
INTERPRET = InterpretGPUParams()


def _case(c_in, c_out, shape=SHAPE):
    """bf16 x, kernel and output gradient, and XLA's output and gradients of them in float32."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape + (c_in,)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, c_in, c_out)) / np.sqrt(27 * c_in), jnp.bfloat16)
    grad = jnp.asarray(rng.standard_normal(shape + (c_out,)), jnp.bfloat16)
    as32 = [a.astype(jnp.float32) for a in (x, kernel, grad)]
    y, vjp = jax.vjp(mosaic_conv.xla_convolution, as32[0], as32[1])
    dx, dw = vjp(as32[2])
    return x, kernel, grad, y, dx, dw


@pytest.fixture(scope="module")
def case():
    """The 32 → 32 case."""
    return _case(32, 32)


def _relative(value, expected):
    return float(jnp.max(jnp.abs(value.astype(jnp.float32) - expected)) / jnp.max(jnp.abs(expected)))


def test_forward_and_data_gradient_match_xla(case):
    x, kernel, grad, y, dx, _ = case
    value = mosaic_conv.forward(x, kernel, rows=4, interpret=INTERPRET)
    assert value.dtype == jnp.bfloat16 and value.shape == SHAPE + (32,)
    assert _relative(value, y) < 2 ** -7  # bf16 rounding of the output
    # rows=3 does not divide H = 4: a program computes gcd(3, 4) = 1 row
    assert _relative(mosaic_conv.data_grad(grad, kernel, rows=3, interpret=INTERPRET), dx) < 2 ** -7


@pytest.mark.parametrize("c_in, c_out", [(32, 4), (8, 32)])
def test_channels_padded_to_16_give_the_same_convolution(c_in, c_out):
    """UNet3D's last convolution (32 → 4, and its data gradient 4 → 32) and its first one (the image,
    padded to 8 channels on a GPU): the kernel pads the channels to 16 and crops the result."""
    x, kernel, grad, y, dx, _ = _case(c_in, c_out, shape=(1, 2, 2, 64))
    value = mosaic_conv.forward(x, kernel, rows=2, interpret=INTERPRET)
    assert value.shape == y.shape and _relative(value, y) < 2 ** -7
    assert _relative(mosaic_conv.data_grad(grad, kernel, rows=1, interpret=INTERPRET), dx) < 2 ** -7


def test_kernel_gradients_in_the_step_match_xla(case):
    """The custom gradient the layers get: every pass on the kernels (forward, data gradient, and
    runtime/engines/mosaic_wgrad.py's weight gradient; tests/test_mosaic_wgrad.py checks that one alone)."""
    x, kernel, grad, y, dx, dw = case
    conv = mosaic_conv.kernel_convolution(functools.partial(mosaic_conv.forward, rows=4, interpret=INTERPRET),
                                          functools.partial(mosaic_conv.data_grad, rows=4, interpret=INTERPRET),
                                          functools.partial(mosaic_wgrad.weight_grad, rows=2, interpret=INTERPRET))
    value, vjp = jax.vjp(conv, x, kernel)
    x_grad, kernel_grad = vjp(grad)
    assert _relative(value, y) < 2 ** -7
    assert x_grad.dtype == jnp.bfloat16 and _relative(x_grad, dx) < 2 ** -7
    assert kernel_grad.dtype == jnp.bfloat16
    assert _relative(kernel_grad, dw) < 2 ** -7  # float32 sums of bf16 products, rounded to bf16


@pytest.mark.parametrize("c_in, c_out", [(32, 32), (32, 4)])
def test_a_row_of_160_voxels_runs_on_64_row_products(c_in, c_out):
    """The 224×224×160 evaluation window: W = 160 is not a multiple of wgmma's 64 rows, so the
    products run on 192 rows and the epilogue drops the rest; 32 → 32 keeps a ring of three input
    rows and one epilogue block to fit shared memory, 32 → 4 a ring of four and one block."""
    x, kernel, grad, y, dx, _ = _case(c_in, c_out, shape=(1, 1, 2, 160))
    value = mosaic_conv.forward(x, kernel, rows=2, interpret=INTERPRET)
    assert value.shape == y.shape and _relative(value, y) < 2 ** -7
    assert _relative(mosaic_conv.data_grad(grad, kernel, rows=2, interpret=INTERPRET), dx) < 2 ** -7


def test_shapes_the_kernel_does_not_take_are_refused(case):
    x, kernel, _, _, _, _ = case
    with pytest.raises(ValueError, match="W, the last spatial size, to be a multiple of 32 up to 256; got 48"):
        mosaic_conv.forward(x[..., :48, :], kernel, interpret=INTERPRET)
    assert mosaic_conv.takes((2, 128, 128, 128, 32), 32)
    assert mosaic_conv.takes((2, 128, 128, 128, 32), 4)
    assert mosaic_conv.takes((1, 224, 224, 160, 32), 32)
    assert not mosaic_conv.takes((2, 128, 128, 128, 64), 32)
    assert not mosaic_conv.takes((2, 64, 64, 48, 32), 32)
    assert not mosaic_conv.takes((1, 224, 224, 224, 32), 32)  # its rows do not fit shared memory
    assert not mosaic_conv.takes((2, None, None, None, 32), 32)


@pytest.mark.parametrize("flags", [dict(conv_kernel="keras"), dict(backend="tensorflow"), dict(dtype="fp32")])
def test_the_kernel_is_chosen_only_for_bf16_on_jax(flags):
    machine = types.SimpleNamespace(**{**dict(conv_kernel="auto", backend="jax", dtype="bf16"), **flags})
    assert conv_implementation(machine) is None  # and on this CPU the auto choice is None too


KERAS_LAYER = """
import functools, sys
import jax, jax.numpy as jnp, keras, numpy as np
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
from model.layers import KernelConv3D
from runtime.engines import mosaic_conv
assert mosaic_conv.hopper_convolution() is None  # a CPU: the tool keeps Keras's convolution
options = dict(rows=2, interpret=InterpretGPUParams())
conv = mosaic_conv.kernel_convolution(functools.partial(mosaic_conv.forward, **options),
                                      functools.partial(mosaic_conv.data_grad, **options))
calls = []
def implementation(inputs, kernel):
    if not mosaic_conv.takes(tuple(inputs.shape), kernel.shape[-1]) or None in inputs.shape:
        return None
    calls.append(tuple(inputs.shape))
    return conv(inputs, jnp.asarray(kernel).astype(inputs.dtype))
keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
layers = [KernelConv3D(32, 3, padding="same", implementation=impl, name=f"conv{i}")
          for i, impl in enumerate((implementation, None))]
x = keras.random.normal((1, 2, 2, 64, 32), seed=1)
for layer in layers:
    layer.build(x.shape)
layers[1].set_weights(layers[0].get_weights())
def loss(variables, layer):
    y, _ = layer.stateless_call(variables, [], x)
    return jnp.sum(y.astype(jnp.float32) ** 2), y
results = [jax.value_and_grad(loss, has_aux=True)([v.value for v in l.trainable_variables], l) for l in layers]
(_, y_kernel), grads_kernel = results[0]
(_, y_keras), grads_keras = results[1]
def relative(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())
print("calls", len(calls), "output", relative(y_kernel, y_keras),
      "kernel_grad", relative(grads_kernel[0], grads_keras[0]), "bias_grad", relative(grads_kernel[1], grads_keras[1]))
"""


def test_a_keras_layer_computes_with_the_kernel_as_with_keras(jax_env):
    """KernelConv3D with the kernel as its implementation, under JAX and a bf16 policy: the same
    output and weight gradients as the same layer on Keras's convolution (a subprocess: the tests
    run Keras on TensorFlow)."""
    env = jax_env
    result = subprocess.run([sys.executable, "-c", KERAS_LAYER], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    words = result.stdout.split()
    values = dict(zip(words[::2], words[1::2]))
    assert int(values["calls"]) >= 1  # the layer called the kernel
    assert float(values["output"]) < 2 ** -7
    assert float(values["kernel_grad"]) < 2 ** -6 and float(values["bias_grad"]) < 2 ** -6


DATA_PARALLEL = """
import functools
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
from runtime.engines import mosaic_conv
# The interpreter's end-of-kernel check reads every device's shared memory, so with two devices
# interpreted at once it sees the other device's live barriers and fails; each device's barriers
# are still checked as the interpreter deallocates them.
gpu_callbacks._assert_no_barriers_allocated = lambda token: token
devices = jax.devices()
assert len(devices) == 2
options = dict(rows=2, interpret=InterpretGPUParams())
shares = []
def forward(x, kernel):
    shares.append(x.shape[0])
    return mosaic_conv.forward(x, kernel, **options)
conv = mosaic_conv.kernel_convolution(forward, functools.partial(mosaic_conv.data_grad, **options))
implementation = mosaic_conv.routed_implementation_of(
    {(True, False): mosaic_conv.sharded(conv, devices)},
    mosaic_conv.with_batch_of(mosaic_conv.takes, len(devices)), lambda shape, c_out: False)
rng = np.random.default_rng(0)
shape = (2, 2, 2, 64)
x = jnp.asarray(rng.standard_normal(shape + (32,)), jnp.bfloat16)
kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 32, 32)) / np.sqrt(27 * 32), jnp.bfloat16)
grad = jnp.asarray(rng.standard_normal(shape + (32,)), jnp.float32)
split = NamedSharding(Mesh(np.array(devices), ("batch",)), PartitionSpec("batch"))
def loss(conv, x, kernel):
    y = conv(x, kernel)
    return jnp.sum(y.astype(jnp.float32) * grad), y
step = jax.jit(jax.value_and_grad(functools.partial(loss, implementation), (0, 1), has_aux=True))
(_, y), (dx, dk) = step(jax.device_put(x, split), kernel)
(_, y_ref), (dx_ref, dk_ref) = jax.value_and_grad(functools.partial(loss, mosaic_conv.xla_convolution), (0, 1),
                                                  has_aux=True)(x.astype(jnp.float32), kernel.astype(jnp.float32))
def relative(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
print("share", shares[0], "devices", len(y.sharding.device_set), "output", relative(y, y_ref),
      "data_grad", relative(dx, dx_ref), "kernel_grad", relative(dk, dk_ref),
      "odd_batch_refused", implementation(x[:1], kernel) is None)
"""


def test_the_kernel_runs_on_each_devices_share_of_the_batch():
    """Two CPU devices, the kernel in Pallas' interpreter inside `sharded`: each device convolves its
    half of a batch of 2, and the output, the input gradient and the kernel gradient (summed over
    the devices) match XLA's convolution of the whole batch; a batch of 1 is left to Keras's."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run([sys.executable, "-c", DATA_PARALLEL], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    words = result.stdout.split()
    values = dict(zip(words[::2], words[1::2]))
    assert values["share"] == "1" and values["devices"] == "2"
    assert float(values["output"]) < 2 ** -7 and float(values["data_grad"]) < 2 ** -7
    assert float(values["kernel_grad"]) < 2 ** -6
    assert values["odd_batch_refused"] == "True"
