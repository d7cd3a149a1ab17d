"""Pictures with matplotlib (the non-interactive Agg backend): a case's slices with its masks
outlined, and the training curves (loss and validation dice against the step)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))  # (name, axis held fixed)
COLOURS = ("tab:red", "tab:green", "tab:blue", "tab:orange", "tab:purple", "tab:cyan")
REMOVED_COLOUR = "magenta"  # what postprocessing removed (or relabelled), dotted


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def tumour_centre(*masks: Optional[np.ndarray]) -> tuple[int, ...]:
    """The voxel at the centre of mass of the first mask with a foreground voxel, else the
    volume's centre."""
    for mask in masks:
        if mask is not None and np.any(mask):
            return tuple(int(round(c)) for c in np.argwhere(mask > 0).mean(axis=0))
    return tuple(s // 2 for s in masks[0].shape)


def _slice(volume, axis, index):
    """The 2-D slice of `volume` at `index` along `axis`, turned for display (rows first)."""
    return np.take(volume, index, axis=axis).T


def image_planes(image: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """The axial, coronal and sagittal slices of `image` (D, H, W) through `centre`, turned for
    display: what case_png draws of the image, kept where the volume is not."""
    return [_slice(image, axis, centre[axis]) for _, axis in VIEWS]


def case_png(path: str, image: np.ndarray | Sequence[np.ndarray], prediction: np.ndarray,
             truth: Optional[np.ndarray] = None, class_names: Optional[Sequence[str]] = None,
             title: str = "", removed: Optional[np.ndarray] = None,
             centre: Optional[Sequence[int]] = None) -> None:
    """Write `path`: the axial, coronal and sagittal slices of `image` (D, H, W) through the
    tumour's centre, with the outline of each class of `truth` (solid) and `prediction`
    (dashed), and of `removed` (the voxels postprocessing changed) dotted in REMOVED_COLOUR.
    The centre comes from the truth, else the prediction, else `removed`, unless given; `image`
    may be its `image_planes` through that centre instead."""
    from matplotlib.lines import Line2D
    plt = _pyplot()
    classes = sorted(set(np.unique(prediction).tolist())
                     | (set(np.unique(truth).tolist()) if truth is not None else set()))
    classes = [c for c in classes if c != 0]
    if centre is None:
        centre = tumour_centre(*(m for m in (truth, prediction, removed) if m is not None))
    planes = image_planes(image, centre) if isinstance(image, np.ndarray) else list(image)
    figure, axes = plt.subplots(1, len(VIEWS), figsize=(4 * len(VIEWS), 4.4))
    for ax, plane_image, (view, axis) in zip(axes, planes, VIEWS):
        ax.imshow(plane_image, cmap="gray", origin="lower")
        outlines = [((truth == c) if truth is not None else None, COLOURS[(c - 1) % len(COLOURS)],
                     "solid") for c in classes]
        outlines += [(prediction == c, COLOURS[(c - 1) % len(COLOURS)], "dashed") for c in classes]
        outlines.append((removed, REMOVED_COLOUR, "dotted"))
        for mask, colour, style in outlines:
            if mask is None:
                continue
            plane = _slice(mask, axis, centre[axis]).astype(float)
            if plane.any():
                ax.contour(plane, levels=[0.5], colors=[colour], linestyles=style,
                           linewidths=1.6 if colour == REMOVED_COLOUR else 1.2)
        ax.set_title(f"{view} {'xyz'[axis]}={centre[axis]}", fontsize=9)
        ax.axis("off")
    names = class_names or [f"class {c}" for c in range(max(classes, default=0) + 1)]
    handles = [Line2D([], [], color=COLOURS[(c - 1) % len(COLOURS)], label=names[c])
               for c in classes]
    handles.append(Line2D([], [], color="black", label="prediction", linestyle="dashed"))
    if truth is not None:
        handles.append(Line2D([], [], color="black", label="ground truth"))
    if removed is not None and removed.any():
        handles.append(Line2D([], [], color=REMOVED_COLOUR, label="changed by postprocessing",
                              linestyle="dotted"))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
                  frameon=False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.06, 1, 0.95))
    figure.savefig(path, dpi=100)
    plt.close(figure)


def training_curves_png(path: str, losses: Sequence[tuple[int, float]],
                        evaluations: Sequence[tuple[int, dict[str, float]]]) -> None:
    """Write `path`: the training loss against the step (`losses`: [(step, loss)]) and, on a
    second axis, every validation score against the step (`evaluations`: [(step, {name: value})])."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(8, 4.5))
    if losses:
        steps, values = zip(*losses)
        ax.plot(steps, values, color="black", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()
    if evaluations:
        other = ax.twinx()
        names = list(dict.fromkeys(name for _, scores in evaluations for name in scores))
        for i, name in enumerate(names):
            points = [(step, scores[name]) for step, scores in evaluations if name in scores]
            other.plot(*zip(*points), marker="o", color=COLOURS[i % len(COLOURS)],
                       label=f"validation {name}")
        other.set_ylabel("validation dice")
        other.set_ylim(0, 1)
        more_handles, more_labels = other.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if handles:
        ax.legend(handles, labels, loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
