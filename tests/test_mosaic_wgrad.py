"""The weight-gradient kernel of runtime/engines/mosaic_wgrad.py against XLA's, on the CPU, and how
runtime/engines/mosaic_conv.py routes each convolution's passes to the kernels.

The kernel targets Hopper GPUs (TMA copies, wgmma with a transposed operand); here it runs in Pallas'
GPU interpreter, which has no transposed wgmma operand, so the kernel copies that operand transposed
first when interpreted (the same sums). bench/wgrad_bench.py checks it against cuDNN on a GPU.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runtime.engines import mosaic_conv, mosaic_wgrad

pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: E402

INTERPRET = InterpretGPUParams()
# one volume of 2 planes of 4 rows of 64 voxels: with 2 rows a program, each plane is split in two
# and each depth tap meets a face of the volume
SHAPE = (1, 2, 4, 64)


def _case(c_in, c_out, seed=0):
    """bf16 x and output gradient, and XLA's kernel gradient of them in float32."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(SHAPE + (c_in,)), jnp.bfloat16)
    grad = jnp.asarray(rng.standard_normal(SHAPE + (c_out,)), jnp.bfloat16)
    kernel = jnp.zeros((3, 3, 3, c_in, c_out), jnp.float32)
    dw = jax.vjp(lambda k: mosaic_conv.xla_convolution(x.astype(jnp.float32), k), kernel)[1](
        grad.astype(jnp.float32))[0]
    return x, grad, dw


def _relative(value, expected):
    return float(jnp.max(jnp.abs(value.astype(jnp.float32) - expected)) / jnp.max(jnp.abs(expected)))


@pytest.mark.parametrize("c_in, c_out", [(32, 32), (64, 32), (32, 4), (8, 32)])
def test_weight_gradient_matches_xla(c_in, c_out):
    """32 → 32 (the input row as wgmma's B), 64 → 32 (as its transposed A), 32 → 4 (the output
    gradient padded to 16 channels), 8 → 32 (the padded image, its input padded to 16 channels):
    float32 sums of the same bf16 products as XLA's."""
    x, grad, dw = _case(c_in, c_out)
    value = mosaic_wgrad.weight_grad(x, grad, rows=2, interpret=INTERPRET)
    assert value.dtype == jnp.float32 and value.shape == (3, 3, 3, c_in, c_out)
    assert _relative(value, dw) < 1e-5


def test_the_kernel_gradient_alone_on_the_kernel():
    """The 64 → 32 convolution after the skip concatenation: XLA's forward pass and input gradient,
    the kernel's weight gradient (the routing's (False, True) entry)."""
    x, grad, dw = _case(64, 32, seed=1)
    kernel = jnp.asarray(np.random.default_rng(2).standard_normal((3, 3, 3, 64, 32)) / 40, jnp.bfloat16)
    conv = mosaic_conv.kernel_convolution(None, None, functools.partial(mosaic_wgrad.weight_grad, rows=2,
                                                                         interpret=INTERPRET))
    value, vjp = jax.vjp(conv, x, kernel)
    x_grad, kernel_grad = vjp(grad)
    reference, reference_vjp = jax.vjp(mosaic_conv.xla_convolution, x, kernel)
    assert jnp.array_equal(value, reference)
    assert jnp.array_equal(x_grad, reference_vjp(grad)[0])
    assert kernel_grad.dtype == jnp.bfloat16 and _relative(kernel_grad, dw) < 2 ** -7


def test_shapes_the_weight_gradient_kernel_does_not_take_are_refused():
    x, grad, _ = _case(32, 32)
    with pytest.raises(ValueError, match="W a multiple of 64 up to 256; got 32"):
        mosaic_wgrad.weight_grad(x[..., :32, :], grad[..., :32, :], interpret=INTERPRET)
    with pytest.raises(ValueError, match="c_in up to 32 or 64, c_out up to 32; got 48, 32"):
        mosaic_wgrad.weight_grad(jnp.zeros(SHAPE + (48,), jnp.bfloat16), grad, interpret=INTERPRET)
    assert mosaic_wgrad.takes((2, 128, 128, 128, 64), 32)
    assert not mosaic_wgrad.takes((2, 128, 128, 128, 64), 64)
    assert not mosaic_wgrad.takes((1, 224, 224, 160, 32), 32)
    assert not mosaic_wgrad.takes((2, None, None, None, 32), 32)


def test_each_convolution_of_the_128_level_is_routed_to_its_kernels():
    """(forward and input gradient on the kernel, weight gradient on the kernel) per call of UNet3D's
    128³ level; convolutions neither kernel takes, and float32 calls, stay Keras's."""
    convs = {key: functools.partial(lambda key, x, kernel: key, key) for key in mosaic_conv.CONVOLUTIONS}
    implementation = mosaic_conv.routed_implementation_of(convs, mosaic_conv.takes, mosaic_conv.weight_grad_takes)

    def route(c_in, c_out, edge=128, dtype=jnp.bfloat16, batch=2):
        x = jax.ShapeDtypeStruct((batch, edge, edge, edge, c_in), dtype)
        return implementation(x, jnp.zeros((3, 3, 3, c_in, c_out), jnp.float32))

    assert route(32, 32) == (True, True)    # input_1, up4_1
    assert route(32, 4) == (True, True)     # output
    assert route(8, 32) == (True, False)    # input_0 (the image padded to 8 channels): cuDNN's weight gradient
    assert route(8, 32, batch=4) == (True, True)  # ... up to batch 3; the kernel's from batch 4
    assert route(64, 32) == (False, True)   # up4_0, after the skip concatenation
    assert route(64, 64, edge=64) is None   # the 64³ level
    assert route(32, 32, dtype=jnp.float32) is None
    # over two GPUs the batch each one computes decides: 4 is 2 a GPU, 8 is 4
    on_two = mosaic_conv.with_batch_of(mosaic_conv.weight_grad_takes, 2)
    assert not on_two((4, 128, 128, 128, 8), 32) and on_two((8, 128, 128, 128, 8), 32)
    assert not on_two((3, 128, 128, 128, 32), 32)
