"""3×3×3 stride-1 'same' convolutions as a Pallas Mosaic GPU kernel (Hopper: TMA copies and wgmma).

On the JAX backend with Hopper GPUs, UNet3D's Conv3D layers of up to 32 channels in and out (the
128³ level of a training crop, the 224×224×160 evaluation window) compute their forward pass and
their input gradient with this kernel; their kernel gradient, and that of the 64 → 32 convolution
after the skip concatenation, with runtime/engines/mosaic_wgrad.py where WEIGHT_GRAD_CHANNELS lists
them (the image convolution's from batch 4), else XLA's (`hopper_convolution`, chosen by
runtime/engines/kernels.py; --conv_kernel keras turns both off). With several GPUs in one process the kernels run on each GPU's share of the batch
(`sharded`). Their timings against cuDNN are in docs/performance.md ("Hopper kernels").

Channels-last. A program owns `rows` consecutive rows (fixed depth d, rows h, all W voxels) of the
output. For one output row it adds, over the nine (kd, kh) taps, the product of the input row
(d + kd - 1, h + kh - 1) — W × c_in, copied by TMA; taps outside the volume are skipped — and
that tap's c_in × 3·c_out kernel slice, whose three column blocks are the kw = 0, 1, 2 taps.
So every operand is a whole row, aligned as wgmma wants it; the one-voxel kw shifts are applied
to the product instead: the epilogue writes the three blocks to shared memory and adds them
shifted by one voxel. Each program keeps the kernel and a ring of four input rows per depth in
shared memory, so every input row crosses to it once. A W that is not a multiple of wgmma's 64
rows (160) runs on W rounded up, the extra rows dropped, with a ring of three rows and one epilogue
block where four and three do not fit. `data_grad` is the same kernel on the output gradient with
the kernel flipped and its channel axes swapped. tests/test_mosaic_conv.py checks the kernel in
Pallas' GPU interpreter on the CPU; bench/pallas_conv.py times it against cuDNN and
bench/step_profile.py in the training step.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from runtime.engines import mosaic_wgrad

RING = 4  # input rows kept per depth: the three in use and the one being fetched
SMEM_BYTES = 222_208  # the most shared memory a program uses (the 32 → 32 layout at W = 128, which runs)


def _mma_transforms(swizzle, dtype):
    """The tiling and swizzle wgmma needs on a shared-memory operand, for a swizzle in bytes."""
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def _forward_body(x_gmem, w_gmem, y_gmem, w_smem, a_smem, e_smem, o_smem, w_bar, a_bar, *,
                  rows, depth, height, width):
    c_out = o_smem.shape[-1]
    ring, m_rows = a_smem.shape[1], a_smem.shape[2]  # m_rows: W rounded up to wgmma's 64
    program = lax.axis_index("p")
    groups = height // rows
    plane, group = program // groups, program % groups
    n, d = plane // depth, plane % depth
    h0 = group * rows

    plgpu.copy_gmem_to_smem(w_gmem, w_smem, w_bar.at[0])

    def fetch(j):
        """Copy input row h0 - 1 + j of the three depths into ring slot j % ring. Rows outside the
        volume are clamped to its face (their products are skipped): a negative index would wrap.
        Where W < m_rows the slot's last rows are never written: they meet only rows of the product
        that the epilogue drops."""
        slot = lax.rem(j, ring)
        h = jnp.clip(h0 - 1 + j, 0, height - 1)
        for kd in range(3):
            target = a_smem.at[kd, slot] if m_rows == width else a_smem.at[kd, slot, pl.ds(0, width)]
            plgpu.copy_gmem_to_smem(x_gmem.at[n, jnp.clip(d + kd - 1, 0, depth - 1), h], target,
                                    a_bar.at[kd * ring + slot])

    def wait(j):
        slot = lax.rem(j, ring)
        for kd in range(3):
            plgpu.barrier_wait(a_bar.at[kd * ring + slot])

    for j in range(3):
        fetch(j)
    for block in range(e_smem.shape[0]):  # rows that stay zero: the voxels left of w = 0 and right of w = W - 1
        e_smem[block, pl.ds(0, 8), :] = jnp.zeros((8, c_out), jnp.float32)
        e_smem[block, pl.ds(width, 8), :] = jnp.zeros((8, c_out), jnp.float32)
    plgpu.barrier_wait(w_bar.at[0])
    wait(0)
    wait(1)

    def row(i, carry):
        if ring > 3:  # the slot of row i - 1 is free: its products are done
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
                        plgpu.wgmma(acc_ref, a_smem.at[kd, lax.rem(i + kh, ring)], w_smem.at[kd * 3 + kh])

                    conditions = [inside[axis, k] for axis, k in ((0, kd), (1, kh)) if k != 1]
                    if conditions:
                        pl.when(functools.reduce(jnp.logical_and, conditions))(product)
                    else:
                        product()
            return acc_ref[...]

        acc = pl.run_scoped(products, plgpu.ACC((m_rows, 3 * c_out), jnp.float32))
        if ring == 3:  # a ring of three: row i's slot is free only now; the copy overlaps the epilogue
            @pl.when(i + 1 < rows)
            def _():
                fetch(i + 3)

        def shifted(kw, block):
            """acc's kw block written one voxel down into e_smem[block] (row w + 1 holds voxel w), the
            row right of W - 1 zero again where the product's rows past W landed there."""
            e_smem[block, pl.ds(1, m_rows), :] = acc[:, kw * c_out:(kw + 1) * c_out]
            if m_rows != width:
                e_smem[block, pl.ds(width + 1, 8), :] = jnp.zeros((8, c_out), jnp.float32)

        if e_smem.shape[0] == 3:
            for kw in range(3):
                shifted(kw, kw)
            plgpu.commit_smem()
            total = e_smem[0, pl.ds(0, width), :] + e_smem[1, pl.ds(1, width), :] + e_smem[2, pl.ds(2, width), :]
        else:  # one block, used three times
            total = None
            for kw in range(3):
                shifted(kw, 0)
                plgpu.commit_smem()
                part = e_smem[0, pl.ds(kw, width), :]
                total = part if total is None else total + part
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


