"""3×3×3 stride-1 'same' convolutions as a Pallas Mosaic GPU kernel (Hopper: TMA copies and wgmma).

On the JAX backend with Hopper GPUs, UNet3D's Conv3D layers of up to 32 channels in and out (the
128³ level of a training crop) compute their forward pass and their input gradient with this kernel
and their kernel gradient with XLA (`hopper_convolution`, chosen by runtime/engines/kernels.py; --conv_kernel
keras turns it off). With several GPUs in one process the kernel runs on each GPU's share of the
batch (`sharded`). Its timings against cuDNN are in docs/performance.md.

Channels-last. A program owns `rows` consecutive rows (fixed depth d, rows h, all W voxels) of the
output. For one output row it adds, over the nine (kd, kh) taps, the product of the input row
(d + kd - 1, h + kh - 1) — W × c_in, copied by TMA; taps outside the volume are skipped — and
that tap's c_in × 3·c_out kernel slice, whose three column blocks are the kw = 0, 1, 2 taps.
So every operand is a whole row, aligned as wgmma wants it; the one-voxel kw shifts are applied
to the product instead: the epilogue writes the three blocks to shared memory and adds them
shifted by one voxel. Each program keeps the kernel and a ring of four input rows per depth in
shared memory, so every input row crosses to it once. `data_grad` is the same kernel on the output
gradient with the kernel flipped and its channel axes swapped. tests/test_mosaic_conv.py checks
the kernel in Pallas' GPU interpreter on the CPU; bench/pallas_conv.py times it against cuDNN and
bench/step_profile.py in the training step.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

RING = 4  # input rows kept per depth: the three in use and the one being fetched


def _mma_transforms(swizzle, dtype):
    """The tiling and swizzle wgmma needs on a shared-memory operand, for a swizzle in bytes."""
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def _forward_body(x_gmem, w_gmem, y_gmem, w_smem, a_smem, e_smem, o_smem, w_bar, a_bar, *,
                  rows, depth, height, width):
    c_out = o_smem.shape[-1]
    program = lax.axis_index("p")
    groups = height // rows
    plane, group = program // groups, program % groups
    n, d = plane // depth, plane % depth
    h0 = group * rows

    plgpu.copy_gmem_to_smem(w_gmem, w_smem, w_bar.at[0])

    def fetch(j):
        """Copy input row h0 - 1 + j of the three depths into ring slot j % RING. Rows outside the
        volume are clamped to its face (their products are skipped): a negative index would wrap."""
        slot = lax.rem(j, RING)
        h = jnp.clip(h0 - 1 + j, 0, height - 1)
        for kd in range(3):
            plgpu.copy_gmem_to_smem(x_gmem.at[n, jnp.clip(d + kd - 1, 0, depth - 1), h], a_smem.at[kd, slot],
                                    a_bar.at[kd * RING + slot])

    def wait(j):
        slot = lax.rem(j, RING)
        for kd in range(3):
            plgpu.barrier_wait(a_bar.at[kd * RING + slot])

    for j in range(3):
        fetch(j)
    for kw in range(3):  # rows that stay zero: the voxels left of w = 0 and right of w = W - 1
        e_smem[kw, pl.ds(0, 8), :] = jnp.zeros((8, c_out), jnp.float32)
        e_smem[kw, pl.ds(width, 8), :] = jnp.zeros((8, c_out), jnp.float32)
    plgpu.barrier_wait(w_bar.at[0])
    wait(0)
    wait(1)

    def row(i, carry):
        @pl.when(i + 1 < rows)
        def _():
            fetch(i + 3)

        wait(i + 2)
        h = h0 + i
        inside = {(0, 0): d > 0, (0, 2): d < depth - 1, (1, 0): h > 0, (1, 2): h < height - 1}

        def products(acc_ref):
            for kd in range(3):
                for kh in range(3):
                    def product(kd=kd, kh=kh):
                        plgpu.wgmma(acc_ref, a_smem.at[kd, lax.rem(i + kh, RING)], w_smem.at[kd * 3 + kh])

                    conditions = [inside[axis, k] for axis, k in ((0, kd), (1, kh)) if k != 1]
                    if conditions:
                        pl.when(functools.reduce(jnp.logical_and, conditions))(product)
                    else:
                        product()
            return acc_ref[...]

        acc = pl.run_scoped(products, plgpu.ACC((width, 3 * c_out), jnp.float32))
        for kw in range(3):
            e_smem[kw, pl.ds(1, width), :] = acc[:, kw * c_out:(kw + 1) * c_out]
        plgpu.commit_smem()
        total = e_smem[0, pl.ds(0, width), :] + e_smem[1, pl.ds(1, width), :] + e_smem[2, pl.ds(2, width), :]
        slot = lax.rem(i, 2)
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
        o_smem[slot] = total.astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[slot], y_gmem.at[n, d, h])
        return carry

    lax.fori_loop(0, rows, row, None)
    plgpu.wait_smem_to_gmem(0)


def _round_up(value, multiple):
    return -(-value // multiple) * multiple


def forward(x, kernel, *, rows=128, interpret=None):
    """conv3d(x, kernel), stride 1, 'same' padding: x (N, D, H, W, c_in), kernel (3, 3, 3, c_in, c_out).

    bf16 products with float32 sums; the result has the dtype of `x`. W must be a multiple of 64;
    a program computes gcd(rows, H) output rows. Channels are padded with zeros to multiples of 16
    for the kernel (a copy of x where c_in is not one, and of the result where c_out is not).
    `interpret`: Pallas' GPU interpreter parameters, for the CPU tests.
    """
    n, depth, height, width, c_in = x.shape
    c_out = kernel.shape[-1]
    if width % 64:
        raise ValueError(f"the kernel needs W, the last spatial size, to be a multiple of 64; got {width}")
    rows = math.gcd(rows, height)
    dtype = x.dtype
    k_in, k_out = _round_up(c_in, 16), _round_up(c_out, 16)
    if k_in != c_in:
        x = jnp.pad(x, ((0, 0),) * 4 + ((0, k_in - c_in),))
    kernel = jnp.pad(kernel.astype(dtype), ((0, 0),) * 3 + ((0, k_in - c_in), (0, k_out - c_out)))
    # (kd, kh, kw, ci, co) -> (kd·3 + kh, ci, kw·c_out + co): the kw taps side by side
    w = kernel.transpose(0, 1, 3, 2, 4).reshape(9, k_in, 3 * k_out)
    # wgmma wants one swizzle for both operands: the widest that divides both rows (bytes)
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = next(s for s in (128, 64, 32) if (k_in * itemsize) % s == 0 == (3 * k_out * itemsize) % s)
    body = functools.partial(_forward_body, rows=rows, depth=depth, height=height, width=width)
    call = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((n, depth, height, width, k_out), dtype),
        grid=(n * depth * height // rows,),
        grid_names=("p",),
        scratch_types=[
            plgpu.SMEM((9, k_in, 3 * k_out), dtype, transforms=_mma_transforms(swizzle, dtype)),
            plgpu.SMEM((3, RING, width, k_in), dtype, transforms=_mma_transforms(swizzle, dtype)),
            plgpu.SMEM((3, width + 8, k_out), jnp.float32),
            plgpu.SMEM((2, width, k_out), dtype),
            plgpu.Barrier(num_barriers=1),
            plgpu.Barrier(num_barriers=3 * RING),
        ],
        interpret=interpret,
    )
    y = call(x, w)
    return y if k_out == c_out else y[..., :c_out]


def data_grad(grad, kernel, **options):
    """The gradient of `forward`'s input: `forward` of the output gradient with the kernel flipped in
    space and its channel axes swapped."""
    return forward(grad, jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4), **options)


def takes(shape, c_out):
    """Whether the kernel computes a convolution of an input of `shape` (N, D, H, W, c_in) to `c_out`
    channels: up to 32 channels in and out (more do not fit its shared memory), W a multiple of 64."""
    _, _, height, width, c_in = shape
    if None in (height, width, c_in):
        return False
    return c_in <= 32 and c_out <= 32 and width % 64 == 0


def kernel_convolution(kernel_forward, kernel_data_grad):
    """conv3d(x, kernel) as a differentiable function whose forward pass is `kernel_forward(x, kernel)`,
    whose input gradient is `kernel_data_grad(grad, kernel)` and whose kernel gradient is XLA's."""

    @jax.custom_vjp
    def conv(x, kernel):
        return kernel_forward(x, kernel)

    def conv_forward(x, kernel):
        return kernel_forward(x, kernel), (x, kernel)

    def conv_backward(saved, grad):
        x, kernel = saved
        kernel_grad = jax.vjp(lambda k: xla_convolution(x, k), kernel)[1](grad)[0]
        return kernel_data_grad(grad, kernel).astype(x.dtype), kernel_grad

    conv.defvjp(conv_forward, conv_backward)
    return conv


