"""The built-in phantom datasets (BraTS and MSD hippocampus): made once into a cache folder, then reused."""
import os
import shutil
import tempfile

from dataset.phantom.brats import write_brats_phantom
from dataset.phantom.msd import write_msd_phantom
from dataset.preprocess_data import preprocess

VERSION = 1
N_CASES = 30
SHAPE = (80, 80, 56)
SEED = 2024
MSD_TRAIN = 80
MSD_TEST = 8


def cache_root():
    """$UNET3D_CACHE, else $XDG_CACHE_HOME/unet3d_medical, else ~/.cache/unet3d_medical."""
    if os.environ.get("UNET3D_CACHE"):
        return os.environ["UNET3D_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "unet3d_medical")


def _cached(name, make):
    """cache_root()/name, made on first use by `make(work_dir) -> folder inside work_dir`, atomically."""
    final = os.path.join(cache_root(), name)
    if os.path.isdir(final):
        return final
    os.makedirs(cache_root(), exist_ok=True)
    print(f"making the phantom dataset {final}", flush=True)
    work = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root())
    try:
        made = make(work)
        try:
            os.rename(made, final)
        except OSError:
            if not os.path.isdir(final):  # another process finished first: use its copy
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def phantom_brats(n_cases=N_CASES, shape=SHAPE, seed=SEED):
    """The folder of the phantom BraTS dataset's TFRecords."""
    def make(work):
        write_brats_phantom(os.path.join(work, "nifti"), n_cases, shape=shape, seed=seed,
                            workers=os.cpu_count())
        preprocess(os.path.join(work, "nifti"), os.path.join(work, "records"), vol_per_file=2,
                   single_data_dir=True, seed=seed)
        return os.path.join(work, "records")

    return _cached(f"brats_phantom_v{VERSION}_{n_cases}x{'x'.join(map(str, shape))}_seed{seed}", make)


def phantom_msd(n_train=MSD_TRAIN, n_test=MSD_TEST, seed=SEED):
    """The folder of the phantom MSD hippocampus task (dataset.json and NIfTI files)."""
    def make(work):
        return write_msd_phantom(os.path.join(work, "task"), n_train, n_test, seed=seed)

    return _cached(f"msd_hippocampus_phantom_v{VERSION}_{n_train}+{n_test}_seed{seed}", make)
