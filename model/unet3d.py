"""UNet3D for brain-tumour segmentation (BraTS), Keras 3 functional API.

Encoder: an input block of two 3×3×3 convolutions (32 channels), then down blocks of a stride-2
convolution and a convolution (64, 128, 256, 320, and a 320-channel bottleneck). Decoder: up
blocks of a 2×2×2 stride-2 up-convolution, the skip concatenated, and two convolutions (320, 256,
128, 64, 32). A 3×3×3 convolution to the classes and a softmax close it. Every convolution block
is Conv3D, normalization, LeakyReLU(0.01).
"""
import functools

import keras

from model.layers import (ChannelPaddedConv3D, Initializers, KernelConv3D, UpConv2x, make_normalization,
                          softmax)

ENCODER_CHANNELS = (32, 64, 128, 256, 320, 320)
DECODER_CHANNELS = (320, 256, 128, 64, 32)
DIVISOR = 2 ** (len(ENCODER_CHANNELS) - 1)


def conv3d(filters, init, channel_multiple=None, implementation=None, **kwargs):
    """A 3×3×3 'same' Conv3D with bias, computed by `implementation` where it takes the call
    (KernelConv3D); with `channel_multiple`, its input channels padded to a multiple of it
    (ChannelPaddedConv3D). Either way the same function."""
    if channel_multiple:
        return ChannelPaddedConv3D(filters, 3, padding="same", kernel_initializer=init.glorot(),
                                   channel_multiple=channel_multiple, implementation=implementation,
                                   **kwargs)
    return KernelConv3D(filters, 3, padding="same", kernel_initializer=init.glorot(),
                        implementation=implementation, **kwargs)


def conv_block(x, filters, norm, init, strides=1, name=None, instance_norm=None, channel_multiple=None,
               conv_implementation=None):
    """Conv3D 3×3×3 'same' with bias, then normalization, then LeakyReLU(0.01)."""
    x = conv3d(filters, init, channel_multiple, conv_implementation, strides=strides, name=f"{name}_conv")(x)
    layer = make_normalization(norm, name=f"{name}_norm", instance_norm=instance_norm)
    if layer is not None:
        x = layer(x)
    return keras.layers.LeakyReLU(negative_slope=0.01, name=f"{name}_act")(x)


def build_unet3d(in_channels=4, n_classes=4, normalization="instancenorm", seed=None,
                 spatial_shape=(None, None, None), instance_norm=None, image_channel_multiple=None,
                 conv_implementation=None):
    """The UNet3D as a `keras.Model` from (B, D, H, W, in_channels) to softmax probabilities.

    Spatial sizes may be left as None; each one used must be a multiple of 32. `instance_norm`
    replaces the instance-normalization layer class (Habana's on HPU). With
    `image_channel_multiple` the first convolution pads the image's channels up to a multiple of
    it: the same function, on faster GPU kernels (8 on GPUs, runtime/tasks/unet3d.py).
    `conv_implementation` computes the 3×3×3 stride-1 convolutions it takes (KernelConv3D).
    """
    for size in spatial_shape:
        if size is not None and size % DIVISOR:
            raise ValueError(f"UNet3D needs spatial sizes divisible by {DIVISOR}, got {spatial_shape}")
    init = Initializers(seed)
    block = functools.partial(conv_block, norm=normalization, init=init, instance_norm=instance_norm,
                              conv_implementation=conv_implementation)
    inputs = keras.Input(shape=tuple(spatial_shape) + (in_channels,), name="image")

    x = block(inputs, ENCODER_CHANNELS[0], name="input_0", channel_multiple=image_channel_multiple)
    x = block(x, ENCODER_CHANNELS[0], name="input_1")
    skips = [x]
    for depth, filters in enumerate(ENCODER_CHANNELS[1:], start=1):
        x = block(x, filters, strides=2, name=f"down{depth}_0")
        x = block(x, filters, name=f"down{depth}_1")
        skips.append(x)
    skips.pop()  # the bottleneck is not a skip

    for depth, filters in enumerate(DECODER_CHANNELS):
        x = UpConv2x(filters, kernel_initializer=init.glorot(), name=f"up{depth}_upconv")(x)
        x = keras.layers.Concatenate(axis=-1, name=f"up{depth}_concat")([x, skips.pop()])
        x = block(x, filters, name=f"up{depth}_0")
        x = block(x, filters, name=f"up{depth}_1")

    logits = conv3d(n_classes, init, implementation=conv_implementation, name="output_conv")(x)
    probs = softmax()(logits)
    return keras.Model(inputs, probs, name="unet3d")
