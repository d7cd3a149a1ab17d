"""Label conventions of the brain-tumour datasets: the label values a source's masks hold, the
network's classes they map to, their names, and the regions the challenge scores.

The network's class i stands for `labels[i]` of the source (class 0 is background), so a
convention turns source masks into classes and predicted classes back into the source's values.
Regions are sets of source label values, as the BraTS evaluation defines them.
"""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelConvention:
    """One dataset's labels: `labels` (source values, background first), `names` (one per label),
    `regions` ((region name, source values), ...) as its challenge scores them."""
    name: str
    labels: tuple
    names: tuple
    regions: tuple

    @property
    def n_classes(self):
        """The network's output classes, background included."""
        return len(self.labels)

    def to_classes(self, mask):
        """Source label values → class indices (uint8); a value outside `labels` is a ValueError."""
        mask = np.asarray(mask)
        lookup = np.full(int(max(self.labels)) + 1, 255, np.uint8)
        lookup[list(self.labels)] = np.arange(len(self.labels), dtype=np.uint8)
        if mask.size and (mask.min() < 0 or mask.max() > max(self.labels)):
            raise ValueError(self.unexpected(mask))
        classes = lookup[mask.astype(np.int64)]
        if np.any(classes == 255):
            raise ValueError(self.unexpected(mask))
        return classes

    def to_source(self, classes):
        """Class indices → source label values (uint8)."""
        return np.asarray(self.labels, np.uint8)[np.asarray(classes, np.int64)]

    def unexpected(self, mask):
        """A sentence naming the values of `mask` outside this convention."""
        extra = sorted(set(np.unique(mask).tolist()) - set(self.labels))
        return (f"labels {extra} are not in the {self.name} convention (labels "
                f"{list(self.labels)})")

    def region_classes(self):
        """{region name: the class indices it unites}."""
        index = {value: i for i, value in enumerate(self.labels)}
        return {name: tuple(index[v] for v in values) for name, values in self.regions}

    def as_dict(self):
        """The convention as plain JSON values (saved with records and runs)."""
        return {"name": self.name, "labels": list(self.labels), "names": list(self.names),
                "regions": {name: list(values) for name, values in self.regions}}


GLIOMA_REGIONS = (("ET", (3,)), ("TC", (1, 3)), ("WT", (1, 2, 3)))

CONVENTIONS = {c.name: c for c in (
    # BraTS 2019–2021: 1 necrotic/non-enhancing core, 2 oedema, 4 enhancing tumour.
    LabelConvention("brats2021", (0, 1, 2, 4), ("background", "NCR/NET", "ED", "ET"),
                    (("ET", (4,)), ("TC", (1, 4)), ("WT", (1, 2, 4)))),
    # BraTS 2023+ adult glioma, Sub-Saharan Africa, meningioma (pre-operative).
    LabelConvention("brats-gli", (0, 1, 2, 3), ("background", "NETC", "SNFH", "ET"), GLIOMA_REGIONS),
    # BraTS 2024 post-treatment glioma and metastases: resection cavity as label 4.
    LabelConvention("brats-gli-post", (0, 1, 2, 3, 4), ("background", "NETC", "SNFH", "ET", "RC"),
                    GLIOMA_REGIONS + (("RC", (4,)),)),
    # BraTS 2023+ paediatric tumours.
    LabelConvention("brats-ped", (0, 1, 2, 3, 4), ("background", "ET", "NETC", "CC", "ED"),
                    (("ET", (1,)), ("NETC", (2,)), ("CC", (3,)), ("ED", (4,)),
                     ("TC", (1, 2, 3)), ("WT", (1, 2, 3, 4)))),
    # BraTS 2024 meningioma radiotherapy: the gross tumour volume.
    LabelConvention("brats-men-rt", (0, 1), ("background", "GTV"), (("GTV", (1,)),)),
    # MSD Task01_BrainTumour: 1 oedema, 2 non-enhancing tumour, 3 enhancing tumour.
    LabelConvention("msd-brain", (0, 1, 2, 3), ("background", "edema", "non-enhancing tumor",
                                                "enhancing tumour"),
                    (("ET", (3,)), ("TC", (2, 3)), ("WT", (1, 2, 3)))),
)}
DEFAULT_CONVENTION = "brats2021"
