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
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, replace
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from common.errors import UserError
from common.output_files import replacing
from dataset.conventions import LabelConvention
from dataset.postprocessing import (FILE, NONE, apply_region, check_operations, operation_text,
                                    operations_text, postprocess, read_postprocessing,
                                    region_order, write_postprocessing)
from runtime.loops.challenge_metrics import SCORES, ChallengeMetrics

DEFAULT_CRITERION = ("dice", "lesion_f1")
LOWER_IS_BETTER = {"hd95", "lesion_hd95", "lesion_fp", "lesion_fn"}
DEFAULT_MARGIN = 0.001
REMOVE_SIZES = (10, 50, 200, 500)  # voxels: remove_small's grid
RELABEL_SIZES = (50, 200, 500, 1000)  # voxels: relabel_small's grid (the enhancing region)
CASES_FILE = "postprocessing_cases.npz"  # beside postprocessing.json: the cases it was chosen on


class Choice(NamedTuple):
    """`description`: postprocessing.json's body; `raw_rows` and `rows`: the metric rows of the
    validation cases before and after the chosen postprocessing; `predictions`: the label maps
    after it."""
    description: dict
    raw_rows: list
    rows: list
    predictions: list


def criterion_columns(criterion: Union[str, Sequence[str]]) -> tuple[tuple[str, ...], int]:
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


def candidates(convention: LabelConvention, remove_sizes: Sequence[int] = REMOVE_SIZES,
               relabel_sizes: Sequence[int] = RELABEL_SIZES) -> dict[str, list[dict]]:
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


def foreground_box(prediction: np.ndarray, reference: np.ndarray, background: int = 0
                   ) -> tuple[slice, ...]:
    """The slices of the box around the foreground of both label maps, grown by a voxel (the
    whole volume when both are empty)."""
    found = ndimage.find_objects(((prediction != background) | (reference != background))
                                 .astype(np.uint8))
    if not found:
        return tuple(slice(None) for _ in np.shape(prediction))
    return tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in found[0])


def choose_postprocessing(cases: Sequence[tuple], convention: LabelConvention,
                          criterion: Union[str, Sequence[str]] = DEFAULT_CRITERION,
                          margin: float = DEFAULT_MARGIN,
                          grid: Optional[dict[str, list[dict]]] = None) -> Choice:
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
    boxes = [foreground_box(case[1], case[2], convention.labels[0]) for case in cases]
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


def candidates_table(description: dict) -> str:
    """postprocessing.json's table of candidates as text: a row per candidate (region, operation,
    the criterion's mean over every region and case, and per region), '*' on the chosen ones,
    then the choice and the score before and after."""
    regions = list(description["candidates"][0]["regions"]) if description["candidates"] else []
    cases = len(description["validation_cases"])
    better = "higher" if description["higher_is_better"] else "lower"
    lines = [f"postprocessing candidates on {cases} validation case{'s' * (cases != 1)}: the mean "
             f"of {', '.join(description['criterion'])} over every region and case ({better} is "
             f"better; kept if it beats none by {description['margin']})",
             f"  {'region':<8}{'operation':<20}{'score':>9}" + "".join(f"{r:>9}" for r in regions)]
    for row in description["candidates"]:
        mark = "*" if row["chosen"] else " "
        lines.append(f"{mark} {row['region']:<8}{operation_text(row['operation']):<20}"
                     f"{row['score']:>9.4f}" + "".join(f"{row['regions'][r]:>9.4f}" for r in regions))
    lines.append(f"chosen: {operations_text(description['operations'])}; score "
                 f"{description['score_before']:.4f} before, {description['score_after']:.4f} after")
    return "\n".join(lines)


@dataclass(frozen=True)
class Postprocessing:
    """The postprocessing a run applies to its masks: the `operations` ({region: operation}) of
    `convention` read from `path`, chosen for the model folders `chosen_for` (those the file
    names; empty when it names none)."""
    path: str
    operations: dict
    convention: LabelConvention
    chosen_for: tuple = ()

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        """A mask of the network's classes after the operations."""
        return postprocess(mask, self.operations, self.convention, in_classes=True)

    def line(self, model_dirs: Sequence[str]) -> str:
        """The line a run prints when it applies the file to `model_dirs`."""
        text = f"postprocessing of {self.path}: {operations_text(self.operations)}"
        same = [os.path.realpath(d) for d in model_dirs] == [os.path.realpath(d)
                                                             for d in self.chosen_for]
        if self.chosen_for and not same:
            text += f" (chosen for {' '.join(self.chosen_for)})"
        return text + "; --no_postprocessing leaves it out"


def load_postprocessing(model_dir: str, convention: LabelConvention) -> Optional[Postprocessing]:
    """The Postprocessing of model_dir/postprocessing.json, or None when there is none; a UserError
    (one line naming the file) when it is unreadable or names a region the convention lacks."""
    path = os.path.join(model_dir, FILE)
    if not os.path.exists(path):
        return None
    operations = read_postprocessing(path, convention)
    with open(path) as handle:
        chosen_for = json.load(handle).get("model_dirs") or ()
    return Postprocessing(path, operations, convention, tuple(map(str, chosen_for)))


def write_cases(path: str, convention: LabelConvention, cases: Sequence[tuple]) -> None:
    """Keep the cases a choice was made on (name, prediction, reference, spacing; the label maps
    as the chooser scores them, inside their foreground box) as a compressed .npz at `path`, for
    a later choice on several folds' cases together (runtime/pool_postprocessing.py)."""
    arrays = {"convention": np.array(convention.name),
              "names": np.array([case[0] for case in cases], str),
              "spacings": np.array([case[3] for case in cases], float).reshape(-1, 3)}
    for i, (_, prediction, reference, _) in enumerate(cases):
        arrays[f"prediction_{i}"], arrays[f"reference_{i}"] = prediction, reference
    with replacing(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)


def read_cases(path: str) -> tuple[str, list[tuple]]:
    """(convention name, cases) of a file of `write_cases`; a UserError names the file when it
    is missing or unreadable."""
    try:
        with np.load(path) as stored:
            names, spacings = stored["names"].tolist(), stored["spacings"].tolist()
            cases = [(name, stored[f"prediction_{i}"], stored[f"reference_{i}"], tuple(spacing))
                     for i, (name, spacing) in enumerate(zip(names, spacings))]
            return str(stored["convention"]), cases
    except FileNotFoundError:
        raise UserError(f"{path}: missing; evaluate this folder with --choose_postprocessing "
                        "first, which keeps its validation cases there") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: unreadable ({reason}); evaluate the folder with "
                        "--choose_postprocessing again") from None


def keep_choice(choice: Choice, model_dirs: Sequence[str], convention: LabelConvention,
                cases: Optional[Sequence[tuple]] = None) -> str:
    """Write the choice as postprocessing.json into the first of `model_dirs`, naming them all,
    and the `cases` it was made on beside it (postprocessing_cases.npz); returns the lines that
    say so: the table of candidates, the files, the choice it replaced."""
    path = os.path.join(model_dirs[0], FILE)
    former = None
    if os.path.exists(path):
        try:
            with open(path) as handle:
                former = operations_text(json.load(handle)["operations"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            former = "unreadable"
    if cases is not None:
        write_cases(os.path.join(model_dirs[0], CASES_FILE), convention, cases)
    with replacing(path) as tmp:
        write_postprocessing(tmp, dict(choice.description, model_dirs=list(model_dirs)))
    lines = [candidates_table(choice.description), f"wrote {path}"]
    if former is not None:
        lines[-1] += f", replacing the former choice ({former})"
    return "\n".join(lines)
