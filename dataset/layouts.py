"""The folder layouts of the brain-tumour datasets people download, detected from their files.

- brats2021: BraTS 2019–2021, `<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz` (in HGG/ and LGG/
  for 2019, or the case folders themselves).
- brats2023: BraTS 2023 and later, `<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz`; the case name's
  prefix (BraTS-GLI, -SSA, -PED, -MEN, -MEN-RT, -MET) chooses the label convention. MEN-RT ships
  one T1c image: `<case>_t1c.nii.gz` with the mask `<case>_gtv.nii.gz` as released in 2024
  (the `-t1c`/`-seg` spelling of the other sub-challenges is accepted too).
- msd-brain: the Medical Segmentation Decathlon's Task01_BrainTumour, `dataset.json`,
  `imagesTr/<case>.nii.gz` (4-D, channels in dataset.json's `modality` order) and `labelsTr/`.

`find_dataset` returns the layout and its cases as `CaseSource`s: where each input channel of the
tool's order (t1, t1ce, t2, flair ↔ t1n, t1c, t2w, t2f) and the mask come from. No TensorFlow.
"""
import json
import os
import re
from dataclasses import dataclass
from typing import Optional

from common.errors import UserError

LAYOUTS = ("brats2021", "brats2023", "msd-brain")
LAYOUT_TITLES = {"brats2021": "BraTS 2019-2021", "brats2023": "BraTS 2023+",
                 "msd-brain": "MSD Task01_BrainTumour"}
BRATS2021_CHANNELS = ("t1", "t1ce", "t2", "flair")
BRATS2023_CHANNELS = ("t1n", "t1c", "t2w", "t2f")
# Sub-challenge (case-name prefix after 'BraTS-') -> the label convention its masks are read in.
# GLI and MET masks may hold label 4 (the resection cavity): read as brats-gli-post, the dataset
# is brats-gli when none of its masks does (NARROWER; the classes 0-3 are the same in both).
CHALLENGE_CONVENTIONS = {"GLI": "brats-gli-post", "MET": "brats-gli-post", "SSA": "brats-gli",
                         "MEN": "brats-gli", "PED": "brats-ped", "MEN-RT": "brats-men-rt"}
NARROWER = {"brats-gli-post": "brats-gli"}
CASE_NAME = re.compile(r"^BraTS-(MEN-RT|GLI|SSA|PED|MEN|MET)-")


def channel_names(convention):
    """The input channels' file names of a dataset in `convention` (a convention's name): BraTS
    2019–2021's (also MSD Task01's, read onto them), MEN-RT's single T1c, else BraTS 2023+'s."""
    if convention in ("brats2021", "msd-brain"):
        return BRATS2021_CHANNELS
    return ("t1c",) if convention == "brats-men-rt" else BRATS2023_CHANNELS


# MSD modality names (lower case) -> the tool's channel index.
MSD_CHANNELS = {"t1w": 0, "t1": 0, "t1gd": 1, "t1ce": 1, "t1c": 1, "t2w": 2, "t2": 2, "flair": 3,
                "t2f": 3}


@dataclass(frozen=True)
class CaseSource:
    """One case's files: `images` (a path per input channel, in the tool's order) or, for a 4-D
    image, `image4d` with `channel_order` (the file's channel index of each input channel) and
    `n_file_channels`; `seg` the mask; `convention` the label convention its masks follow."""
    name: str
    seg: str
    convention: str
    images: tuple = ()
    image4d: Optional[str] = None
    channel_order: tuple = ()
    n_file_channels: int = 0

    @property
    def n_channels(self):
        """The input channels this case gives the network."""
        return len(self.channel_order) if self.image4d else len(self.images)


@dataclass(frozen=True)
class Dataset:
    """A detected dataset: its layout, channel names (tool order), cases and the convention its
    masks are read in (brats-gli-post narrows to brats-gli when no mask holds label 4)."""
    layout: str
    channels: tuple
    cases: tuple
    convention: str


def _nifti_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".nii.gz") or f.endswith(".nii"))


