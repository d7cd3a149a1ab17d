"""The UNet3D of the reference's model/layers.py: size, outputs, every normalization, and the up-convolution."""
import os
import subprocess

import keras
import numpy as np
import pytest

from model.layers import ChannelPaddedConv3D, InstanceNormalization, UpConv2x
from model.unet3d import build_unet3d
from tests.conftest import ROOT


def test_parameter_count_matches_reference():
    model = build_unet3d(in_channels=4, n_classes=4, normalization="instancenorm",
                         spatial_shape=(128, 128, 128))
    assert model.count_params() == 31_200_036
    assert model.output_shape == (None, 128, 128, 128, 4)


@pytest.mark.parametrize("norm", ["instancenorm", "groupnorm", "batchnorm", "none"])
def test_each_normalization_runs_and_outputs_probabilities(norm):
    model = build_unet3d(in_channels=3, n_classes=4, normalization=norm, seed=1)
    x = np.random.default_rng(0).normal(size=(2, 32, 64, 32, 3)).astype("float32")
    probs = keras.ops.convert_to_numpy(model(x))
    assert probs.shape == (2, 32, 64, 32, 4)
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)


def test_seed_fixes_the_weights():
    first = build_unet3d(normalization="none", seed=7).get_weights()
    second = build_unet3d(normalization="none", seed=7).get_weights()
    other = build_unet3d(normalization="none", seed=8).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.array_equal(first[0], other[0])
    # Two layers of the same shape must not share their initial kernel.
    kernels = [w for w in first if w.shape == (3, 3, 3, 32, 32)]
    assert len(kernels) >= 2 and not np.array_equal(kernels[0], kernels[1])


def test_spatial_size_must_be_divisible_by_32():
    with pytest.raises(ValueError, match="divisible by 32"):
        build_unet3d(spatial_shape=(128, 128, 100))


def test_upconv_equals_transposed_convolution():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 4, 5, 6)).astype("float32")
    layer = UpConv2x(5)
    layer.build(x.shape)
    reference = keras.layers.Conv3DTranspose(5, 2, strides=2)
    reference.build(x.shape)
    assert tuple(reference.kernel.shape) == tuple(layer.kernel.shape)
    bias = rng.normal(size=(5,)).astype("float32")
    reference.set_weights([keras.ops.convert_to_numpy(layer.kernel), bias])
    layer.bias.assign(bias)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)),
                               keras.ops.convert_to_numpy(reference(x)), rtol=1e-5, atol=1e-5)


def test_instance_norm_normalizes_each_sample_and_channel():
    x = np.random.default_rng(2).normal(3.0, 5.0, size=(2, 4, 4, 4, 3)).astype("float32")
    y = keras.ops.convert_to_numpy(InstanceNormalization()(x))
    np.testing.assert_allclose(y.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(1, 2, 3)), 1.0, rtol=1e-4)


def test_model_package_does_not_import_tensorflow():
    found = subprocess.run(["grep", "-rn", "import tensorflow", os.path.join(ROOT, "model")],
                           capture_output=True, text=True)
    assert found.stdout == ""


def test_padding_the_image_channels_keeps_the_function_and_its_gradients():
    import tensorflow as tf
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 8, 4)).astype("float32")
    plain = keras.layers.Conv3D(8, 3, strides=2, padding="same", bias_initializer="ones")
    padded = ChannelPaddedConv3D(8, 3, strides=2, padding="same", channel_multiple=8)
    plain.build(x.shape)
    padded.build(x.shape)
    padded.set_weights(plain.get_weights())
    assert padded.kernel.shape == (3, 3, 3, 4, 8)  # the weights keep Conv3D's layout
    grads = []
    for layer in (plain, padded):
        with tf.GradientTape() as tape:
            out = layer(x)
            loss = tf.reduce_sum(out * out)
        grads.append((out.numpy(), tape.gradient(loss, layer.kernel).numpy()))
    np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-4)
    a = build_unet3d(normalization="none", seed=3)
    b = build_unet3d(normalization="none", seed=3, image_channel_multiple=8)
    assert a.count_params() == b.count_params()
    image = np.random.default_rng(3).normal(size=(1, 32, 32, 32, 4)).astype("float32")
    np.testing.assert_allclose(a(image).numpy(), b(image).numpy(), atol=1e-5)
