"""What evaluate and predict write per case beside the scores: the challenge's metrics
(metrics.csv and their means) and a picture of each case."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from runtime.loops.challenge_metrics import record_spacing, region_means, write_csv

if TYPE_CHECKING:
    from runtime.loops.hooks import Logger


class CaseReport:
    """A `case_fn(i, image, one-hot truth or None, mask)` for the loops of runtime/loops/trainer.py.

    `records`: the cases' metadata (case name, affine); `class_names`: a name per class of the
    network; `metrics`: a ChallengeMetrics of the network's label convention, or None;
    `png_dir`: where <case>.png goes, or None for no pictures.
    """

    def __init__(self, records, class_names, metrics=None, png_dir=None):
        self.records, self.class_names = records, list(class_names)
        self.metrics, self.png_dir = metrics, png_dir
        self.rows = []
        if png_dir is not None:
            os.makedirs(png_dir, exist_ok=True)

    def record(self, index: int) -> dict[str, Any]:
        """Case i's metadata: its record, or a name and a 1 mm grid when it has none."""
        record = dict(self.records[index]) if index < len(self.records) else {}
        record.setdefault("affine", np.eye(4))
        record["case"] = record.get("case") or f"vol_{index}"
        return record

    def __call__(self, index, image, truth, mask):
        record = self.record(index)
        name = record["case"]
        classes = None if truth is None else np.argmax(truth, axis=-1).astype(np.uint8)
        mask = np.asarray(mask, np.uint8)
        if self.metrics is not None and classes is not None:
            convention = self.metrics.convention
            self.rows += self.metrics.case(name, convention.to_source(mask),
                                           convention.to_source(classes),
                                           record_spacing(record))
        if self.png_dir is not None:
            from runtime.loops.pictures import case_png
            case_png(os.path.join(self.png_dir, f"{name}.png"), np.asarray(image)[..., 0], mask,
                     classes, self.class_names, title=name)

    def finish(self, out_dir: str, logger: Logger, step: Optional[int]) -> dict[str, float]:
        """Write the metric rows to out_dir/metrics.csv and log their means per region
        (stdout and log.json); returns the means ({} without metrics)."""
        if self.metrics is None:
            return {}
        path = os.path.join(out_dir, "metrics.csv")
        write_csv(path, self.rows)
        means = region_means(self.rows)
        logger.log("challenge", step, means)
        print(f"wrote {len(self.rows)} rows of the challenge's metrics to {path}", flush=True)
        return means
