"""Choose the postprocessing of a cross-validation on its pooled validation folds (nnU-Net's way):
every case is predicted by the one fold's model that did not train on it.

usage: python -m runtime.pool_postprocessing FOLD_DIR [FOLD_DIR ...] [--criterion COLUMNS]

Each FOLD_DIR was evaluated with --sliding_window --challenge_metrics --choose_postprocessing,
which kept its validation cases (the raw predictions and the references) beside its own
postprocessing.json, in postprocessing_cases.npz. Their cases are pooled, every candidate is
scored on all of them (runtime/loops/postprocessing_choice.py), and the choice is written as
postprocessing.json into the first FOLD_DIR, naming them all, in place of that fold's own: evaluate
and predict with --model_dir FOLD_DIR ... (the ensemble of the folds) apply it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from common.errors import UserError
from dataset.conventions import CONVENTIONS
from dataset.postprocessing import FILE
from runtime.loops.postprocessing_choice import (CASES_FILE, DEFAULT_CRITERION, choose_postprocessing,
                                                 criterion_columns, keep_choice, read_cases)


def pooled_cases(model_dirs: Sequence[str]) -> tuple[str, list[tuple]]:
    """(convention name, every case) of the folders' postprocessing_cases.npz; a UserError names
    the file whose labels differ from the first's, or which repeats a case of another folder."""
    first, cases, seen = None, [], {}
    for model_dir in model_dirs:
        path = os.path.join(model_dir, CASES_FILE)
        convention, found = read_cases(path)
        if first is not None and convention != first[1]:
            raise UserError(f"{path}: its cases are in the {convention} labels, those of {first[0]} "
                            f"in the {first[1]} labels; pool the folds of one cross-validation")
        first = first or (path, convention)
        for case in found:
            if case[0] in seen:
                raise UserError(f"{path}: case {case[0]} is a validation case of {seen[case[0]]} "
                                "too; pool folds that validate on different cases (each folder "
                                "once)")
            seen[case[0]] = model_dir
        cases += found
    return first[1], cases


def pool(model_dirs: Sequence[str], criterion: Optional[str] = None) -> dict:
    """Choose on the pooled cases of `model_dirs` by `criterion` (None: the first folder's
    postprocessing.json's, else the default), write it into the first, print the table; returns
    postprocessing.json's body."""
    convention_name, cases = pooled_cases(model_dirs)
    if criterion is None:
        try:
            with open(os.path.join(model_dirs[0], FILE)) as handle:
                criterion = ",".join(json.load(handle)["criterion"])
        except (OSError, ValueError, KeyError, TypeError):
            criterion = ",".join(DEFAULT_CRITERION)
    try:
        criterion_columns(criterion)
    except ValueError as err:
        raise UserError(f"--criterion: {err}") from None
    convention = CONVENTIONS[convention_name]
    choice = choose_postprocessing(cases, convention, criterion)
    print(keep_choice(choice, model_dirs, convention), flush=True)
    return dict(choice.description, model_dirs=list(model_dirs))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the pooled choice; returns the exit code (1 with a one-line error on bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m runtime.pool_postprocessing",
        description="Choose the postprocessing on the pooled validation cases of cross-validation "
                    "folds, each evaluated with --challenge_metrics --choose_postprocessing; write "
                    "it into the first folder for the ensemble of them all.")
    parser.add_argument("model_dirs", nargs="+", metavar="FOLD_DIR",
                        help="the folds' model folders (results/cv/fold_0 ...)")
    parser.add_argument("--criterion", metavar="COLUMNS",
                        help="metrics.csv score columns, comma-separated (default: the first "
                             "folder's postprocessing.json's criterion)")
    args = parser.parse_args(argv)
    try:
        pool(args.model_dirs, args.criterion)
    except UserError as err:
        print(f"pool_postprocessing: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
