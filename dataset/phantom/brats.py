"""A phantom BraTS data set: small, seeded NIfTI cases of a head with brain tissues and tumours.

By default each case has the BraTS 2019–2021 layout <case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz with
labels 0 (background), 1 (necrotic / non-enhancing core), 2 (oedema) and 4 (enhancing tumour).
`layout` writes the same cases as BraTS 2023+ data of one sub-challenge (its file names and label
values) or as MSD's Task01_BrainTumour (4-D images and dataset.json). Shapes are built in
normalised coordinates (each axis spans about [-1, 1]), so a case looks alike at any grid size.
"""
import json
import os
from itertools import starmap
from multiprocessing import Pool

import nibabel as nib
import numpy as np

MODALITIES = ("t1", "t1ce", "t2", "flair")
# Tissue classes of the intensity table below.
BG, SCALP, SKULL, CSF, GM, WM, OEDEMA, ENHANCING, NECROSIS = range(9)
# Mean intensity per modality (rows) and tissue class (columns, in the order above).
INTENSITY = np.array([
    #  bg scalp skull  csf   gm   wm  oedema enh  necr
    [0, 650, 60, 150, 450, 650, 470, 430, 200],   # t1: WM > GM > CSF, tumour hypointense
    [0, 650, 60, 160, 460, 640, 480, 1150, 190],  # t1ce: like t1, enhancing rim bright
    [0, 500, 40, 1500, 800, 550, 1250, 900, 1300],  # t2: CSF > GM > WM, oedema and necrosis bright
    [0, 500, 40, 120, 620, 450, 1050, 800, 550],  # flair: CSF suppressed, GM > WM, oedema bright
], dtype=np.float32)


def _coords(shape):
    """Normalised coordinates along each axis (about -1 to 1), shaped to broadcast over `shape`."""
    return [((np.arange(n, dtype=np.float32) - (n - 1) / 2) / (n / 2)).reshape(
        [n if a == i else 1 for a in range(len(shape))]) for i, n in enumerate(shape)]


def _smooth(a, sigmas):
    """Gaussian blur of the last three axes of `a` (sigmas in voxels) by FFT, periodic borders."""
    shape = a.shape[-3:]
    freqs = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    gain = np.ones((), np.float32)
    for i, (f, s) in enumerate(zip(freqs, sigmas)):
        g = np.exp(-2 * (np.pi * s * f) ** 2).astype(np.float32)
        gain = gain * g.reshape([-1 if a == i else 1 for a in range(3)])
    axes = (-3, -2, -1)
    return np.fft.irfftn(np.fft.rfftn(a, axes=axes) * gain, s=shape, axes=axes)


def _noise(shape, rng, scale):
    """Smooth random field of unit spread with correlation length `scale` (normalised units)."""
    n = _smooth(rng.standard_normal(shape, dtype=np.float32), [scale * s / 2 for s in shape])
    return n / n.std()


def _distance(coords, centre, radii):
    """Ellipsoidal distance from `centre`: 1 on the surface of the ellipsoid of semi-axes `radii`."""
    return np.sqrt(sum(((c - c0) / r) ** 2 for c, c0, r in zip(coords, centre, radii)))


def _tumour(coords, brain, candidates, rng):
    """One tumour as (oedema, enhancing, core-without-enhancement) masks, all inside `brain`.

    Nested irregular blobs: an ellipsoidal distance perturbed by smooth noise, thresholded at three
    levels. The enhancing rim is full, patchy or missing (then the whole core is non-enhancing).
    """
    shape = brain.shape
    centre = [c.ravel()[i] for c, i in zip(coords, np.unravel_index(rng.choice(candidates), shape))]
    d = _distance(coords, centre, rng.uniform(0.18, 0.35) * rng.uniform(0.7, 1.3, 3))
    outer = _noise(shape, rng, 0.1)
    oedema = (d + 0.3 * outer < 1) & brain
    inner = d * (1 + 0.2 * np.clip(_noise(shape, rng, 0.06), -2.5, 2.5))  # star-shaped: holds the centre
    core_level = rng.uniform(0.45, 0.75)
    core = (inner < core_level) & brain
    necrosis = (inner < core_level * rng.uniform(0.5, 0.8)) & brain
    kind = rng.choice(["full", "patchy", "none"], p=[0.7, 0.15, 0.15])
    threshold = {"full": -np.inf, "patchy": rng.uniform(-0.5, 0.8), "none": np.inf}[kind]
    enhancing = core & ~necrosis & (outer > threshold)
    return oedema, enhancing, core & ~enhancing


