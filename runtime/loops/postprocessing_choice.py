"""Postprocessing chosen on the validation cases, as nnU-Net's determine_postprocessing: every
candidate operation of every region is scored with the challenge's metrics, and a region keeps
the best one only if it beats doing nothing by a margin.

Regions are decided in the order they are applied (larger first, dataset/postprocessing.py), each
on the predictions as the operations already chosen left them, so the final score is the one the
chosen operations give together and never below the raw one. An operation on one region can
change the others (an enhancing speck removed into background leaves the core and the whole
tumour too), so a candidate is judged by the criterion's mean over every region and case; the
table keeps each region's mean as well. The predictions are given once; a candidate that leaves
every case as it was, or as another candidate left it, is not scored again.
"""
import hashlib
from dataclasses import replace
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from dataset.postprocessing import NONE, apply_region, check_operations, region_order
from runtime.loops.challenge_metrics import SCORES, ChallengeMetrics

DEFAULT_CRITERION = ("dice", "lesion_f1")
LOWER_IS_BETTER = {"hd95", "lesion_hd95", "lesion_fp", "lesion_fn"}
DEFAULT_MARGIN = 0.001
REMOVE_SIZES = (10, 50, 200, 500)  # voxels: remove_small's grid
RELABEL_SIZES = (50, 200, 500, 1000)  # voxels: relabel_small's grid (the enhancing region)


class Choice(NamedTuple):
    """`description`: postprocessing.json's body; `raw_rows` and `rows`: the metric rows of the
    validation cases before and after the chosen postprocessing; `predictions`: the label maps
    after it."""
    description: dict
    raw_rows: list
    rows: list
    predictions: list


def criterion_columns(criterion):
    """(columns, +1 when higher is better or -1) of a criterion: one metrics.csv score column or
    several (their mean), as a name, a comma-separated string or a sequence; a ValueError names
    an unknown column or a mix of directions."""
    columns = tuple(c.strip() for c in (criterion.split(",") if isinstance(criterion, str)
                                        else criterion))
    unknown = [c for c in columns if c not in SCORES]
    if unknown or not columns:
        raise ValueError(f"criterion {','.join(columns)!r}: {unknown or 'nothing'} is not a "
                         f"metrics.csv score column ({', '.join(SCORES)})")
    lower = {c in LOWER_IS_BETTER for c in columns}
    if len(lower) > 1:
        raise ValueError(f"criterion {','.join(columns)!r} mixes scores where higher is better "
                         "with scores where lower is better")
    return columns, (-1 if lower == {True} else 1)


def candidates(convention, remove_sizes=REMOVE_SIZES, relabel_sizes=RELABEL_SIZES):
    """{region: [operation, ...]} to try, mildest first ("none" aside): remove_small at each
    size, keep_largest, and for the enhancing region ET relabel_small at each size."""
    grid = {}
    for region in region_order(convention):
        tried = ([{"op": "remove_small", "voxels": int(n)} for n in remove_sizes]
                 + [{"op": "keep_largest"}] + [{"op": "relabel_small", "voxels": int(t)}
                                               for t in relabel_sizes])
        grid[region] = [op for op in tried if _fits(region, op, convention)]
    return grid


def _fits(region, operation, convention):
    """Whether the convention allows `operation` on `region`."""
    try:
        check_operations({region: operation}, convention)
        return True
    except ValueError:
        return False


def _foreground_box(prediction, reference, background):
    """The slices of the box around the foreground of both label maps, grown by a voxel (the
    whole volume when both are empty)."""
    found = ndimage.find_objects(((prediction != background) | (reference != background))
                                 .astype(np.uint8))
    if not found:
        return tuple(slice(None) for _ in np.shape(prediction))
    return tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in found[0])


def choose_postprocessing(cases, convention, criterion=DEFAULT_CRITERION, margin=DEFAULT_MARGIN,
                          grid=None):
    """Choose the postprocessing of `convention` (a LabelConvention) on the validation `cases`:
    (name, prediction, reference, spacing mm) with label maps in the convention's source values.
    `criterion`: see criterion_columns; `margin`: in the criterion's units; `grid`: {region:
    [operation]} (default candidates(convention)). Returns a Choice."""
    columns, sign = criterion_columns(criterion)
    grid = candidates(convention) if grid is None else grid
    regions = convention.regions
    # A region at a time, on binary masks: a candidate re-scores only the regions it changed.
    # Postprocessing never adds foreground, so each case is scored inside the box of its raw
    # prediction's and reference's foreground, grown by a voxel: the same metrics, less volume.
    evaluator = ChallengeMetrics(replace(convention, regions=(("region", (1,)),)))
    boxes = [_foreground_box(case[1], case[2], convention.labels[0]) for case in cases]
    references = [{region: np.isin(case[2][box], values).astype(np.uint8)
                   for region, values in regions} for case, box in zip(cases, boxes)]
    cache = {}

    def score(predictions):
        rows = []
        for i, ((name, _, _, spacing), prediction) in enumerate(zip(cases, predictions)):
            for region, values in regions:
                mask = np.isin(prediction[boxes[i]], values)
                key = (i, region, hashlib.blake2b(np.packbits(mask)).digest())
                if key not in cache:
                    row = evaluator.case(name, mask, references[i][region], spacing)[0]
                    cache[key] = dict(row, region=region)
                rows.append(cache[key])
        means = {region: float(np.mean([np.mean([row[c] for c in columns]) for row in rows
                                        if row["region"] == region])) for region, _ in regions}
        return float(np.mean(list(means.values()))), means, rows

    current = [np.asarray(case[1]) for case in cases]
    best_score, best_regions, raw_rows = score(current)
    before, table, chosen = best_score, [], {}
    for region in region_order(convention):
        none_score, none_index = best_score, len(table)
        table.append({"region": region, "operation": dict(NONE), "score": none_score,
                      "regions": best_regions, "chosen": False})
        best = (dict(NONE), current, best_score, best_regions, none_index)
        for operation in grid.get(region, ()):
            trial = [apply_region(p, region, operation, convention) for p in current]
            value, means, _ = score(trial)
            table.append({"region": region, "operation": operation, "score": value,
                          "regions": means, "chosen": False})
            if sign * (value - best[2]) > 0 and sign * (value - none_score) > margin:
                best = (operation, trial, value, means, len(table) - 1)
        chosen[region], current, best_score, best_regions, row_index = best
        table[row_index]["chosen"] = True
    rows = score(current)[2]
    description = {
        "convention": convention.name,
        "operations": chosen, "criterion": list(columns),
        "higher_is_better": sign > 0, "margin": margin,
        "score_before": before, "score_after": best_score,
        "candidates": table, "validation_cases": [case[0] for case in cases]}
    return Choice(description, raw_rows, rows, current)
