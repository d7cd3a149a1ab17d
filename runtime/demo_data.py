"""The built-in phantom BraTS dataset: generated and preprocessed once into a cache folder, then reused."""
import os
import shutil
import tempfile

from dataset.phantom import write_brats_phantom
from dataset.preprocess_data import preprocess

VERSION = 1
N_CASES = 30
SHAPE = (80, 80, 56)
SEED = 2024


def cache_root():
    """$UNET3D_CACHE, else $XDG_CACHE_HOME/unet3d_medical, else ~/.cache/unet3d_medical."""
    if os.environ.get("UNET3D_CACHE"):
        return os.environ["UNET3D_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "unet3d_medical")


def phantom_records(n_cases=N_CASES, shape=SHAPE, seed=SEED):
    """The folder of the phantom dataset's TFRecords, made on first use (atomically)."""
    name = f"brats_phantom_v{VERSION}_{n_cases}x{'x'.join(map(str, shape))}_seed{seed}"
    final = os.path.join(cache_root(), name)
    if os.path.isdir(final):
        return final
    os.makedirs(cache_root(), exist_ok=True)
    print(f"making the phantom BraTS dataset ({n_cases} cases of {shape}) in {final}", flush=True)
    work = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root())
    try:
        write_brats_phantom(os.path.join(work, "nifti"), n_cases, shape=shape, seed=seed,
                            workers=os.cpu_count())
        preprocess(os.path.join(work, "nifti"), os.path.join(work, "records"), vol_per_file=2,
                   single_data_dir=True, seed=seed)
        try:
            os.rename(os.path.join(work, "records"), final)
        except OSError:
            if not os.path.isdir(final):  # another process finished first: use its copy
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final
