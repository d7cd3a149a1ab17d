"""The Pallas convolution kernels of bench/pallas_conv3d.py against XLA's convolution, on the CPU.

The kernels target Triton on NVIDIA GPUs; here they run in Pallas' interpreter (`interpret=True`),
which executes the same kernel bodies with jnp. The interpreter reads from a copy of the input
padded with a halo (it clamps reads that start before an array, Triton masks them), so the GPU
path's unpadded addressing is checked by bench/pallas_conv.py, which prints each kernel's
difference from cuDNN on the H100.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import pallas_conv3d as kernels

# Two volumes of 3 planes of 6×8 voxels: with 16-voxel blocks each plane spans three blocks, and
# every tap meets the volume's faces, edges and corners as well as its interior.
SHAPE = (2, 3, 6, 8)


@pytest.fixture(scope="module")
def case():
    """x, kernel, output gradient, and XLA's output and gradients, in float32."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(SHAPE + (16,)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 16, 8)) / 12, jnp.float32)
    grad = jnp.asarray(rng.standard_normal(SHAPE + (8,)), jnp.float32)
    y, vjp = jax.vjp(kernels.reference, x, kernel)
    dx, dw = vjp(grad)
    return x, kernel, grad, y, dx, dw


def _relative(value, expected):
    return float(jnp.max(jnp.abs(value - expected)) / jnp.max(jnp.abs(expected)))


@pytest.mark.parametrize("loop", [False, True])
def test_forward_and_data_gradient_match_xla(case, loop):
    x, kernel, grad, y, dx, _ = case
    assert _relative(kernels.forward(x, kernel, block_m=16, loop=loop, interpret=True), y) < 1e-6
    assert _relative(kernels.data_grad(grad, kernel, block_m=16, loop=loop, interpret=True), dx) < 1e-6


@pytest.mark.parametrize("taps", [1, 9])
def test_weight_gradient_matches_xla(case, taps):
    x, _, grad, _, _, dw = case
    assert _relative(kernels.weight_grad(x, grad, block_m=16, taps=taps, interpret=True), dw) < 1e-6


def test_gathered_kernels_match_xla(case):
    x, kernel, grad, y, _, dw = case
    assert _relative(kernels.gathered_forward(x, kernel, block_m=16, taps=4, interpret=True), y) < 1e-6
    # 8 taps a group: the fourth group holds the 27th tap and five masked ones.
    assert _relative(kernels.gathered_weight_grad(x, grad, block_m=16, taps=8, interpret=True), dw) < 1e-6


def test_bf16_forward_within_bf16_rounding(case):
    x, kernel, _, _, _, _ = case
    xb = x.astype(jnp.bfloat16)
    expected = kernels.reference(xb.astype(jnp.float32), kernel.astype(jnp.bfloat16).astype(jnp.float32))
    value = kernels.forward(xb, kernel, block_m=16, loop=True, interpret=True)
    assert value.dtype == jnp.bfloat16
    assert _relative(value.astype(jnp.float32), expected) < 2 ** -7


def test_block_size_must_divide_the_plane(case):
    x, kernel, _, _, _, _ = case
    with pytest.raises(ValueError, match="H·W = 48 is not a multiple of block_m = 32"):
        kernels.forward(x, kernel, block_m=32, interpret=True)
