"""The backends' compiled steps (TensorFlow, JAX) and the convolution kernels they may use."""
