"""Postprocessing of a label map (after argmax) per region of a label convention, as chosen on the
validation cases (runtime/loops/postprocessing_choice.py) and kept as postprocessing.json.

Operations (one per region, JSON values): {"op": "none"}; {"op": "remove_small", "voxels": N}
removes the region's connected components (26-neighbour, as the challenge counts lesions) of
fewer than N voxels; {"op": "keep_largest"} keeps its largest component alone; {"op":
"relabel_small", "voxels": T} (the enhancing region "ET" alone) relabels a predicted enhancing
tumour of fewer than T voxels in all as the core label (the first label of the next larger
region that is not enhancing: NCR/NET, NETC, non-enhancing tumour). A removed component takes
the label of the next larger region around it: the most frequent label of its 26-neighbour
border among those of the smallest enclosing region, else of the next one, else background (a
core speck inside oedema becomes oedema, a whole-tumour speck background). Outer regions are
processed first, so the regions stay nested and the result is a label map of the convention.
NumPy and scipy.ndimage alone, so that segment.py can use it.
"""
import json

import numpy as np
from scipy import ndimage

from common.errors import UserError

FILE = "postprocessing.json"
STRUCTURE = np.ones((3, 3, 3), bool)  # 26-neighbour connectivity
OPERATIONS = ("none", "remove_small", "keep_largest", "relabel_small")
NONE = {"op": "none"}


def _layout(convention, in_classes):
    """({region: its values}, background value) of a LabelConvention or its as_dict(), in source
    label values or, `in_classes`, in the network's class indices."""
    plain = isinstance(convention, dict)
    labels = convention["labels"] if plain else convention.labels
    regions = convention["regions"].items() if plain else convention.regions
    index = {value: i for i, value in enumerate(labels)}
    regions = {name: tuple(index[v] if in_classes else v for v in values)
               for name, values in regions}
    return regions, (0 if in_classes else labels[0])


def region_order(convention):
    """The convention's region names in the order they are processed: larger regions first."""
    regions, _ = _layout(convention, False)
    return sorted(regions, key=lambda name: -len(regions[name]))


def _fallbacks(regions, name):
    """The labels a voxel removed from region `name` may take, in order of preference: per
    enclosing region (smallest first), its labels outside the next smaller one."""
    inner, steps = set(regions[name]), []
    for outer in sorted((r for r in regions.values() if set(r) > set(regions[name])), key=len):
        steps.append(tuple(v for v in outer if v not in inner))
        inner |= set(outer)
    return steps


def _remove(out, original, components, drop, steps, background):
    """Give each component of `components` whose id is in `drop` the label around it (in place)."""
    for i, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None or i not in drop:
            continue
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        piece = components[grown] == i
        around = original[grown][ndimage.binary_dilation(piece, STRUCTURE) & ~piece]
        new = background
        for step in steps:
            counts = [np.count_nonzero(around == v) for v in step]
            if max(counts) > 0:
                new = step[int(np.argmax(counts))]
                break
        out[grown][piece] = new


def apply_region(label_map, region, operation, convention, in_classes=False):
    """`label_map` after one `operation` on `region` (a new array; the input is left alone)."""
    regions, background = _layout(convention, in_classes)
    original = np.asarray(label_map)
    out = original.copy()
    inside = np.isin(original, regions[region])
    op = operation["op"]
    if op == "relabel_small":
        if 0 < np.count_nonzero(inside) < operation["voxels"]:
            out[inside] = _fallbacks(regions, region)[0][0]
        return out
    if op == "none" or not inside.any():
        return out
    components, n = ndimage.label(inside, structure=STRUCTURE)
    sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
    if op == "remove_small":
        drop = {i + 1 for i in np.flatnonzero(sizes < operation["voxels"])}
    else:  # keep_largest
        drop = set(range(1, n + 1)) - {int(np.argmax(sizes)) + 1}
    if drop:
        _remove(out, original, components, drop, _fallbacks(regions, region), background)
    return out


def postprocess(label_map, operations, convention, in_classes=False):
    """`label_map` (source label values, or class indices with `in_classes`) after the
    `operations` ({region: operation}; regions left out are left alone), larger regions first;
    the input itself when every operation is "none"."""
    out = np.asarray(label_map)
    for region in region_order(convention):
        if operations.get(region, NONE)["op"] != "none":
            out = apply_region(out, region, operations[region], convention, in_classes)
    return out


def check_operations(operations, convention):
    """`operations` ({region: operation}) checked against the convention; returns them, or
    raises ValueError with a one-line reason."""
    regions, _ = _layout(convention, False)
    if not isinstance(operations, dict):
        raise ValueError("'operations' is not an object of region: operation")
    for region, operation in operations.items():
        if region not in regions:
            name = convention["name"] if isinstance(convention, dict) else convention.name
            raise ValueError(f"names region {region!r}, which the {name} convention lacks: its "
                             f"regions are {', '.join(regions) or 'none'}")
        op = operation.get("op") if isinstance(operation, dict) else None
        if op not in OPERATIONS:
            raise ValueError(f"region {region}: operation {operation!r} is none of {OPERATIONS}")
        voxels = operation.get("voxels")
        if op in ("remove_small", "relabel_small") and not (
                isinstance(voxels, int) and not isinstance(voxels, bool) and voxels > 0):
            raise ValueError(f"region {region}: {op} needs 'voxels', a positive integer")
        if op == "relabel_small" and (region != "ET" or not _fallbacks(regions, region)):
            raise ValueError(f"region {region}: relabel_small is for an enhancing region 'ET' "
                             "inside a larger region")
    return operations


def operation_text(operation):
    """One operation as the tool prints it: none, remove_small 50, keep_largest, relabel_small 200."""
    voxels = operation.get("voxels")
    return operation["op"] + ("" if voxels is None else f" {voxels}")


def operations_text(operations):
    """{region: operation} as one phrase: 'WT remove_small 50, TC none, ET relabel_small 200'."""
    return ", ".join(f"{region} {operation_text(op)}" for region, op in operations.items())


def read_postprocessing(path, convention):
    """The {region: operation} of a postprocessing.json, checked against the convention; a
    UserError (one line, naming the file) when it is unreadable or does not fit."""
    try:
        with open(path) as handle:
            operations = json.load(handle)["operations"]
        return check_operations(operations, convention)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        reason = (f"no {err} entry" if isinstance(err, KeyError)
                  else (str(err).splitlines() or [type(err).__name__])[0])
        raise UserError(f"{path}: not a usable postprocessing file ({reason}); choose it again "
                        "with --choose_postprocessing or remove it") from None


def write_postprocessing(path, description):
    """Write a postprocessing description (the chooser's dict, with 'operations') as JSON."""
    with open(path, "w") as handle:
        json.dump(description, handle, indent=2)
        handle.write("\n")
