"""Summarize cross-validation: each fold's final evaluation from its log.json, and the averages.

usage: python runtime/parse_results.py RESULTS_DIR [--folds 5]
       python runtime/parse_results.py --check FOLD_DIR   (exit 0 when that fold has finished)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

METRICS = ("TumorCore", "PeritumoralEdema", "EnhancingTumor", "MeanDice", "WholeTumor")


def final_eval(fold_dir: str) -> Optional[dict[str, Any]]:
    """The data of the last evaluation logged in fold_dir/log.json, or None."""
    path = os.path.join(fold_dir, "log.json")
    if not os.path.isfile(path):
        return None
    found = None
    with open(path) as handle:
        for line in handle:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if entry.get("type") == "eval":
                found = entry["data"]
    return found


def table(results_dir: str, folds: int = 5) -> str:
    """The per-fold rows and the mean row as text; raises FileNotFoundError naming missing folds."""
    rows = {fold: final_eval(os.path.join(results_dir, f"fold_{fold}")) for fold in range(folds)}
    missing = [fold for fold, row in rows.items() if row is None]
    if missing:
        raise FileNotFoundError(f"{results_dir}: no evaluation for fold(s) {missing}")
    header = f"{'fold':<6}" + "".join(f"{m:>18}" for m in METRICS)
    lines = [header]
    for fold, row in rows.items():
        lines.append(f"{fold:<6}" + "".join(f"{row[m]:>18.4f}" for m in METRICS))
    means = {m: sum(row[m] for row in rows.values()) / folds for m in METRICS}
    lines.append(f"{'mean':<6}" + "".join(f"{means[m]:>18.4f}" for m in METRICS))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the table (or check one fold); returns the exit code."""
    parser = argparse.ArgumentParser(description="Average the dice scores of cross-validation folds.")
    parser.add_argument("results_dir", nargs="?")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--check", metavar="FOLD_DIR", help="exit 0 if this fold has an evaluation")
    args = parser.parse_args(argv)
    if args.check:
        return 0 if final_eval(args.check) is not None else 1
    try:
        print(table(args.results_dir, args.folds))
    except FileNotFoundError as err:
        print(f"parse_results.py: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
