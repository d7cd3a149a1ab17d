"""What evaluate and predict write per case beside the scores: the challenge's metrics
(metrics.csv and their means) and a picture of each case; with a postprocessing, the raw
metrics too (metrics_raw.csv), and with a chooser, the postprocessing chosen on these cases."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from runtime.loops.challenge_metrics import record_spacing, region_means, write_csv

if TYPE_CHECKING:
    from runtime.loops.hooks import Logger

RAW_METRICS = "metrics_raw.csv"  # the metrics before postprocessing, beside metrics.csv


class CaseReport:
    """A `case_fn(i, image, one-hot truth or None, mask, raw mask or None)` for the loops of
    runtime/loops/trainer.py; `raw` is the mask before postprocessing, when one was applied.

    `records`: the cases' metadata (case name, affine); `class_names`: a name per class of the
    network; `metrics`: a ChallengeMetrics of the network's label convention, or None;
    `png_dir`: where <case>.png goes, or None for no pictures; `chooser`: with metrics,
    `chooser(cases)` chooses the postprocessing at `finish` on every case seen, (name, raw
    prediction, reference, spacing) in source labels (runtime/loops/postprocessing_choice.py), and
    the rows and pictures are of its choice (`choice`, after `finish`).
    """

    def __init__(self, records, class_names, metrics=None, png_dir=None, chooser=None):
        self.records, self.class_names = records, list(class_names)
        self.metrics, self.png_dir = metrics, png_dir
        self.chooser = chooser if metrics is not None else None
        self.rows, self.raw_rows = [], []
        self.kept, self.choice = [], None
        if png_dir is not None:
            os.makedirs(png_dir, exist_ok=True)

    def record(self, index: int) -> dict[str, Any]:
        """Case i's metadata: its record, or a name and a 1 mm grid when it has none."""
        record = dict(self.records[index]) if index < len(self.records) else {}
        record.setdefault("affine", np.eye(4))
        record["case"] = record.get("case") or f"vol_{index}"
        return record

    def __call__(self, index, image, truth, mask, raw=None):
        record = self.record(index)
        name = record["case"]
        classes = None if truth is None else np.argmax(truth, axis=-1).astype(np.uint8)
        mask = np.asarray(mask, np.uint8)
        raw = None if raw is None else np.asarray(raw, np.uint8)
        if self.metrics is not None and classes is not None:
            convention, spacing = self.metrics.convention, record_spacing(record)
            reference = convention.to_source(classes)
            if self.chooser is not None:  # scored and pictured once the choice is made
                self._keep(name, convention.to_source(mask), reference, spacing, image, classes)
                return
            rows = self.metrics.case(name, convention.to_source(mask), reference, spacing)
            self.rows += rows
            if raw is not None:
                same = np.array_equal(raw, mask)
                self.raw_rows += rows if same else self.metrics.case(
                    name, convention.to_source(raw), reference, spacing)
        if self.png_dir is not None:
            self._picture(name, np.asarray(image)[..., 0], mask, classes, raw)

    def _picture(self, name, image, mask, classes, raw, centre=None):
        from runtime.loops.pictures import case_png
        removed = None if raw is None else raw != mask
        case_png(os.path.join(self.png_dir, f"{name}.png"), image, mask, classes,
                 self.class_names, title=name, removed=removed, centre=centre)

    def _keep(self, name, prediction, reference, spacing, image, classes):
        """Keep what the choice and the picture need of a case: the label maps inside the box
        around their foreground (the chooser scores no more), the image's planes."""
        from runtime.loops.postprocessing_choice import foreground_box
        box = foreground_box(prediction, reference, self.metrics.convention.labels[0])
        planes = centre = None
        if self.png_dir is not None:
            from runtime.loops.pictures import image_planes, tumour_centre
            centre = tumour_centre(classes, prediction)
            planes = image_planes(np.asarray(image)[..., 0], centre)
        self.kept.append({"case": (name, prediction[box], reference[box], spacing), "box": box,
                          "shape": prediction.shape, "planes": planes, "centre": centre})

    def _choose(self):
        """Choose on the kept cases; their rows and pictures after the choice."""
        self.choice = self.chooser(self.chosen_on)
        self.rows, self.raw_rows = self.choice.rows, self.choice.raw_rows
        if self.png_dir is None:
            return
        convention = self.metrics.convention
        for kept, chosen in zip(self.kept, self.choice.predictions):
            name, raw, reference, _ = kept["case"]
            whole = [np.zeros(kept["shape"], np.uint8) for _ in range(3)]
            for volume, part in zip(whole, (chosen, reference, raw)):
                volume[kept["box"]] = convention.to_classes(part)
            self._picture(name, kept["planes"], *whole, centre=kept["centre"])

    @property
    def chosen_on(self) -> list[tuple]:
        """The cases a chooser chose on: (name, prediction, reference, spacing), the label maps
        in source labels inside the box around their foreground."""
        return [kept["case"] for kept in self.kept]

    def finish(self, out_dir: str, logger: Logger, step: Optional[int]) -> dict[str, float]:
        """Write the metric rows to out_dir/metrics.csv and log their means per region
        (stdout and log.json); with a postprocessing the rows before it go to metrics_raw.csv.
        With a chooser, choose first (`choice`). Returns the means ({} without metrics)."""
        if self.metrics is None:
            return {}
        if self.chooser is not None:
            self._choose()
        path = os.path.join(out_dir, "metrics.csv")
        write_csv(path, self.rows)
        means = region_means(self.rows)
        logger.log("challenge", step, means)
        if self.raw_rows:
            raw_path = os.path.join(out_dir, RAW_METRICS)
            write_csv(raw_path, self.raw_rows)
            print(f"wrote {len(self.rows)} rows of the challenge's metrics to {path} (after "
                  f"postprocessing) and {raw_path} (before)", flush=True)
        else:
            print(f"wrote {len(self.rows)} rows of the challenge's metrics to {path}", flush=True)
        return means
