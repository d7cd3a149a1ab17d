"""The references' formulas, restated in NumPy from their definitions, against the tool: Keras 2's
binary cross-entropy, TensorFlow 1's Adam, centered RMSProp and momentum updates (three steps on a
small Keras model, float64), V-Net's gradient clipping, group normalization's ε, and the optimizer
settings a run keeps."""
import json
import os

import keras
import numpy as np
import pytest

from runtime import run_record
from runtime.settings import DataSettings, UNet3DSettings, VNetSettings
from runtime.loops import checkpoint
from tests.conftest import ROOT, main_here, tiny_vnet_flags
from model.layers import make_normalization
from model.losses import ce_loss
from model.optimizers import UPDATE_RULE, make_optimizer
from runtime.tasks.base import make_task

LR = 0.01


# ---- the definitions, in NumPy ------------------------------------------------------------------
def keras2_binary_crossentropy(y, p, eps=1e-7):
    """Keras 2's backend.binary_crossentropy on probabilities, in p's dtype: clip to [ε, 1 − ε],
    then −(y·log(p + ε) + (1 − y)·log(1 − p + ε))."""
    e = p.dtype.type(eps)
    p = np.clip(p, e, p.dtype.type(1) - e)
    return -(y * np.log(p + e) + (1 - y) * np.log(1 - p + e))


def tf1_adam(lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """tf.compat.v1.train.AdamOptimizer: m, v from 0; lr_t = lr·√(1 − β2^t)/(1 − β1^t);
    w −= lr_t·m/(√v + ε)."""
    def step(t, w, g, slots):
        m, v = slots.get("m", 0.0), slots.get("v", 0.0)
        slots["m"] = m = beta1 * m + (1 - beta1) * g
        slots["v"] = v = beta2 * v + (1 - beta2) * g * g
        return w - lr * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t) * m / (np.sqrt(v) + eps)
    return step


def tf1_centered_rmsprop(lr, momentum=0.0, decay=0.9, eps=1e-10):
    """tf.compat.v1.train.RMSPropOptimizer(centered=True): ms from 1, mg and mom from 0;
    ms = ρ·ms + (1 − ρ)·g², mg = ρ·mg + (1 − ρ)·g, mom = momentum·mom + lr·g/√(ms − mg² + ε),
    w −= mom."""
    def step(t, w, g, slots):
        ms, mg, mom = slots.get("ms", 1.0), slots.get("mg", 0.0), slots.get("mom", 0.0)
        slots["ms"] = ms = decay * ms + (1 - decay) * g * g
        slots["mg"] = mg = decay * mg + (1 - decay) * g
        slots["mom"] = mom = momentum * mom + lr * g / np.sqrt(ms - mg * mg + eps)
        return w - mom
    return step


def tf1_momentum(lr, momentum):
    """tf.compat.v1.train.MomentumOptimizer: accum = momentum·accum + g; w −= lr·accum."""
    def step(t, w, g, slots):
        slots["accum"] = accum = momentum * slots.get("accum", 0.0) + g
        return w - lr * accum
    return step


def clip_by_global_norm(grads, norm):
    """tf.clip_by_global_norm: every gradient times norm / max(global norm, norm)."""
    total = np.sqrt(sum(float((g * g).sum()) for g in grads))
    return [g * norm / max(total, norm) for g in grads]


# ---- a small model and three steps ----------------------------------------------------------------
def small_model(dtype="float64"):
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, dtype=dtype),
                              keras.layers.Dense(3, dtype=dtype)])
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:
        v.assign(rng.normal(size=v.shape))
    return model


def gradients(model, scale):
    """Three steps' gradients for `model`'s variables, of typical size `scale`."""
    rng = np.random.default_rng(1)
    return [[scale * rng.normal(size=v.shape) for v in model.trainable_variables] for _ in range(3)]


