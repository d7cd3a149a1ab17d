"""The BraTS challenge's metrics of whole-volume masks, computed with panoptica as the official
evaluation sets it up.

Each region of the label convention (ET, TC, WT, ...) is a panoptica label group (a merge group
when it unites several labels). Its connected components are the lesions; reference and
predicted lesions are paired by maximum bipartite matching on Dice, any overlap (Dice above
1e-6) being enough. Per case and region panoptica gives the global Dice, NSD and HD95 of the
region's binary masks, and lesion-wise the true positives, false positives, false negatives,
their F1 (recognition quality) and the mean Dice, NSD and HD95 of the matched lesions
(segmentation quality). Without a true positive Dice and NSD are 0 and HD95 is infinite.

Distances: HD95 is in mm from the voxel spacing; NSD is measured as the official evaluation
does, which passes no spacing (voxel units: panoptica's tolerance of 0.5 for the global NSD and
of one voxel for the lesions' NSD). Reported values follow the challenge's ranking: an infinite
HD95 is 373 mm, and a region empty in both masks scores Dice, NSD and F1 1 and HD95 0.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import warnings
from typing import Any, Sequence

import numpy as np

from dataset.conventions import CONVENTIONS, DEFAULT_CONVENTION

COLUMNS = ("case", "region", "dice", "nsd", "hd95", "lesion_tp", "lesion_fp", "lesion_fn",
           "lesion_f1", "lesion_dice", "lesion_nsd", "lesion_hd95")
SCORES = COLUMNS[2:]
HD95_INFINITE = 373.0  # the ranking's value for an infinite HD95 (mm)
MATCHING_THRESHOLD = 1e-6


def voxel_spacing(affine: Any) -> tuple[float, float, float]:
    """The voxel sizes (mm) along the three axes of a NIfTI affine: its columns' lengths."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0))


def record_spacing(record: dict[str, Any]) -> tuple[float, float, float]:
    """The voxel sizes (mm) along the axes of a record's volume, from its NIfTI affine: the
    preprocessing swapped the image's axes 0 and 1."""
    spacing = voxel_spacing(record["affine"])
    return (spacing[1], spacing[0], spacing[2])


def _reported(name, value):
    """A panoptica value as the ranking reports it: infinite HD95 → 373; NaN (nothing in
    either mask) → 1 for Dice, NSD and F1, 0 for HD95."""
    value = float(value)
    hd95 = name.endswith("hd95")
    if math.isnan(value):
        return 0.0 if hd95 else 1.0
    if math.isinf(value):
        return HD95_INFINITE
    return value


class ChallengeMetrics:
    """The challenge's metrics of one label convention (default: BraTS 2019–2021).

    `case(name, prediction, reference, spacing)` scores two masks of the convention's own label
    values and returns one row (a dict of COLUMNS) per region.
    """

    def __init__(self, convention=None):
        from panoptica import (ConnectedComponentsInstanceApproximator, InputType,
                               MaxBipartiteMatching, Metric, Panoptica_Evaluator,
                               disable_citation_reminder)
        from panoptica.utils import (EdgeCaseHandler, EdgeCaseResult, LabelGroup,
                                     LabelMergeGroup, SegmentationClassGroups)
        from panoptica.utils.edge_case_handling import MetricZeroTPEdgeCaseHandling
        disable_citation_reminder()
        self.convention = convention or CONVENTIONS[DEFAULT_CONVENTION]
        self.regions = [name for name, _ in self.convention.regions]
        groups = {name: (LabelGroup(list(values)) if len(values) == 1
                         else LabelMergeGroup(list(values)))
                  for name, values in self.convention.regions}

        def zero_tp(result):
            return MetricZeroTPEdgeCaseHandling(no_instances_result=EdgeCaseResult.NAN,
                                                default_result=result)

        with contextlib.redirect_stdout(io.StringIO()):  # it prints that regions share labels
            class_groups = SegmentationClassGroups(groups)
        edge_cases = EdgeCaseHandler({Metric.DSC: zero_tp(EdgeCaseResult.ZERO),
                                      Metric.NSD: zero_tp(EdgeCaseResult.ZERO),
                                      Metric.HD95: zero_tp(EdgeCaseResult.INF)})
        metrics = [Metric.DSC, Metric.NSD, Metric.HD95]
        self._hd95 = Metric.HD95
        self.evaluator = Panoptica_Evaluator(
            expected_input=InputType.SEMANTIC,
            instance_approximator=ConnectedComponentsInstanceApproximator(),
            instance_matcher=MaxBipartiteMatching(matching_metric=Metric.DSC,
                                                  matching_threshold=MATCHING_THRESHOLD),
            edge_case_handler=edge_cases,
            segmentation_class_groups=class_groups,
            instance_metrics=metrics, global_metrics=metrics)

    def case(self, name: str, prediction: np.ndarray, reference: np.ndarray,
             spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> list[dict[str, Any]]:
        """[{column: value}] of one case, a row per region, from the `prediction` and `reference`
        masks (the convention's label values, same shape) on a grid of `spacing` mm."""
        prediction = np.asarray(prediction, np.uint8)
        reference = np.asarray(reference, np.uint8)
        spacing = tuple(float(s) for s in spacing)
        isotropic_unit = all(s == 1.0 for s in spacing)
        with warnings.catch_warnings():  # panoptica warns of NSD's default tolerance each time
            warnings.simplefilter("ignore")
            in_voxels = self.evaluator.evaluate(prediction, reference, verbose=False)
            in_mm = in_voxels if isotropic_unit else self.evaluator.evaluate(
                prediction, reference, voxelspacing=spacing, verbose=False)
        rows = []
        for region, values in self.convention.regions:
            result, mm = in_voxels[region.lower()], in_mm[region.lower()]
            hd95 = result.global_bin_hd95
            if np.isfinite(hd95) and not isotropic_unit:  # panoptica's global metrics are in voxels
                pred_mask, ref_mask = np.isin(prediction, values), np.isin(reference, values)
                hd95 = self._hd95(ref_mask, pred_mask, voxelspacing=spacing)
            rows.append({"case": name, "region": region,
                         "dice": _reported("dice", result.global_bin_dsc),
                         "nsd": _reported("nsd", result.global_bin_nsd),
                         "hd95": _reported("hd95", hd95),
                         "lesion_tp": int(result.tp), "lesion_fp": int(result.fp),
                         "lesion_fn": int(result.fn),
                         "lesion_f1": _reported("lesion_f1", result.rq),
                         "lesion_dice": _reported("lesion_dice", result.sq_dsc),
                         "lesion_nsd": _reported("lesion_nsd", result.sq_nsd),
                         "lesion_hd95": _reported("lesion_hd95", mm.sq_hd95)})
        return rows


def region_means(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """{'<region>_<score>': mean over the cases} of metric rows, regions in their first order."""
    means = {}
    regions = list(dict.fromkeys(row["region"] for row in rows))
    for region in regions:
        mine = [row for row in rows if row["region"] == region]
        for score in SCORES:
            means[f"{region}_{score}"] = float(np.mean([row[score] for row in mine]))
    return means


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """Write metric rows to `path` as CSV with the header COLUMNS."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
