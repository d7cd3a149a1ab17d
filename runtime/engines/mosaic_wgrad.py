"""The kernel gradient of a 3×3×3 stride-1 'same' convolution as a Pallas Mosaic GPU kernel (Hopper).

dW[kd, kh, kw, ci, co] = Σ over the voxels (n, d, h, w) of x[n, d+kd-1, h+kh-1, w+kw-1, ci] · g[n, d, h, w, co],
for channels-last x (the layer's input) and g (its output gradient). The sum runs over the W voxels
of a row as the contraction of one wgmma (K = W): a program owns one depth tap kd and the rows of
one output-gradient plane (n, d); for each row h it adds, for the three height taps kh, the product
of that row's three kw-shifted copies (built in shared memory, "g3": the column block kw holds
g[w - kw + 1]) with the input row (d + kd - 1, h + kh - 1), which TMA copies into a ring of rows.
Its float32 sums stay in registers until the plane ends; each program writes its partial kernel
gradient, and XLA adds the partials of the programs (the split reduction over voxel slabs).

Two operand layouts, by the input's channels:
- up to 32 (`x_is_a` False): A = g3ᵀ (the three kw blocks of c_out stacked on M, padded to a
  multiple of 64), B = the input row (N = c_in);
- 64 (`x_is_a` True): A = the input rowᵀ (M = c_in = 64), B = g3 (N = 3·c_out).
Channels are padded with zeros to 16 or 32 (a copy of x or g where they are not). Up to 32 input
channels a program keeps one g3 buffer, so that it needs 106 KB of shared memory at W = 128 and two
programs share an SM: one builds its g3 while the other's products run (at 64 input channels two
g3 buffers and one program an SM measured faster; docs/performance.md, "Hopper kernels").
tests/test_mosaic_wgrad.py
checks it in Pallas' GPU interpreter against XLA's gradient; bench/wgrad_bench.py times it on a GPU.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

RING = 5  # input rows in shared memory: three in use, one being fetched, one still read by the last step's products
TOP = 8   # zero rows above a row of g in its shared-memory copy (TMA writes it at a 128-byte-aligned row)


def _round_up(value, multiple):
    return -(-value // multiple) * multiple


def _operand(swizzle, dtype):
    """The tiling and swizzle wgmma needs on a shared-memory operand, for a swizzle in bytes."""
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def _body(x_gmem, g_gmem, out_gmem, x_smem, graw_smem, g3_smem, e_smem, x_bar, g_bar, *copy_smem,
          rows, depth, height, width, c_block, x_is_a, acc_shape, load):
    program = lax.axis_index("p")
    kd = program % 3
    rest = program // 3
    groups = height // rows
    plane, group = rest // groups, rest % groups
    n, d = plane // depth, plane % depth
    h0 = group * rows
    p = d + kd - 1  # the input plane of this depth tap
    valid = jnp.logical_and(p >= 0, p < depth)

    @pl.when(valid)
    def _():
        def fetch_x(j):
            """Input row h0 - 1 + j (clamped to the volume: its products are skipped) into slot j % RING."""
            slot = lax.rem(j, RING)
            h = jnp.clip(h0 - 1 + j, 0, height - 1)
            plgpu.copy_gmem_to_smem(x_gmem.at[n, p, h], x_smem.at[slot], x_bar.at[slot])

        def fetch_g(i):
            slot = lax.rem(i, 2)
            plgpu.copy_gmem_to_smem(g_gmem.at[n, d, h0 + i], graw_smem.at[slot, pl.ds(TOP, width)], g_bar.at[slot])

        c_g = graw_smem.shape[-1]
        for slot in range(2):  # rows that stay zero: g left of w = 0 and right of w = W - 1
            graw_smem[slot, pl.ds(0, TOP), :] = jnp.zeros((TOP, c_g), graw_smem.dtype)
            graw_smem[slot, pl.ds(TOP + width, 8), :] = jnp.zeros((8, c_g), graw_smem.dtype)
        fetch_g(0)
        for j in range(3):
            fetch_x(j)

        def products(*accs):
            def row(i, carry):
                # the products of step i - 2 (two g3 buffers) or i - 1 (one) are done: their g3 and
                # the oldest input row are free
                plgpu.wgmma_wait(3 if g3_smem.shape[0] == 2 else 0)

                @pl.when(i + 1 < rows)
                def _():
                    fetch_g(i + 1)
                    fetch_x(i + 3)

                slot = lax.rem(i, 2)
                plgpu.barrier_wait(g_bar.at[slot])
                g3 = g3_smem.at[lax.rem(i, g3_smem.shape[0])]
                for kw in range(3):  # g3[:, kw block] = g[w - kw + 1]
                    shifted = load(graw_smem.at[slot], (pl.ds(TOP - kw + 1, width), slice(None)))
                    g3[:, pl.ds(kw * c_block, c_block)] = shifted
                plgpu.commit_smem()
                plgpu.barrier_wait(x_bar.at[lax.rem(i + 2, RING)])
                h = h0 + i
                for kh in range(3):
                    def product(kh=kh):
                        x_row = x_smem.at[lax.rem(i + kh, RING)]
                        if x_is_a:
                            _mma_transposed_a(accs[kh], x_row, g3, copy_smem)
                        else:
                            _mma_transposed_a(accs[kh], g3, x_row, copy_smem)

                    if kh == 0:
                        pl.when(h > 0)(product)
                    elif kh == 2:
                        pl.when(h < height - 1)(product)
                    else:
                        product()
                return carry

            # the first input row was waited for by no step: wait for rows 0 and 1 here
            plgpu.barrier_wait(x_bar.at[0])
            plgpu.barrier_wait(x_bar.at[1])
            lax.fori_loop(0, rows, row, None)
            for kh in range(3):  # the partial sums of each height tap, through one float32 buffer
                if kh:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                e_smem[...] = accs[kh][...]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(e_smem, out_gmem.at[program, kh])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(products, *[plgpu.ACC(acc_shape, jnp.float32) for _ in range(3)])


def _mma_transposed_a(acc, a_t, b, copy_smem):
    """acc += a_tᵀ @ b, with a_t (K, M) and b (K, N) in shared memory: wgmma reads a_t transposed. Pallas'
    GPU interpreter has no transposed operands: there (`copy_smem` holds a scratch (M, K) buffer) a_tᵀ
    is first copied."""
    if not copy_smem:
        plgpu.wgmma(acc, plgpu.transpose_ref(a_t, (1, 0)), b)
        return
    (copy,) = copy_smem
    copy[...] = a_t[...].T
    plgpu.wgmma(acc, copy, b)


def _load_wgmma(ref, index):
    """ref[index] in registers laid out as wgmma's operands and accumulators."""
    return plgpu.load(ref, index, layout=plgpu.Layout.WGMMA, optimized=False)