def tool_steps(optimizer, scale=1.0):
    """The small model's weights after each of three steps of `optimizer`."""
    model = small_model()
    weights = []
    for grads in gradients(model, scale):
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        weights.append([v.numpy() for v in model.trainable_variables])
    return weights


def reference_steps(rule, scale=1.0, clip=None):
    """The same three steps by the NumPy `rule`, on gradients clipped to `clip` when given."""
    model = small_model()
    ws = [np.array(v.numpy()) for v in model.trainable_variables]
    slots = [{} for _ in ws]
    weights = []
    for t, grads in enumerate(gradients(model, scale), start=1):
        grads = clip_by_global_norm(grads, clip) if clip else grads
        ws = [rule(t, w, g, s) for w, g, s in zip(ws, grads, slots)]
        weights.append(ws)
    return weights


def assert_steps_match(got, want):
    """Every step's move from the start weights agrees within 1e-6 relative."""
    start = [np.array(v.numpy()) for v in small_model().trainable_variables]
    for step_got, step_want in zip(got, want):
        for g, w, w0 in zip(step_got, step_want, start):
            np.testing.assert_allclose(g - w0, w - w0, rtol=1e-6, atol=0)


def vnet_optimizer(**fields):
    return make_task("vnet", VNetSettings(base_lr=LR, **fields), DataSettings()).optimizer()


# ---- tests --------------------------------------------------------------------------------------
def test_cross_entropy_is_keras2s():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, size=(2, 4, 3, 5))
    y = np.eye(4, dtype=np.float32)[labels]
    logits = rng.normal(scale=4, size=y.shape)
    p = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    p[0, 0, 0, 0] = [1, 0, 0, 0]  # confidently wrong where the label is not 0, and saturated
    p[1, 0, 0, 0] = [0, 0, 0, 1]
    for include in (False, True):
        first = 0 if include else 1
        want = keras2_binary_crossentropy(y[..., first:], p[..., first:]).astype(np.float64)
        want = want.mean(axis=(0, 1, 2, 3)).sum()
        got = float(keras.ops.convert_to_numpy(ce_loss(y, p, include_background=include)))
        assert got == pytest.approx(want, rel=1e-6)
    # One voxel, confidently wrong either way: −log(2e-7) for p = 0, and for p = 1 in float32,
    # where 1 − 1e-7 rounds to 1 − 1.19e-7, −log(1.19e-7 + 1e-7).
    wrong_0 = ce_loss(np.float32([[[[[0, 1]]]]]), np.float32([[[[[1, 0]]]]]))
    wrong_1 = ce_loss(np.float32([[[[[1, 0]]]]]), np.float32([[[[[0, 1]]]]]))
    assert float(keras.ops.convert_to_numpy(wrong_0)) == pytest.approx(-np.log(2e-7), rel=1e-6)
    assert float(keras.ops.convert_to_numpy(wrong_1)) == pytest.approx(
        -np.log(np.float64(np.float32(1) - np.float32(1 - np.float32(1e-7))) + 1e-7), rel=1e-6)
    assert float(keras.ops.convert_to_numpy(wrong_1)) == pytest.approx(15.333, abs=1e-3)


def test_unet3d_adam_is_tf1s():
    optimizer = make_task("unet3d", UNet3DSettings(learning_rate=LR), DataSettings()).optimizer()
    assert optimizer.epsilon == 1e-8
    assert_steps_match(tool_steps(optimizer), reference_steps(tf1_adam(LR)))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_vnet_rmsprop_is_tf1s_centered_rmsprop(momentum):
    optimizer = vnet_optimizer(momentum=momentum)
    assert_steps_match(tool_steps(optimizer), reference_steps(tf1_centered_rmsprop(LR, momentum)))
    # The first step, with the mean square starting at 1: about 1.05·lr·g, not lr·sign(g).
    fresh = vnet_optimizer(momentum=momentum)
    model = small_model()
    before = model.trainable_variables[0].numpy()
    g = gradients(model, 1e-3)[0]
    fresh.apply_gradients(zip(g, model.trainable_variables))
    np.testing.assert_allclose(before - model.trainable_variables[0].numpy(), LR * g[0] / np.sqrt(0.9),
                               rtol=1e-3)