def _anatomy(shape, rng):
    """Tissue class map (BG ... NECROSIS) and BraTS label map of one case: a perturbed-ellipsoid head
    with scalp, skull, CSF, folded grey matter, white matter, ventricles and one or two tumours."""
    coords = _coords(shape)
    r = _distance(coords, [0, 0, 0], rng.uniform([0.78, 0.84, 0.78], [0.86, 0.9, 0.86]))
    r = r * (1 + 0.03 * np.clip(_noise(shape, rng, 0.3), -2.5, 2.5))  # head stays in the box
    gyri = _noise(shape, rng, 0.045)  # folds the pial and the white-matter surfaces alike
    head, brain = r < 1, (r + 0.05 * gyri < 0.84) & (r < 0.87)
    vent_radii = rng.uniform(0.8, 1.3) * np.array([0.07, 0.28, 0.12])
    ventricles = np.zeros(shape, bool)
    for side in (-1, 1):
        ventricles |= _distance(coords, [side * 0.1, 0.0, 0.12], vent_radii) + 0.1 * gyri < 1

    tissue = np.full(shape, WM, np.uint8)
    tissue[r + 0.08 * gyri > 0.7] = GM
    tissue[ventricles | ~brain] = CSF
    tissue[r >= 0.87] = SKULL
    tissue[r >= 0.94] = SCALP
    tissue[~head] = BG

    candidates = np.flatnonzero(brain & (r < 0.65) & (tissue != CSF))
    seg = np.zeros(shape, np.uint8)
    tumours = [_tumour(coords, brain, candidates, rng) for _ in range(1 + (rng.random() < 0.25))]
    for label, tissue_class, part in ((2, OEDEMA, 0), (4, ENHANCING, 1), (1, NECROSIS, 2)):
        mask = np.logical_or.reduce([t[part] for t in tumours])
        seg[mask] = label
        tissue[mask] = tissue_class
    return tissue, seg


def _render(tissue, rng):
    """The four MR images of a tissue class map: per-case contrast, texture, partial-volume blur, smooth
    multiplicative bias field and Rician noise; exactly 0 outside the head."""
    shape = tissue.shape
    x, y, z = _coords(shape)
    table = INTENSITY * rng.uniform(0.8, 1.25, (4, 1)) * rng.uniform(0.92, 1.08, INTENSITY.shape)
    texture = 1 + 0.04 * _noise(shape, rng, 0.03)
    images = _smooth(table.astype(np.float32)[:, tissue] * texture, [0.6] * 3)  # partial volume
    terms = [x, y, z, x * y, x * z, y * z, x * x, y * y, z * z]
    out = {}
    for name, image in zip(MODALITIES, images):
        bias = np.exp(sum(rng.normal(0, 0.08) * t for t in terms))
        sigma = rng.uniform(0.015, 0.04) * image[tissue == WM].mean()
        noisy = np.hypot(image * bias + sigma * rng.standard_normal(shape, dtype=np.float32),
                         sigma * rng.standard_normal(shape, dtype=np.float32))  # Rician magnitude
        out[name] = np.where(tissue != BG, noisy, 0).astype(np.float32)
    return out


def make_case(shape, rng):
    """One case: {'t1','t1ce','t2','flair'} -> float arrays of `shape` (intensity in MRI-like units,
    >= 0, background exactly 0) and the seg label array (uint8 with values in {0,1,2,4})."""
    tissue, seg = _anatomy(shape, rng)
    return _render(tissue, rng), seg


PHANTOM_LAYOUTS = ("brats2021", "brats2023", "msd-brain")
CHALLENGES = ("GLI", "SSA", "PED", "MEN", "MEN-RT", "MET")
BRATS2023_NAMES = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
# The phantom's 2019–2021 labels (1 core, 2 oedema, 4 enhancing) in other datasets' values.
RELABEL = {"GLI": {1: 1, 2: 2, 4: 3}, "SSA": {1: 1, 2: 2, 4: 3}, "MEN": {1: 1, 2: 2, 4: 3},
           "MET": {1: 1, 2: 2, 4: 3}, "PED": {1: 2, 2: 4, 4: 1}, "MEN-RT": {1: 1, 2: 1, 4: 1},
           "msd-brain": {1: 2, 2: 1, 4: 3}}