def xla_convolution(x, kernel):
    """The same convolution through XLA (cuDNN on a GPU), in the dtype of `x`."""
    return lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1, 1), "SAME",
                                    dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


convolution = kernel_convolution(forward, data_grad)


def sharded(conv, devices):
    """`conv(x, kernel)` computed by each of `devices` on its share of the batch: a shard_map over a
    one-axis mesh 'batch' of `devices` (the layout of the engine's data-parallel batches), the
    kernel replicated. The kernel gradients of the shares are summed over the devices, as XLA sums
    the gradients of the rest of the step. The batch must be a multiple of the devices' count."""
    mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
    spec = jax.sharding.PartitionSpec
    return jax.shard_map(conv, mesh=mesh, in_specs=(spec("batch"), spec()), out_specs=spec("batch"),
                         check_vma=False)


def takes_batch_of(count):
    """`takes`, for a batch split over `count` devices: also the batch a multiple of `count`."""

    def accepts(shape, c_out):
        return shape[0] is not None and shape[0] % count == 0 and takes(shape, c_out)

    return accepts


def layer_implementation_of(conv, accepts):
    """What model/layers.py's KernelConv3D calls: `conv` for a bf16 3×3×3 call whose input shape and
    output channels `accepts(shape, c_out)`, None (Keras's convolution) for any other."""

    def implementation(inputs, kernel):
        if (tuple(kernel.shape[:3]) != (3, 3, 3) or inputs.dtype != jnp.bfloat16
                or not accepts(tuple(inputs.shape), kernel.shape[-1])):
            return None
        return conv(inputs, jnp.asarray(kernel).astype(inputs.dtype))

    return implementation


layer_implementation = layer_implementation_of(convolution, takes)


def hopper_convolution():
    """`layer_implementation` where the kernel runs, else None: JAX computing in one process on Hopper
    GPUs (compute capability 9.x). With several GPUs, the kernel `sharded` over them, for batches
    that are a multiple of their count. Several processes keep XLA's convolutions: their evaluation
    and prediction steps run on each process's own devices, not on the training mesh."""
    devices = jax.devices()
    if jax.process_count() != 1 or any(device.platform != "gpu" for device in devices):
        return None
    if not all(str(getattr(device, "compute_capability", "")).startswith("9.") for device in devices):
        return None
    if len(devices) == 1:
        return layer_implementation
    return layer_implementation_of(sharded(convolution, devices), takes_batch_of(len(devices)))
