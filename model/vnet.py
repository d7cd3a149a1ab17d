"""V-Net for the MSD hippocampus task, Keras 3 functional API.

Input block: a convolution layer to 16 channels plus the input. Down blocks: a 2×2×2 stride-2
convolution layer doubling the channels (or pooling and a convolution layer), then a residual
block of `depth` convolution layers. Up blocks: a 2×2×2 stride-2 up-convolution with
normalization and activation to the skip's channels, the skip concatenated, a residual block.
Output: an up-convolution to the shallowest skip's channels, a convolution of the blocks' kernel
size (`convolution_size`, 3 by default, as the reference's output block) to the classes (no
normalization, no activation), softmax. A convolution layer is Conv3D, normalization,
activation.
"""
import keras

from model.layers import Initializers, UpConv2x, make_normalization, softmax

FIRST_CHANNELS = 16


class VNetConfig:
    """The V-Net hyper-parameters of the command line (the defaults of the V-Net reference's utils/cmd_util.py)."""

    def __init__(self, n_classes=3, downscale_blocks=(3, 3, 3), upscale_blocks=(3, 3),
                 convolution_size=3, normalization="batchnorm", activation="relu",
                 pooling="conv_pool", upsampling="transposed_conv"):
        self.n_classes = n_classes
        self.downscale_blocks, self.upscale_blocks = tuple(downscale_blocks), tuple(upscale_blocks)
        self.convolution_size = convolution_size
        self.normalization, self.activation = normalization, activation
        self.pooling, self.upsampling = pooling, upsampling


class _Builder:
    def __init__(self, config, seed, instance_norm):
        self.c, self.init, self.count = config, Initializers(seed), 0
        self.instance_norm = instance_norm

    def name(self, kind):
        self.count += 1
        return f"{kind}_{self.count}"

    def conv_layer(self, x, filters, kernel=None, strides=1, norm=True, act=True):
        x = keras.layers.Conv3D(filters, kernel or self.c.convolution_size, strides=strides,
                                padding="same", kernel_initializer=self.init.glorot(),
                                name=self.name("conv"))(x)
        return self.finish(x, norm, act)

    def finish(self, x, norm=True, act=True):
        layer = (make_normalization(self.c.normalization, self.name("norm"), self.instance_norm)
                 if norm else None)
        if layer is not None:
            x = layer(x)
        if act:
            x = keras.layers.Activation(self.c.activation, name=self.name("act"))(x)
        return x

    def residual(self, x, depth):
        shortcut, filters = x, x.shape[-1]
        for _ in range(depth):
            x = self.conv_layer(x, filters)
        return keras.layers.Add(name=self.name("residual"))([x, shortcut])

    def down(self, x, depth):
        filters = 2 * x.shape[-1]
        if self.c.pooling == "conv_pool":
            x = self.conv_layer(x, filters, kernel=2, strides=2)
        else:
            pool = keras.layers.MaxPooling3D if self.c.pooling == "max_pool" else keras.layers.AveragePooling3D
            x = self.conv_layer(pool(2, name=self.name("pool"))(x), filters)
        return self.residual(x, depth)

    def up(self, x, filters):
        if self.c.upsampling == "transposed_conv":
            x = UpConv2x(filters, kernel_initializer=self.init.glorot(), name=self.name("upconv"))(x)
            return self.finish(x)
        x = keras.layers.UpSampling3D(2, name=self.name("upsample"))(x)
        return self.conv_layer(x, filters, kernel=1)


def build_vnet(input_shape=(32, 32, 32, 1), config=None, seed=None, instance_norm=None):
    """The V-Net as a `keras.Model` from (B, *input_shape) to softmax probabilities.

    `instance_norm` replaces the instance-normalization layer class (Habana's on HPU).
    """
    config = config or VNetConfig()
    levels = len(config.downscale_blocks)
    if len(config.upscale_blocks) != levels - 1:
        raise ValueError(f"V-Net needs one up block fewer than down blocks, got "
                         f"{len(config.downscale_blocks)} down and {len(config.upscale_blocks)} up")
    for size in input_shape[:3]:
        if size % 2 ** levels:
            raise ValueError(f"V-Net with {levels} down blocks needs sizes divisible by "
                             f"{2 ** levels}, got {tuple(input_shape[:3])}")
    b = _Builder(config, seed, instance_norm)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = b.conv_layer(inputs, FIRST_CHANNELS)
    x = keras.layers.Add(name="input_residual")([x, inputs])  # the input broadcasts over channels
    skips = [x]
    for depth in config.downscale_blocks:
        x = b.down(x, depth)
        skips.append(x)
    skips.pop()  # the deepest block's output is no skip
    for depth in config.upscale_blocks:
        skip = skips.pop()
        x = b.up(x, skip.shape[-1])
        x = keras.layers.Concatenate(name=b.name("concat"))([x, skip])
        x = b.residual(x, depth)
    x = b.up(x, skips.pop().shape[-1])
    logits = b.conv_layer(x, config.n_classes, norm=False, act=False)
    probs = softmax()(logits)
    return keras.Model(inputs, probs, name="vnet")