def _layout(width, k_in, k_out, itemsize):
    """(ring, epilogue blocks) of the forward kernel for rows of W voxels: a ring of four input rows
    and three float32 epilogue blocks where they fit SMEM_BYTES, else fewer (W = 160: three rows,
    one block)."""
    m_rows = _round_up(width, 64)
    for ring, blocks in ((RING, 3), (RING, 1), (3, 1)):
        used = (9 * k_in * 3 * k_out * itemsize + 3 * ring * m_rows * k_in * itemsize
                + blocks * (m_rows + 8) * k_out * 4 + 2 * width * k_out * itemsize)
        if used <= SMEM_BYTES:
            return ring, blocks
    raise ValueError(f"the forward kernel does not fit shared memory at W = {width}, {k_in} -> {k_out} channels")


def forward(x: jax.Array, kernel: jax.Array, *, rows: int = 128,
            interpret: Optional[object] = None) -> jax.Array:
    """conv3d(x, kernel), stride 1, 'same' padding: x (N, D, H, W, c_in), kernel (3, 3, 3, c_in, c_out).

    bf16 products with float32 sums; the result has the dtype of `x`. W must be a multiple of 32 (up
    to 256); where it is not a multiple of 64 (the 224×224×160 evaluation window) the products run on
    W rounded up to 64 rows. A program computes gcd(rows, H) output rows. Channels are padded with
    zeros to multiples of 16 for the kernel (a copy of x where c_in is not one, and of the result
    where c_out is not). `interpret`: Pallas' GPU interpreter parameters, for the CPU tests.
    """
    n, depth, height, width, c_in = x.shape
    c_out = kernel.shape[-1]
    if width % 32 or width > 256:
        raise ValueError(f"the kernel needs W, the last spatial size, to be a multiple of 32 up to 256; got {width}")
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
    ring, blocks = _layout(width, k_in, k_out, itemsize)
    m_rows = _round_up(width, 64)
    body = functools.partial(_forward_body, rows=rows, depth=depth, height=height, width=width)
    call = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((n, depth, height, width, k_out), dtype),
        grid=(n * depth * height // rows,),
        grid_names=("p",),
        scratch_types=[
            plgpu.SMEM((9, k_in, 3 * k_out), dtype, transforms=_mma_transforms(swizzle, dtype)),
            plgpu.SMEM((3, ring, m_rows, k_in), dtype, transforms=_mma_transforms(swizzle, dtype)),
            plgpu.SMEM((blocks, m_rows + 8, k_out), jnp.float32),
            plgpu.SMEM((2, width, k_out), dtype),
            plgpu.Barrier(num_barriers=1),
            plgpu.Barrier(num_barriers=3 * ring),
        ],
        interpret=interpret,
    )
    y = call(x, w)
    return y if k_out == c_out else y[..., :c_out]