def _marks(case_dir):
    """{layout: a file of the case that only that layout names}."""
    name = os.path.basename(os.path.normpath(case_dir))
    files = set(_nifti_files(case_dir))
    found = {}
    for layout, names in (("brats2021", [f"{name}_{m}.nii.gz" for m in BRATS2021_CHANNELS]),
                          ("brats2023", [f"{name}-{m}.nii.gz" for m in BRATS2023_CHANNELS]
                           + [f"{name}_t1c.nii.gz"])):
        hits = [f for f in names if f in files]
        if hits:
            found[layout] = os.path.join(case_dir, hits[0])
    return found


def case_layout(case_dir):
    """The layout a case folder's files follow (None when none of its files says); a case holding
    files of both BraTS layouts is a UserError naming one of each."""
    marks = _marks(case_dir)
    if len(marks) > 1:
        raise UserError(f"{marks['brats2023']}: the case mixes layouts ({LAYOUT_TITLES['brats2023']} "
                        f"beside the {LAYOUT_TITLES['brats2021']} file {marks['brats2021']}); keep "
                        "one naming per case")
    return next(iter(marks), None)


def _first(case_dir, candidates, expected):
    for candidate in candidates:
        path = os.path.join(case_dir, candidate)
        if os.path.isfile(path):
            return path
    raise UserError(f"{os.path.join(case_dir, candidates[0])}: missing; a case of this layout "
                    f"needs {expected}")


def brats2021_case(case_dir):
    """The CaseSource of a BraTS 2019–2021 case folder."""
    name = os.path.basename(os.path.normpath(case_dir))
    expected = ", ".join(f"{name}_{m}.nii.gz" for m in BRATS2021_CHANNELS + ("seg",))
    images = tuple(_first(case_dir, [f"{name}_{m}.nii.gz"], f"{expected} ({LAYOUT_TITLES['brats2021']})")
                   for m in BRATS2021_CHANNELS)
    seg = _first(case_dir, [f"{name}_seg.nii.gz"], f"{expected} ({LAYOUT_TITLES['brats2021']})")
    return CaseSource(name, seg, "brats2021", images=images)


def challenge_of(case_dir):
    """The BraTS 2023+ sub-challenge of a case folder, from its name (GLI, SSA, PED, MEN, MEN-RT, MET)."""
    name = os.path.basename(os.path.normpath(case_dir))
    match = CASE_NAME.match(name)
    if not match:
        raise UserError(f"{case_dir}: not a BraTS 2023+ case name (BraTS-<GLI|SSA|PED|MEN|MEN-RT|"
                        "MET>-NNNNN-NNN); the name chooses the labels, so keep the challenge's "
                        "folder names")
    return match.group(1)


def brats2023_case(case_dir):
    """The CaseSource of a BraTS 2023+ case folder (MEN-RT: its single T1c image)."""
    name = os.path.basename(os.path.normpath(case_dir))
    challenge = challenge_of(case_dir)
    title = f"{LAYOUT_TITLES['brats2023']} BraTS-{challenge}"
    if challenge == "MEN-RT":
        expected = f"{name}_t1c.nii.gz and {name}_gtv.nii.gz ({title}; -t1c and -seg accepted too)"
        images = (_first(case_dir, [f"{name}_t1c.nii.gz", f"{name}-t1c.nii.gz"], expected),)
        seg = _first(case_dir, [f"{name}_gtv.nii.gz", f"{name}-seg.nii.gz", f"{name}_seg.nii.gz",
                                f"{name}-gtv.nii.gz"], expected)
    else:
        expected = ", ".join(f"{name}-{m}.nii.gz" for m in BRATS2023_CHANNELS + ("seg",)) + f" ({title})"
        images = tuple(_first(case_dir, [f"{name}-{m}.nii.gz"], expected) for m in BRATS2023_CHANNELS)
        seg = _first(case_dir, [f"{name}-seg.nii.gz"], expected)
    return CaseSource(name, seg, CHALLENGE_CONVENTIONS[challenge], images=images)


