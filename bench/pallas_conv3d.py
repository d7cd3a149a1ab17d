"""3×3×3 stride-1 'same' convolutions as Pallas (Triton) kernels, tried against cuDNN; not used by the tool.

Channels-last, like the rest of the tool. `forward` is an implicit matrix product: a program owns
`block_m` consecutive voxels of one depth plane (H·W flattened) and adds, for each of the 27 taps,
the product of the shifted input rows (block_m × c_in, read straight from the input with the
voxels outside the volume masked to zero) and that tap's c_in × c_out kernel slice. `data_grad`
is `forward` on the output gradient with the kernel flipped and its channel axes swapped;
`weight_grad` sums shifted input rows against output-gradient rows over one depth plane per
program, and XLA adds the planes' partial sums. The `gathered_` variants gather several taps into
one wider operand per product. On an H100 (bench/pallas_conv.py, docs/performance.md) the best of
them match cuDNN on the forward pass and the data gradient and lose on the weight gradient, so the
tool does not use them (on a Hopper GPU it uses runtime/mosaic_conv.py, a Mosaic GPU kernel). JAX
0.11 deprecates Pallas' Triton backend. tests/test_pallas_conv.py checks every kernel in Pallas' interpreter on the CPU.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from runtime.mosaic_conv import xla_convolution


def _with_halo(x, halo):
    """x as (N, D, H·W, C); with `halo`, W + 1 zero voxels before and after each plane, so that
    every shifted row block a kernel reads lies inside the array. Triton's masked loads need no
    halo; Pallas' interpreter (CPU tests) clamps reads that start before the array, so it does."""
    n, depth, height, width, c = x.shape
    x = x.reshape(n, depth, height * width, c)
    return jnp.pad(x, ((0, 0), (0, 0), (width + 1,) * 2, (0, 0))) if halo else x


def _block_size(plane, block_m):
    """The voxels per program: `block_m`, or the whole plane where it is smaller; must divide H·W."""
    block_m = min(block_m, plane)
    if plane % block_m:
        raise ValueError(f"H·W = {plane} is not a multiple of block_m = {block_m}")
    return block_m