def data_grad(grad: jax.Array, kernel: jax.Array, **options: object) -> jax.Array:
    """The gradient of `forward`'s input: `forward` of the output gradient with the kernel flipped in
    space and its channel axes swapped."""
    return forward(grad, jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4), **options)


def takes(shape: tuple, c_out: int) -> bool:
    """Whether the kernel computes a convolution of an input of `shape` (N, D, H, W, c_in) to `c_out`
    channels: up to 32 channels in and out (more do not fit its shared memory), W a multiple of 32 up
    to 256."""
    _, _, height, width, c_in = shape
    if None in (height, width, c_in):
        return False
    if not (c_in <= 32 and c_out <= 32 and width % 32 == 0 and width <= 256):
        return False
    try:
        _layout(width, _round_up(c_in, 16), _round_up(c_out, 16), 2)
    except ValueError:
        return False
    return True


def kernel_convolution(kernel_forward: Optional[Callable], kernel_data_grad: Optional[Callable],
                       kernel_weight_grad: Optional[Callable] = None) -> Callable:
    """conv3d(x, kernel) as a differentiable function whose forward pass is `kernel_forward(x, kernel)`,
    whose input gradient is `kernel_data_grad(grad, kernel)` and whose kernel gradient is
    `kernel_weight_grad(x, grad)` (runtime/engines/mosaic_wgrad.py); each one None is XLA's."""

    @jax.custom_vjp
    def conv(x, kernel):
        return (kernel_forward or xla_convolution)(x, kernel)

    def conv_forward(x, kernel):
        return conv(x, kernel), (x, kernel)

    def conv_backward(saved, grad):
        x, kernel = saved
        grad = grad.astype(x.dtype)
        if kernel_data_grad is None or kernel_weight_grad is None:  # (XLA drops the gradient not used)
            xla_grads = jax.vjp(xla_convolution, x, kernel)[1](grad)
        x_grad = xla_grads[0] if kernel_data_grad is None else kernel_data_grad(grad, kernel)
        kernel_grad = xla_grads[1] if kernel_weight_grad is None else kernel_weight_grad(x, grad)
        return x_grad.astype(x.dtype), kernel_grad.astype(kernel.dtype)

    conv.defvjp(conv_forward, conv_backward)
    return conv