def test_vnet_adam_and_sgd_are_tf1s():
    assert_steps_match(tool_steps(vnet_optimizer(optimizer="adam")), reference_steps(tf1_adam(LR)))
    assert_steps_match(tool_steps(vnet_optimizer(optimizer="sgd", momentum=0.9)),
                       reference_steps(tf1_momentum(LR, 0.9)))


@pytest.mark.parametrize("clipping", ["global_norm", "none", "applied_global_norm"])
def test_vnet_step_clips_only_with_applied_global_norm(clipping):
    # Gradients of global norm far above 1: clipping them changes RMSProp's steps (its mean square
    # starts at 1, so the step grows with the gradient until g² dominates).
    clip = 1.0 if clipping == "applied_global_norm" else None
    got = tool_steps(vnet_optimizer(gradient_clipping=clipping), scale=5.0)
    assert_steps_match(got, reference_steps(tf1_centered_rmsprop(LR), scale=5.0, clip=clip))
    other = reference_steps(tf1_centered_rmsprop(LR), scale=5.0, clip=None if clip else 1.0)
    assert np.abs(got[-1][0] - other[-1][0]).max() > 1e-3  # the other choice moves elsewhere


@pytest.mark.parametrize("name", ["rmsprop", "adam"])
def test_a_checkpoint_of_the_former_keras_optimizers_loads(name, tmp_path):
    """A model_dir trained before the tool followed TF1 (on Keras' Adam, or Keras' centered RMSprop
    with and without momentum) resumes: the slots come in the same order and shapes."""
    for momentum in (0.0, 0.9) if name == "rmsprop" else (0.0,):
        model = small_model("float32")
        old = (keras.optimizers.RMSprop(LR, momentum=momentum, centered=True) if name == "rmsprop"
               else keras.optimizers.Adam(LR))
        old.apply_gradients(zip(gradients(model, 1.0)[0], model.trainable_variables))
        model_dir = str(tmp_path / str(momentum))
        checkpoint.save(model_dir, 1, model, old)
        new = make_optimizer(name, LR, momentum=momentum)
        assert checkpoint.restore(checkpoint.latest_checkpoint(model_dir)[1], small_model("float32"),
                                  new) == 1
        assert [v.shape for v in new.variables] == [v.shape for v in old.variables]
        for a, b in zip(old.variables, new.variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_the_references_own_tf1_optimizers_agree():
    """tf.compat.v1.train's optimizers themselves, three steps in float64: they take their constants
    through float32 tensors, so they part from the definition (and the tool) by some 1e-6."""
    import tensorflow as tf
    for tool, tf1 in ((vnet_optimizer(momentum=0.9),
                       tf.compat.v1.train.RMSPropOptimizer(LR, momentum=0.9, centered=True)),
                      (vnet_optimizer(optimizer="adam"), tf.compat.v1.train.AdamOptimizer(LR))):
        model = small_model()
        variables = [tf.Variable(v.numpy()) for v in model.trainable_variables]
        for grads in gradients(model, 1.0):
            tf1.apply_gradients(zip([tf.constant(g) for g in grads], variables))
        got = tool_steps(tool)[-1]
        start = [np.array(v.numpy()) for v in small_model().trainable_variables]
        for g, w, w0 in zip(got, variables, start):
            np.testing.assert_allclose(g - w0, w.numpy() - w0, rtol=3e-5)


def test_group_normalization_epsilon_is_the_references():
    rng = np.random.default_rng(3)
    x = (0.03 * rng.normal(size=(2, 3, 3, 3, 32))).astype(np.float32)  # variance near ε
    out = np.asarray(make_normalization("groupnorm", name="gn")(x))
    g = x.astype(np.float64).reshape(2, 3, 3, 3, 16, 2)
    want = (g - g.mean((1, 2, 3, 5), keepdims=True)) / np.sqrt(g.var((1, 2, 3, 5), keepdims=True) + 1e-3)
    np.testing.assert_allclose(out, want.reshape(x.shape), rtol=1e-4, atol=1e-5)


# ---- the optimizer in the saved settings, and a model_dir of the former rule ---------------------
def test_settings_keep_the_optimizer_and_a_former_model_dir_resumes_with_a_notice(msd_phantom, tmp_path,
                                                                               capsys):
    # On the tool's smallest network, with Adam: the saved settings are the same for either.
    model_dir = tmp_path / "model"

    def train(epochs):
        """The notice lines of a resumed training run to `epochs` (2 steps each)."""
        result = main_here(capsys, *tiny_vnet_flags(msd_phantom, tmp_path, "--exec_mode", "train",
                                                    "--optimizer", "adam", "--train_split", "0.4",
                                                    "--batch_size", "2", "--train_epochs", str(epochs),
                                                    "--resume_training"))
        assert result.returncode == 0, result.stderr
        return [line for line in result.stdout.splitlines() if "optimizer state" in line]

    assert train(1) == []
    record = model_dir / "settings.json"
    body = json.loads(record.read_text())
    assert {k: body["run"][k] for k in ("optimizer", "epsilon", "update_rule")} == {
        "optimizer": "adam", "epsilon": 1e-8, "update_rule": "tf1"}
    assert run_record.former_update_rule(str(model_dir), UPDATE_RULE) is None  # no notice for it
    for key in ("update_rule", "optimizer", "epsilon"):
        del body["run"][key]
    record.write_text(json.dumps(body))  # as a model_dir trained before the rule was kept
    (notice,) = train(2)
    assert notice.startswith(f"{model_dir}: its optimizer state came from the tool's former update rule")
    os.remove(record)  # older still: no settings.json at all
    assert "former update rule" in run_record.former_update_rule(str(model_dir), UPDATE_RULE)


JAX_STEPS = """
import sys
import jax
jax.config.update("jax_enable_x64", True)
import keras, numpy as np
from model.optimizers import make_optimizer
data = np.load(sys.argv[1])
n = int(data["n"])
variables = [keras.Variable(data[f"w{i}"]) for i in range(n)]
out = {}
for name, momentum in (("adam", 0.0), ("rmsprop", 0.9)):
    optimizer = make_optimizer(name, float(data["lr"]), momentum=momentum)
    optimizer.build(variables)
    weights, state = [v.value for v in variables], [v.value for v in optimizer.variables]
    step = jax.jit(optimizer.stateless_apply)  # as runtime/engines/jax_engine.py applies it
    for t in range(3):
        weights, state = step(state, [data[f"g{t}_{i}"] for i in range(n)], weights)
    out.update({f"{name}{i}": np.asarray(w) for i, w in enumerate(weights)})
np.savez(sys.argv[2], **out)
"""


def test_the_optimizers_compute_the_same_on_jax(tmp_path, jax_env):
    import subprocess
    import sys
    model = small_model()
    start = [np.array(v.numpy()) for v in model.trainable_variables]
    grads = gradients(model, 1.0)
    np.savez(tmp_path / "in.npz", n=len(start), lr=LR, **{f"w{i}": w for i, w in enumerate(start)},
             **{f"g{t}_{i}": g for t, step in enumerate(grads) for i, g in enumerate(step)})
    env = jax_env
    result = subprocess.run([sys.executable, "-c", JAX_STEPS, str(tmp_path / "in.npz"),
                             str(tmp_path / "out.npz")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as out:
        for name, rule in (("adam", tf1_adam(LR)), ("rmsprop", tf1_centered_rmsprop(LR, 0.9))):
            want = reference_steps(rule)[-1]
            for i, (w, w0) in enumerate(zip(want, start)):
                np.testing.assert_allclose(out[f"{name}{i}"] - w0, w - w0, rtol=1e-6, atol=0)