CAVITY = 4  # BraTS 2024 post-treatment glioma and metastases: resection cavity
MSD_MODALITIES = ("FLAIR", "T1w", "t1gd", "T2w")  # Task01's channel order
MSD_FROM = ("flair", "t1", "t1ce", "t2")


def _relabel(seg, table):
    out = np.zeros_like(seg)
    for old, new in table.items():
        out[seg == old] = new
    return out


def _save(array, affine, path):
    nib.save(nib.Nifti1Image(array, affine=affine), path)


def _write_case(out_dir, seed, index, shape, layout="brats2021", challenge="GLI", cavity=False,
                affine=None):
    """Generates case `index` from its own rng and writes its NIfTI files in `layout`; returns its
    folder (msd-brain: its image file)."""
    images, seg = make_case(shape, np.random.default_rng([seed, index]))
    affine = np.eye(4) if affine is None else np.asarray(affine, np.float64)
    arrays = {m: np.rint(images[m]).astype(np.int16) for m in MODALITIES}
    if layout == "msd-brain":
        name = f"BRATS_{index + 1:03d}"
        image = os.path.join(out_dir, "imagesTr", f"{name}.nii.gz")
        _save(np.stack([arrays[m] for m in MSD_FROM], axis=-1), affine, image)
        _save(_relabel(seg, RELABEL["msd-brain"]), affine,
              os.path.join(out_dir, "labelsTr", f"{name}.nii.gz"))
        return image
    if layout == "brats2021":
        name, files = f"Phantom_{index:03d}", {f"_{m}": arrays[m] for m in MODALITIES} | {"_seg": seg}
    elif challenge == "MEN-RT":
        name = f"BraTS-MEN-RT-{index:04d}-1"
        files = {"_t1c": arrays["t1ce"], "_gtv": _relabel(seg, RELABEL["MEN-RT"])}
    else:
        name = f"BraTS-{challenge}-{index:05d}-000"
        labels = _relabel(seg, RELABEL[challenge])
        if cavity and index % 2:
            labels[seg == 1] = CAVITY  # the core of every other case is a resection cavity
        files = {f"-{BRATS2023_NAMES[m]}": arrays[m] for m in MODALITIES} | {"-seg": labels}
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    for suffix, array in files.items():
        _save(array, affine, os.path.join(folder, f"{name}{suffix}.nii.gz"))
    return folder


def _write_msd_json(out_dir, n_cases):
    names = [f"BRATS_{i + 1:03d}.nii.gz" for i in range(n_cases)]
    body = {"name": "BRATS", "description": "phantom brain tumours in MSD Task01's layout",
            "tensorImageSize": "4D",
            "modality": {str(i): m for i, m in enumerate(MSD_MODALITIES)},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor",
                       "3": "enhancing tumour"},
            "numTraining": n_cases, "numTest": 0,
            "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names],
            "test": []}
    with open(os.path.join(out_dir, "dataset.json"), "w") as handle:
        json.dump(body, handle, indent=2)


def write_brats_phantom(out_dir, n_cases, shape=(96, 96, 64), seed=0, workers=1, layout="brats2021",
                        challenge="GLI", cavity=False, affine=None):
    """Writes n_cases phantom cases into out_dir in `layout` and returns their folders (sorted):

    - brats2021: out_dir/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz;
    - brats2023: out_dir/BraTS-<challenge>-NNNNN-000/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz in the
      sub-challenge's label values (`cavity`: every other GLI or MET case has a resection cavity,
      label 4); MEN-RT: BraTS-MEN-RT-NNNN-1/<case>_{t1c,gtv}.nii.gz;
    - msd-brain: out_dir/dataset.json, imagesTr/BRATS_NNN.nii.gz (4-D: FLAIR, T1w, t1gd, T2w)
      and labelsTr/BRATS_NNN.nii.gz (returns the image paths).

    `affine` (default the identity) is every file's voxel-to-world matrix.
    """
    if layout not in PHANTOM_LAYOUTS or challenge not in CHALLENGES:
        raise ValueError(f"layout {layout!r} or challenge {challenge!r} unknown")
    if layout == "msd-brain":
        for sub in ("imagesTr", "labelsTr"):
            os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
        _write_msd_json(out_dir, n_cases)
    jobs = [(out_dir, seed, i, tuple(shape), layout, challenge, cavity, affine)
            for i in range(n_cases)]
    if workers > 1:
        with Pool(workers) as pool:
            return sorted(pool.starmap(_write_case, jobs))
    return sorted(starmap(_write_case, jobs))
