"""Building blocks shared by the networks, written with the Keras 3 API only."""
import keras
from keras import ops


class InstanceNormalization(keras.layers.Layer):
    """Per-sample, per-channel normalization over the spatial axes with a learned scale and offset.

    The same as group normalization with one group per channel. The statistics are computed in
    at least float32 whatever the compute dtype, so the layer is safe under a bf16 policy.
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        channels = input_shape[-1]
        self.gamma = self.add_weight(shape=(channels,), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(channels,), initializer="zeros", name="beta")

    def call(self, x):
        axes = tuple(range(1, len(x.shape) - 1))
        xf = at_least_float32(x)
        mean, var = ops.moments(xf, axes=axes, keepdims=True)
        y = (xf - mean) * ops.rsqrt(var + self.epsilon)
        y = y * ops.cast(self.gamma, xf.dtype) + ops.cast(self.beta, xf.dtype)
        return ops.cast(y, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def at_least_float32(x):
    """`x` in float32 when it is float16 or bfloat16, unchanged otherwise (float32, float64)."""
    return ops.cast(x, "float32") if keras.backend.standardize_dtype(x.dtype) in ("float16", "bfloat16") else x


def softmax(name="softmax"):
    """A softmax over the last axis in at least float32 (float32 under a mixed policy)."""
    compute = keras.mixed_precision.dtype_policy().compute_dtype
    return keras.layers.Softmax(axis=-1, dtype="float64" if compute == "float64" else "float32",
                                name=name)


class UpConv2x(keras.layers.Layer):
    """A 2×2×2 transposed convolution with stride 2, computed as a matrix product and a shuffle.

    With kernel 2 and stride 2 the output windows do not overlap, so each input voxel produces its
    own 2×2×2 output block: a 1×1×1 convolution to 8·filters channels followed by a
    depth-to-space rearrangement. The kernel has `Conv3DTranspose`'s layout, (2, 2, 2, filters,
    in_channels), and the layer gives the same result, but its gradient compiles to a fast matrix
    product under XLA where the transposed convolution's does not.
    """

    def __init__(self, filters, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(2, 2, 2, self.filters, input_shape[-1]),
                                      initializer=self.kernel_initializer, name="kernel")
        self.bias = self.add_weight(shape=(self.filters,), initializer="zeros", name="bias")

    def call(self, x):
        c_in, c_out = x.shape[-1], self.filters
        # (i, j, k, o, c) -> (c, i, j, k, o): one matrix from input channels to the 8 sub-voxels.
        matrix = ops.reshape(ops.transpose(self.kernel, (4, 0, 1, 2, 3)), (c_in, 8 * c_out))
        y = ops.matmul(x, ops.cast(matrix, x.dtype))
        d, h, w = _spatial_shape(x)
        y = ops.reshape(y, (-1, d, h, w, 2, 2, 2, c_out))
        y = ops.transpose(y, (0, 1, 4, 2, 5, 3, 6, 7))
        y = ops.reshape(y, (-1, 2 * d, 2 * h, 2 * w, c_out))
        return y + ops.cast(self.bias, y.dtype)

    def compute_output_shape(self, input_shape):
        b, d, h, w, _ = input_shape
        return (b,) + tuple(None if s is None else 2 * s for s in (d, h, w)) + (self.filters,)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}


class KernelConv3D(keras.layers.Conv3D):
    """A Conv3D whose stride-1 'same' convolutions a faster kernel may compute.

    `implementation(inputs, kernel)` returns the convolution of a call, or None for a call it does
    not take (shape, dtype), which Keras's convolution then computes. The weights and the function
    are Conv3D's: the runtime chooses the implementation per backend and device
    (runtime/engines/mosaic_conv.py on a Hopper GPU under JAX), and Keras's path is the reference and the
    fallback.
    """

    def __init__(self, *args, implementation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.implementation = implementation

    def convolution_op(self, inputs, kernel):
        plain = (tuple(self.strides) == (1, 1, 1) and tuple(self.dilation_rate) == (1, 1, 1)
                 and self.padding == "same" and self.data_format == "channels_last")
        if self.implementation is not None and plain:
            outputs = self.implementation(inputs, kernel)
            if outputs is not None:
                return outputs
        return super().convolution_op(inputs, kernel)


class ChannelPaddedConv3D(KernelConv3D):
    """A Conv3D whose input channels are zero-padded up to a multiple of `channel_multiple`.

    The padded channels meet zero kernel rows, so the layer computes the same function with the
    same weights as `keras.layers.Conv3D`. cuDNN runs a 3-D convolution of 4 input channels
    (UNet3D's image) on slow kernels, and pads nothing itself; the output channels stay as they
    are (docs/performance.md has the timings of both choices).
    """

    def __init__(self, *args, channel_multiple=8, **kwargs):
        super().__init__(*args, **kwargs)
        self.channel_multiple = channel_multiple

    def convolution_op(self, inputs, kernel):
        pad = -kernel.shape[-2] % self.channel_multiple
        if pad:
            inputs = ops.pad(inputs, [[0, 0]] * 4 + [[0, pad]])
            kernel = ops.pad(kernel, [[0, 0]] * 3 + [[0, pad], [0, 0]])
        return super().convolution_op(inputs, kernel)

    def get_config(self):
        return {**super().get_config(), "channel_multiple": self.channel_multiple}


def _spatial_shape(x):
    """The three spatial sizes of a 5-D tensor, static where known."""
    static = x.shape[1:4]
    if all(s is not None for s in static):
        return tuple(static)
    dynamic = ops.shape(x)
    return tuple(s if s is not None else dynamic[i + 1] for i, s in enumerate(static))


class Initializers:
    """Glorot-uniform initializers, each with its own seed derived from one base seed.

    With `seed=None` the initializers are unseeded (a different network each run).
    """

    def __init__(self, seed=None):
        self.seed = seed
        self.count = 0

    def glorot(self):
        """The next glorot-uniform initializer."""
        if self.seed is None:
            return keras.initializers.GlorotUniform()
        self.count += 1
        return keras.initializers.GlorotUniform(seed=self.seed * 1000 + self.count)


def make_normalization(kind, name=None, instance_norm=None):
    """The normalization layer for `kind` (instancenorm, groupnorm, batchnorm) or None for none.

    `instance_norm` replaces this module's InstanceNormalization (Habana's fused layer on HPU).
    Group and batch normalization run in float32 (their statistics too) under a mixed policy.
    Group normalization keeps the reference's ε, Keras' default of 1e-3.
    """
    if kind == "instancenorm":
        return (instance_norm or InstanceNormalization)(epsilon=1e-6, name=name)
    if kind == "groupnorm":
        return keras.layers.GroupNormalization(groups=16, epsilon=1e-3, name=name, dtype="float32")
    if kind == "batchnorm":
        return keras.layers.BatchNormalization(name=name, dtype="float32")
    if kind == "none":
        return None
    raise ValueError(f"unknown normalization {kind!r}")
