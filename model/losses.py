"""UNet3D losses and evaluation metrics on softmax outputs, written with `keras.ops`.

Tensors are (B, D, H, W, C) with one-hot labels `y` and probabilities `p`. Class 0 (background)
is dropped unless `include_background` is set.
"""
from keras import ops

from model.layers import at_least_float32

DICE_EPS = 1e-5
CE_EPS = 1e-7
TUMOUR_CLASSES = {1: "TumorCore", 2: "PeritumoralEdema", 3: "EnhancingTumor"}


def _select(y, p, include_background):
    if include_background:
        return y, p
    return y[..., 1:], p[..., 1:]


def _spatial_axes(x):
    return tuple(range(1, len(x.shape) - 1))


def per_sample_dice(y, p):
    """2·Σ(y·p) / (Σy + Σp + 1e-5) over the spatial axes: shape (B, C)."""
    axes = _spatial_axes(y)
    intersection = ops.sum(y * p, axis=axes)
    denominator = ops.sum(y, axis=axes) + ops.sum(p, axis=axes)
    return 2.0 * intersection / (denominator + DICE_EPS)


def dice_loss(y, p, include_background=False):
    """Σ over classes of (1 − dice_c), dice_c averaged over the batch."""
    y, p = _select(at_least_float32(y), at_least_float32(p), include_background)
    return ops.sum(1.0 - ops.mean(per_sample_dice(y, p), axis=0))


def ce_loss(y, p, include_background=False):
    """Σ over classes of the binary cross-entropy averaged over batch and space, as Keras 2's
    `binary_crossentropy` (the reference's) computes it: p clipped to [ε, 1 − ε], then
    −(y·log(p + ε) + (1 − y)·log(1 − p + ε)), ε = 1e-7."""
    y, p = _select(at_least_float32(y), at_least_float32(p), include_background)
    p = ops.clip(p, CE_EPS, 1.0 - CE_EPS)
    bce = -(y * ops.log(p + CE_EPS) + (1.0 - y) * ops.log(1.0 - p + CE_EPS))
    return ops.sum(ops.mean(bce, axis=tuple(range(len(bce.shape) - 1))))


def dice_ce_loss(y, p, include_background=False):
    """The dice loss plus the cross-entropy loss."""
    return dice_loss(y, p, include_background) + ce_loss(y, p, include_background)


LOSSES = {"dice": dice_loss, "ce": ce_loss, "dice+ce": dice_ce_loss}


def get_loss(name, include_background=False):
    """The loss function `(y, p) -> scalar` called `name` (dice, ce or dice+ce)."""
    fn = LOSSES[name]
    return lambda y, p: fn(y, p, include_background)


def eval_dice_per_sample(y, p, include_background=False, class_names=None):
    """Hard dice of every sample: a dict of name -> (B,) tensor.

    Probabilities are rounded (p > 0.5). Keys: the names of classes 1, 2, ... (`class_names`;
    by default the reference's TumorCore, PeritumoralEdema, EnhancingTumor), Background with
    include_background, MeanDice (their mean) and WholeTumor (the dice of the union of every
    class but the background).
    """
    y = at_least_float32(y)
    hard = ops.cast(ops.greater(p, 0.5), y.dtype)
    dice = per_sample_dice(y, hard)
    if class_names is None:
        class_names = TUMOUR_CLASSES.values()
    names = (["Background"] if include_background else []) + list(class_names)
    first = 0 if include_background else 1
    dice = dice[:, first:]
    scores = {name: dice[:, i] for i, name in enumerate(names)}
    scores["MeanDice"] = ops.mean(dice, axis=-1)
    whole_y = ops.max(y[..., 1:], axis=-1, keepdims=True)
    whole_p = ops.max(hard[..., 1:], axis=-1, keepdims=True)
    scores["WholeTumor"] = per_sample_dice(whole_y, whole_p)[:, 0]
    return scores


# ---- V-Net (MSD) -------------------------------------------------------------------------------
VNET_EPS = 1e-6


def soft_dice_per_sample(y, p):
    """Sørensen dice of every sample and class over all voxels: (2·Σ(p·y) + ε) / (Σ(p + y) + ε), (B, C)."""
    y, p = at_least_float32(y), at_least_float32(p)
    axes = _spatial_axes(y)
    return (2.0 * ops.sum(p * y, axis=axes) + VNET_EPS) / (ops.sum(p + y, axis=axes) + VNET_EPS)


def vnet_dice_loss(y, p):
    """Σ over classes (background included) of 1 − dice_c, dice_c averaged over the batch."""
    return ops.sum(1.0 - ops.mean(soft_dice_per_sample(y, p), axis=0))


def vnet_metrics(label_names):
    """A metrics function `(y, p) -> {name: (B,)}`: each label's soft dice (`<label>_dice`, as the
    reference reports) and the hard dice of argmax masks (`<label>_hard_dice`)."""
    keys = [name.lower().replace(" ", "_") for name in label_names]

    def metrics(y, p):
        soft = soft_dice_per_sample(y, p)
        hard_p = ops.one_hot(ops.argmax(p, axis=-1), len(keys))
        hard = soft_dice_per_sample(y, hard_p)
        scores = {f"{k}_dice": soft[:, i] for i, k in enumerate(keys)}
        scores.update({f"{k}_hard_dice": hard[:, i] for i, k in enumerate(keys)})
        return scores

    return metrics
