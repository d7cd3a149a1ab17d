"""Benchmark: preprocessing phantom BraTS cases with one process and with one per core.

usage: python bench/preprocess_speed.py [--cases 16] [--shape 240 240 155] [--workers N]
Prints the seconds each run took and the speed-up.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset.phantom.brats import write_brats_phantom  # noqa: E402
from dataset.preprocess_data import preprocess  # noqa: E402


def main():
    """Generate the cases once, preprocess them twice, print the timings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155))
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        nifti = os.path.join(tmp, "nifti")
        write_brats_phantom(nifti, args.cases, shape=tuple(args.shape), seed=0, workers=args.workers)
        times = {}
        for workers in (1, args.workers):
            start = time.perf_counter()
            preprocess(nifti, os.path.join(tmp, f"out{workers}"), single_data_dir=True, seed=0,
                       workers=workers)
            times[workers] = time.perf_counter() - start
    print(f"{args.cases} cases of {tuple(args.shape)}: 1 process {times[1]:.1f} s, "
          f"{args.workers} processes {times[args.workers]:.1f} s, "
          f"speed-up {times[1] / times[args.workers]:.2f}x")


if __name__ == "__main__":
    main()