def xla_convolution(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The same convolution through XLA (cuDNN on a GPU), in the dtype of `x`."""
    return lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1, 1), "SAME",
                                    dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


convolution = kernel_convolution(forward, data_grad)


def sharded(conv: Callable, devices: Sequence) -> Callable:
    """`conv(x, kernel)` computed by each of `devices` on its share of the batch: a shard_map over a
    one-axis mesh 'batch' of `devices` (the layout of the engine's data-parallel batches), the
    kernel replicated. The kernel gradients of the shares are summed over the devices, as XLA sums
    the gradients of the rest of the step. The batch must be a multiple of the devices' count."""
    mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
    spec = jax.sharding.PartitionSpec
    return jax.shard_map(conv, mesh=mesh, in_specs=(spec("batch"), spec()), out_specs=spec("batch"),
                         check_vma=False)


# The (c_in, c_out) whose kernel gradient runs on runtime/engines/mosaic_wgrad.py, each from the batch
# (per GPU) given: the 3×3×3 convolutions of UNet3D's 128³ level where it beat cuDNN
# (bench/wgrad_bench.py, bench/step_profile.py; docs/performance.md, "Hopper kernels"). The padded
# image convolution (8 → 32) stays on cuDNN below batch 4, where cuDNN is the faster.
WEIGHT_GRAD_CHANNELS = {(32, 32): 1, (64, 32): 1, (32, 4): 1, (8, 32): 4}


def weight_grad_takes(shape: tuple, c_out: int, channels: dict = WEIGHT_GRAD_CHANNELS) -> bool:
    """Whether the kernel gradient of a convolution of an input of `shape` to `c_out` channels runs on
    runtime/engines/mosaic_wgrad.py: its channels in `channels`, the batch at least the one given
    there, and a shape the kernel takes."""
    smallest_batch = channels.get((shape[-1], c_out))
    return (smallest_batch is not None and shape[0] is not None and shape[0] >= smallest_batch
            and mosaic_wgrad.takes(shape, c_out))


# conv3d by which passes run on the tool's kernels: (forward and input gradient, kernel gradient)
CONVOLUTIONS = {(True, False): convolution,
                (True, True): kernel_convolution(forward, data_grad, mosaic_wgrad.weight_grad),
                (False, True): kernel_convolution(None, None, mosaic_wgrad.weight_grad)}


def routed_implementation_of(convs: dict, accepts: Callable, accepts_weight_grad: Callable) -> Callable:
    """What model/layers.py's KernelConv3D calls: for a bf16 3×3×3 call, `convs[(forward, weight
    gradient)]` by which passes the kernels take (`accepts(shape, c_out)` for the forward pass and the
    input gradient, `accepts_weight_grad` for the kernel gradient); None (Keras's convolution) where
    neither does."""

    def implementation(inputs, kernel):
        if tuple(kernel.shape[:3]) != (3, 3, 3) or inputs.dtype != jnp.bfloat16:
            return None
        shape, c_out = tuple(inputs.shape), kernel.shape[-1]
        if None in shape:
            return None
        key = (bool(accepts(shape, c_out)), bool(accepts_weight_grad(shape, c_out)))
        if key not in convs:
            return None
        return convs[key](inputs, jnp.asarray(kernel).astype(inputs.dtype))

    return implementation


def with_batch_of(accepts: Callable, count: int) -> Callable:
    """`accepts`, for a batch split over `count` devices: the batch a multiple of `count`, and each
    device's share accepted."""
    return lambda shape, c_out: (shape[0] is not None and shape[0] % count == 0
                                 and accepts((shape[0] // count,) + tuple(shape[1:]), c_out))


def hopper_convolution() -> Optional[Callable]:
    """The layers' implementation where the kernels run, else None: JAX computing in one process on
    Hopper GPUs (compute capability 9.x), each call routed to `CONVOLUTIONS` by the passes the
    kernels take (`routed_implementation_of`). With several GPUs, the kernels `sharded` over them, for
    batches that are a multiple of their count. Several processes keep XLA's convolutions: their
    evaluation and prediction steps run on each process's own devices, not on the training mesh."""
    devices = jax.devices()
    if jax.process_count() != 1 or any(device.platform != "gpu" for device in devices):
        return None
    if not all(str(getattr(device, "compute_capability", "")).startswith("9.") for device in devices):
        return None
    if len(devices) == 1:
        return routed_implementation_of(CONVOLUTIONS, takes, weight_grad_takes)
    count = len(devices)
    return routed_implementation_of({key: sharded(conv, devices) for key, conv in CONVOLUTIONS.items()},
                                    with_batch_of(takes, count), with_batch_of(weight_grad_takes, count))