def _load_interpreted(ref, index):
    """ref[index]: Pallas' GPU interpreter has no rule for plgpu.load, and needs no layout."""
    return ref[index]


def weight_grad(x: jax.Array, grad: jax.Array, *, rows: int | None = None, interpret: object = None) -> jax.Array:
    """The gradient of conv3d(x, kernel) (stride 1, 'same') with respect to its 3×3×3 kernel, for
    the output gradient `grad`: x (N, D, H, W, c_in), grad (N, D, H, W, c_out) -> (3, 3, 3, c_in, c_out).

    bf16 products with float32 sums (a float32 result). W must be a multiple of 64 and at most 256;
    c_in up to 32 or exactly 64, c_out up to 32. A program sums gcd(rows, H) rows of one plane
    (default: the whole plane) for one depth tap.
    """
    n, depth, height, width, c_in = x.shape
    c_out = grad.shape[-1]
    if grad.shape[:4] != x.shape[:4]:
        raise ValueError(f"x {x.shape} and its output gradient {grad.shape} differ in their voxels")
    if width % 64 or width > 256:
        raise ValueError(f"the weight-gradient kernel needs W a multiple of 64 up to 256; got {width}")
    if not (c_in <= 32 or c_in == 64) or c_out > 32:
        raise ValueError(f"the weight-gradient kernel takes c_in up to 32 or 64, c_out up to 32; got {c_in}, {c_out}")
    rows = math.gcd(rows or height, height)
    dtype = x.dtype
    x_is_a = c_in == 64
    k_in = 64 if x_is_a else _round_up(c_in, 16)
    k_out = _round_up(c_out, 16)
    # one swizzle for both operands: 64 bytes (32 bf16 a tile row) where every channel block is a multiple of 32
    c_block = 32 if (k_in % 32 == 0 and k_out % 32 == 0) else 16
    swizzle = c_block * jnp.dtype(dtype).itemsize
    if k_in != c_in:
        x = jnp.pad(x, ((0, 0),) * 4 + ((0, k_in - c_in),))
    grad = grad.astype(dtype)
    if k_out != c_out:
        grad = jnp.pad(grad, ((0, 0),) * 4 + ((0, k_out - c_out),))
    g3_width = 3 * k_out if x_is_a else _round_up(3 * k_out, 64)
    acc_shape = (k_in, 3 * k_out) if x_is_a else (g3_width, k_in)
    programs = 3 * n * depth * (height // rows)
    body = functools.partial(_body, rows=rows, depth=depth, height=height, width=width, c_block=k_out,
                             x_is_a=x_is_a, acc_shape=acc_shape,
                             load=_load_interpreted if interpret is not None else _load_wgmma)
    call = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((programs, 3) + acc_shape, jnp.float32),
        grid=(programs,),
        grid_names=("p",),
        scratch_types=[
            plgpu.SMEM((RING, width, k_in), dtype, transforms=_operand(swizzle, dtype)),
            plgpu.SMEM((2, TOP + width + 8, k_out), dtype),
            plgpu.SMEM((2 if x_is_a else 1, width, g3_width), dtype, transforms=_operand(swizzle, dtype)),
            plgpu.SMEM(acc_shape, jnp.float32),
            plgpu.Barrier(num_barriers=RING),
            plgpu.Barrier(num_barriers=2),
        ] + ([plgpu.SMEM(acc_shape[:1] + (width,), dtype)] if interpret is not None else []),
        interpret=interpret,
    )
    partials = call(x, grad).reshape((programs // 3, 3, 3) + acc_shape)
    # programs whose depth tap falls outside the volume wrote nothing: leave them out of the sum
    d = (jnp.arange(programs // 3) // (height // rows)) % depth
    kd = jnp.arange(3)
    inside = (d[:, None] + kd[None, :] - 1 >= 0) & (d[:, None] + kd[None, :] - 1 < depth)
    total = jnp.where(inside[:, :, None, None, None], partials, 0.0).sum(axis=0)  # (kd, kh) + acc_shape
    if x_is_a:  # (kd, kh, ci, kw·k_out + co)
        dw = total.reshape(3, 3, k_in, 3, k_out).transpose(0, 1, 3, 2, 4)
    else:       # (kd, kh, kw·k_out + co, ci)
        dw = total[:, :, :3 * k_out].reshape(3, 3, 3, k_out, k_in).transpose(0, 1, 2, 4, 3)
    return dw[..., :c_in, :c_out]


def takes(shape: tuple, c_out: int) -> bool:
    """Whether `weight_grad` computes the kernel gradient of a convolution of an input of `shape`
    (N, D, H, W, c_in) to `c_out` channels."""
    _, _, height, width, c_in = shape
    if None in (height, width, c_in):
        return False
    return width % 64 == 0 and width <= 256 and (c_in <= 32 or c_in == 64) and c_out <= 32