def _case_folders(input_dir, single_data_dir):
    if not os.path.isdir(input_dir):
        raise UserError(f"{input_dir}: no such folder (-i)")
    groups = [os.path.join(input_dir, g) for g in ("HGG", "LGG")]
    roots = [g for g in groups if os.path.isdir(g)]
    if single_data_dir or not roots:
        roots = [input_dir]
    folders = sorted(os.path.join(root, name) for root in roots for name in os.listdir(root)
                     if os.path.isdir(os.path.join(root, name)) and not name.startswith("."))
    if not single_data_dir and roots == [input_dir]:
        if not any(CASE_NAME.match(os.path.basename(f)) for f in folders):
            raise UserError(f"{input_dir}: no HGG or LGG folder; for a folder of case folders add "
                            "--single_data_dir")
    if not folders:
        raise UserError(f"{input_dir}: no case folders found")
    return folders


def _msd_dataset(input_dir):
    path = os.path.join(input_dir, "dataset.json")
    try:
        with open(path) as handle:
            info = json.load(handle)
        modalities = [info["modality"][str(i)] for i in range(len(info["modality"]))]
        training = info["training"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a Decathlon dataset.json with 'modality' and 'training' "
                        f"({type(err).__name__}: {err})") from None
    lookup = {MSD_CHANNELS.get(str(m).lower()): i for i, m in enumerate(modalities)}
    if any(c not in lookup for c in range(4)):
        raise UserError(f"{path}: modalities {modalities} are not the four brain-tumour ones "
                        "(FLAIR, T1w, t1gd, T2w)")
    order = tuple(lookup[c] for c in range(4))
    cases = []
    for entry in training:
        image = os.path.normpath(os.path.join(input_dir, entry["image"]))
        seg = os.path.normpath(os.path.join(input_dir, entry["label"]))
        for file in (image, seg):
            if not os.path.isfile(file):
                raise UserError(f"{file}: missing; dataset.json lists it (an MSD case needs "
                                "imagesTr/<case>.nii.gz and labelsTr/<case>.nii.gz)")
        name = os.path.basename(image).split(".nii")[0]
        cases.append(CaseSource(name, seg, "msd-brain", image4d=image, channel_order=order,
                                n_file_channels=len(modalities)))
    if not cases:
        raise UserError(f"{path}: its 'training' list is empty")
    return Dataset("msd-brain", tuple(modalities[i] for i in order), tuple(cases), "msd-brain")


def detect_layout(input_dir, single_data_dir=False):
    """The layout of `input_dir` from its files: msd-brain when it holds dataset.json and imagesTr/,
    else the layout of its first case folder that names one."""
    if os.path.isfile(os.path.join(input_dir, "dataset.json")) and \
            os.path.isdir(os.path.join(input_dir, "imagesTr")):
        return "msd-brain"
    for folder in _case_folders(input_dir, single_data_dir):
        layout = case_layout(folder)
        if layout is not None:
            return layout
    return "brats2021"


def find_dataset(input_dir, single_data_dir=False, layout=None):
    """The Dataset of `input_dir`, in `layout` (detected when None). Every case must follow that
    layout and, for BraTS 2023+, one convention; a case that does not is a UserError naming it."""
    if layout is None:
        layout = detect_layout(input_dir, single_data_dir)
    if layout == "msd-brain":
        if not os.path.isdir(input_dir):
            raise UserError(f"{input_dir}: no such folder (-i)")
        return _msd_dataset(input_dir)
    cases = []
    for folder in _case_folders(input_dir, single_data_dir):
        found = case_layout(folder)
        if found is not None and found != layout:
            marked = _marks(folder)[found]
            raise UserError(f"{marked}: a {LAYOUT_TITLES[found]} file in a {LAYOUT_TITLES[layout]} "
                            "dataset; convert each layout into its own records folder")
        cases.append(brats2021_case(folder) if layout == "brats2021" else brats2023_case(folder))
    conventions = {c.convention for c in cases}
    if len(conventions) > 1:
        first = cases[0]
        other = next(c for c in cases if c.convention != first.convention)
        raise UserError(f"{os.path.dirname(other.seg)}: its {other.convention} labels differ from "
                        f"{first.name}'s {first.convention}; convert each sub-challenge into its "
                        "own records folder")
    channels = BRATS2021_CHANNELS if layout == "brats2021" else (
        ("t1c",) if cases[0].convention == "brats-men-rt" else BRATS2023_CHANNELS)
    return Dataset(layout, channels, tuple(cases), cases[0].convention)