def _per_plane_blocks(body, x, kernel, c_out, block_m, num_warps, num_stages, interpret):
    """Run a forward-type kernel `body` on a grid of (depth plane, block of block_m voxels), each
    program writing its block of the (N, D, H, W, c_out) output."""
    n, depth, height, width, _ = x.shape
    plane = height * width
    out = pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct((n * depth, plane, c_out), x.dtype),
        grid=(n * depth, plane // block_m),
        out_specs=pl.BlockSpec((None, block_m, c_out), lambda p, b: (p, b, 0)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(_with_halo(x, bool(interpret)), kernel)
    return out.reshape(n, depth, height, width, c_out)


def _per_plane_sums(body, x, grad, taps, block_m, num_warps, num_stages, interpret):
    """Run a weight-gradient kernel `body` on a grid of (group of `taps` taps, depth plane), each
    program writing its plane's (taps·c_in, c_out) sums, and add the planes: (3, 3, 3, c_in, c_out)."""
    n, depth, height, width, c_in = x.shape
    c_out = grad.shape[-1]
    groups = -(-27 // taps)
    partial = pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct((groups, n * depth, taps * c_in, c_out), jnp.float32),
        grid=(groups, n * depth),
        out_specs=pl.BlockSpec((None, None, taps * c_in, c_out), lambda g, p: (g, p, 0, 0)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(_with_halo(x, bool(interpret)), grad.astype(x.dtype).reshape(n, depth, height * width, c_out))
    flat = partial.sum(axis=1).reshape(groups * taps, c_in, c_out)[:27]
    return flat.reshape(3, 3, 3, c_in, c_out)


def _tap(tap, d, h, w, depth, height, width):
    """(input depth, row offset, mask) of kernel tap `tap` (0..26) for the voxels (d, h[i], w[i])."""
    # lax's division: jnp's floor division of a scalar loop index does not lower to Triton here
    kd, kh, kw = jax.lax.div(tap, 9), jax.lax.rem(jax.lax.div(tap, 3), 3), jax.lax.rem(tap, 3)
    dd, hh, ww = d + kd - 1, h + kh - 1, w + kw - 1
    ok = (dd >= 0) & (dd < depth) & (hh >= 0) & (hh < height) & (ww >= 0) & (ww < width)
    return jnp.clip(dd, 0, depth - 1), (kh - 1) * width + kw - 1, ok


def _forward_kernel(x_ref, w_ref, o_ref, *, depth, height, width, block_m, halo, loop):
    plane, block = pl.program_id(0), pl.program_id(1)
    n, d = plane // depth, plane % depth
    m0 = block * block_m
    m = m0 + jnp.arange(block_m)
    h, w = m // width, m % width
    base = m0 + (width + 1 if halo else 0)

    def add_tap(tap, acc):
        dd, shift, ok = _tap(tap, d, h, w, depth, height, width)
        rows = plgpu.load(x_ref.at[n, dd, pl.ds(base + shift, block_m), :], mask=ok[:, None], other=0)
        return acc + jnp.dot(rows, w_ref[tap], preferred_element_type=jnp.float32)

    acc = jnp.zeros((block_m, o_ref.shape[-1]), jnp.float32)
    if loop:
        acc = jax.lax.fori_loop(0, 27, add_tap, acc)
    else:
        for tap in range(27):
            acc = add_tap(tap, acc)
    o_ref[...] = acc.astype(o_ref.dtype)


def forward(x, kernel, *, block_m=256, num_warps=4, num_stages=1, loop=False, interpret=False):
    """conv3d(x, kernel), stride 1, 'same' padding: x (N, D, H, W, c_in), kernel (3, 3, 3, c_in, c_out).

    The product runs in the dtype of `x` with float32 sums; the result has the dtype of `x`.
    With `loop`, the 27 taps are a loop Triton can pipeline (`num_stages`) instead of unrolled.
    """
    _, depth, height, width, c_in = x.shape
    c_out = kernel.shape[-1]
    block_m = _block_size(height * width, block_m)
    body = functools.partial(_forward_kernel, depth=depth, height=height, width=width, block_m=block_m,
                             halo=bool(interpret), loop=loop)
    return _per_plane_blocks(body, x, kernel.astype(x.dtype).reshape(27, c_in, c_out), c_out, block_m,
                             num_warps, num_stages, interpret)


def _weight_grad_kernel(x_ref, g_ref, o_ref, *, depth, height, width, block_m, taps, halo):
    group, plane = pl.program_id(0), pl.program_id(1)
    n, d = plane // depth, plane % depth
    c_in, c_out = x_ref.shape[-1], o_ref.shape[-1]

    def step(block, sums):
        m0 = pl.multiple_of(block * block_m, block_m)
        m = m0 + jnp.arange(block_m)
        h, w = m // width, m % width
        base = m0 + (width + 1 if halo else 0)
        grads = g_ref[n, d, pl.ds(m0, block_m), :]
        new = []
        for j in range(taps):
            dd, shift, ok = _tap(group * taps + j, d, h, w, depth, height, width)
            rows = plgpu.load(x_ref.at[n, dd, pl.ds(base + shift, block_m), :], mask=ok[:, None], other=0)
            new.append(sums[j] + plgpu.dot(rows, grads, trans_a=True))
        return tuple(new)

    zeros = tuple(jnp.zeros((c_in, c_out), jnp.float32) for _ in range(taps))
    sums = jax.lax.fori_loop(0, height * width // block_m, step, zeros)
    for j in range(taps):
        o_ref[pl.ds(j * c_in, c_in), :] = sums[j]


def weight_grad(x, grad, *, block_m=128, taps=9, num_warps=4, num_stages=1, interpret=False):
    """The gradient of `forward`'s kernel, (3, 3, 3, c_in, c_out) float32, from x and the output
    gradient. A program sums `taps` taps over one depth plane; XLA adds the planes."""
    _, depth, height, width, _ = x.shape
    block_m = _block_size(height * width, block_m)
    body = functools.partial(_weight_grad_kernel, depth=depth, height=height, width=width,
                             block_m=block_m, taps=taps, halo=bool(interpret))
    return _per_plane_sums(body, x, grad, taps, block_m, num_warps, num_stages, interpret)


def _tap_group(group, taps, d, m, depth, height, width, c):
    """Row and channel indices (block_m, taps·c) of kernel taps group·taps ... group·taps + taps - 1
    and their mask (taps past the 27th are masked): column k holds channel k % c of tap k // c."""
    k = jnp.arange(taps * c)
    tap = group * taps + k // c
    kd, kh, kw = tap // 9, tap // 3 % 3, tap % 3
    h, w = (m // width)[:, None] + kh[None, :] - 1, (m % width)[:, None] + kw[None, :] - 1
    dd = d + kd - 1
    ok = (tap < 27) & (dd >= 0) & (dd < depth) & (h >= 0) & (h < height) & (w >= 0) & (w < width)
    rows = m[:, None] + ((kh - 1) * width + kw - 1)[None, :]
    return jnp.clip(dd, 0, depth - 1)[None, :], rows, jnp.broadcast_to((k % c)[None, :], rows.shape), ok


def _load_tap_group(x_ref, n, group, taps, d, m, depth, height, width, halo):
    """The (block_m, taps·c) operand of `_tap_group`'s taps read from volume `n`, zero where masked."""
    dd, rows, cols, ok = _tap_group(group, taps, d, m, depth, height, width, x_ref.shape[-1])
    index = (jnp.full(rows.shape, n), jnp.broadcast_to(dd, rows.shape), rows + (width + 1 if halo else 0), cols)
    return plgpu.load(x_ref.at[index], mask=ok, other=0)


def _grouped_kernel(kernel, taps):
    """(3, 3, 3, c_in, c_out) as (groups, taps·c_in, c_out), zero rows past the 27th tap."""
    c_in, c_out = kernel.shape[-2:]
    groups = -(-27 // taps)
    flat = jnp.pad(kernel.reshape(27, c_in, c_out), ((0, groups * taps - 27), (0, 0), (0, 0)))
    return flat.reshape(groups, taps * c_in, c_out)


def _gathered_forward_kernel(x_ref, w_ref, o_ref, *, depth, height, width, block_m, taps, halo):
    plane, block = pl.program_id(0), pl.program_id(1)
    n, d = plane // depth, plane % depth
    m = block * block_m + jnp.arange(block_m)

    def add_group(group, acc):
        operand = _load_tap_group(x_ref, n, group, taps, d, m, depth, height, width, halo)
        return acc + jnp.dot(operand, w_ref[group], preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, w_ref.shape[0], add_group, jnp.zeros((block_m, o_ref.shape[-1]), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def gathered_forward(x, kernel, *, block_m=128, taps=4, num_warps=4, num_stages=2, interpret=False):
    """`forward` with `taps` kernel taps gathered into one (block_m, taps·c_in) operand per product
    (a power of two; the last group is padded with masked taps)."""
    _, depth, height, width, _ = x.shape
    c_out = kernel.shape[-1]
    block_m = _block_size(height * width, block_m)
    body = functools.partial(_gathered_forward_kernel, depth=depth, height=height, width=width,
                             block_m=block_m, taps=taps, halo=bool(interpret))
    return _per_plane_blocks(body, x, _grouped_kernel(kernel.astype(x.dtype), taps), c_out, block_m,
                             num_warps, num_stages, interpret)


def _gathered_weight_grad_kernel(x_ref, g_ref, o_ref, *, depth, height, width, block_m, taps, halo):
    group, plane = pl.program_id(0), pl.program_id(1)
    n, d = plane // depth, plane % depth

    def step(block, acc):
        m0 = pl.multiple_of(block * block_m, block_m)
        m = m0 + jnp.arange(block_m)
        operand = _load_tap_group(x_ref, n, group, taps, d, m, depth, height, width, halo)
        return acc + plgpu.dot(operand, g_ref[n, d, pl.ds(m0, block_m), :], trans_a=True)

    o_ref[...] = jax.lax.fori_loop(0, height * width // block_m, step, jnp.zeros(o_ref.shape, jnp.float32))


def gathered_weight_grad(x, grad, *, block_m=64, taps=4, num_warps=4, num_stages=2, interpret=False):
    """`weight_grad` with `taps` kernel taps gathered: one product to a (taps·c_in, c_out) sum per
    program and block."""
    _, depth, height, width, _ = x.shape
    block_m = _block_size(height * width, block_m)
    body = functools.partial(_gathered_weight_grad_kernel, depth=depth, height=height, width=width,
                             block_m=block_m, taps=taps, halo=bool(interpret))
    return _per_plane_sums(body, x, grad, taps, block_m, num_warps, num_stages, interpret)


def data_grad(grad, kernel, **options):
    """The gradient of `forward`'s input: the forward convolution of the output gradient with the
    kernel flipped in space and its two channel axes swapped."""
    return forward(grad, jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4), **options)


# The same convolution through XLA (cuDNN on a GPU), in the dtype of `x`.
reference = xla_convolution
