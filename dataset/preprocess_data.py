"""Turn brain-tumour NIfTI cases into the TFRecord files the training tool reads.

usage: python dataset/preprocess_data.py -i IN -o OUT [-v] [--vol_per_file 4] [--single_data_dir]
                                         [--seed S] [--workers N] [--layout L]

IN is a BraTS 2019–2021 folder (HGG/<case>/ and LGG/<case>/, or the case folders themselves with
--single_data_dir), a BraTS 2023+ folder of BraTS-XXX-NNNNN-NNN case folders, or MSD's
Task01_BrainTumour (dataset.json, imagesTr/, labelsTr/); dataset/layouts.py detects which, and
--layout forces one. Cases are converted in parallel (one process per core), shuffled (seeded by
--seed) and packed --vol_per_file to a file into OUT/volume-<k>.tfrecord, with OUT/records.json
naming the layout, the input channels and the label convention. Files are written into a staging
folder first and moved into OUT only when every case converted, so a failure leaves no partial
output behind.
"""
import argparse
import contextlib
import multiprocessing
import os
import shutil
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from dataset import record_info
from dataset.brats_nifti import convert_case
from dataset.conventions import CONVENTIONS
from dataset.layouts import LAYOUTS, NARROWER, find_dataset
from common.errors import UserError
from common.progress import Progress
from common.quiet_import import import_tensorflow

MIN_SIZE = 32


def check_output_dir(output_dir):
    """Create OUT if needed; refuse one that already holds records (nothing is overwritten)."""
    os.makedirs(output_dir, exist_ok=True)
    existing = [f for f in os.listdir(output_dir)
                if f.endswith(".tfrecord") or f == record_info.FILE_NAME]
    if existing:
        raise UserError(f"{output_dir}: already holds records ({len(existing)} files, such as "
                        f"{sorted(existing)[0]}); choose an empty output folder or remove them "
                        "yourself")


def shuffled(cases, seed):
    """The cases in a seeded random order (unseeded when `seed` is None)."""
    order = np.random.default_rng(seed).permutation(len(cases))
    return [cases[i] for i in order]


def _checked_case(source):
    case = convert_case(source)
    volume = case[1]
    if min(volume.shape[:3]) < MIN_SIZE:
        raise UserError(f"{os.path.dirname(source.seg)}: {source.name}'s volume shape "
                        f"{volume.shape[:3]} is below {MIN_SIZE} voxels on some axis; the network "
                        "needs at least 32")
    return case


def write_records(dataset, cases, output_dir, vol_per_file=4, workers=None, verbose=False):
    """Convert `cases` (CaseSources of `dataset`, in this order) into OUT/volume-<k>.tfrecord and
    OUT/records.json; returns the record file paths."""
    tf = import_tensorflow()  # only the parent process writes records
    from dataset.records import encode_example

    workers = workers or os.cpu_count() or 1
    stage = tempfile.mkdtemp(prefix=".preprocess-partial-", dir=output_dir)
    progress = Progress(len(cases), "preprocessing")
    names, top_class = [], 0
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(cases))) if workers > 1 else None
    try:
        with pool or contextlib.nullcontext():
            converted = pool.imap(_checked_case, cases) if pool else map(_checked_case, cases)
            for start in range(0, len(cases), vol_per_file):
                path = os.path.join(stage, f"volume-{start // vol_per_file}.tfrecord")
                with tf.io.TFRecordWriter(path) as writer:
                    for _ in cases[start:start + vol_per_file]:
                        name, volume, labels, mean, stdev, affine = next(converted)
                        writer.write(encode_example(volume, labels, mean, stdev, name, affine))
                        top_class = max(top_class, int(labels.max()))
                        progress.advance(note=name)
                        if verbose:
                            print(f"{name} -> {os.path.basename(path)} shape {volume.shape} "
                                  f"mean {np.round(mean, 2)} stdev {np.round(stdev, 2)}")
                names.append(os.path.basename(path))
        progress.close()
        convention = CONVENTIONS[dataset.convention]
        if convention.name in NARROWER and top_class < convention.n_classes - 1:
            convention = CONVENTIONS[NARROWER[convention.name]]  # no mask holds the cavity label
        record_info.write_info(stage, dataset.layout, dataset.channels, convention)
        names.append(record_info.FILE_NAME)
        for name in names:
            os.replace(os.path.join(stage, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return [os.path.join(output_dir, name) for name in names if name.endswith(".tfrecord")]


def preprocess(input_dir, output_dir, vol_per_file=4, single_data_dir=False, seed=None,
               workers=None, verbose=False, layout=None):
    """The whole job: find (in `layout`, detected when None), check, shuffle, convert and pack;
    returns the record file paths."""
    if vol_per_file < 1:
        raise UserError(f"--vol_per_file must be at least 1, got {vol_per_file}")
    dataset = find_dataset(input_dir, single_data_dir, layout)
    check_output_dir(output_dir)
    return write_records(dataset, shuffled(list(dataset.cases), seed), output_dir, vol_per_file,
                         workers, verbose)


def main(argv=None):
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description="Convert brain-tumour NIfTI cases (BraTS 2019-2021, "
                                                 "BraTS 2023+, MSD Task01) to TFRecord files.")
    parser.add_argument("-i", "--input_dir", required=True,
                        help="BraTS folder (HGG/ and LGG/, or case folders) or MSD Task01 folder")
    parser.add_argument("-o", "--output_dir", required=True, help="folder for volume-<k>.tfrecord")
    parser.add_argument("-v", "--verbose", action="store_true", help="print a line per case")
    parser.add_argument("--vol_per_file", type=int, default=4, help="cases per file (default: 4)")
    parser.add_argument("--single_data_dir", action="store_true",
                        help="input_dir holds the case folders directly")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the case shuffle (default: a different order each run)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes converting cases (default: one per core)")
    parser.add_argument("--layout", choices=LAYOUTS, default=None,
                        help="the input's layout (default: detected from its files)")
    args = parser.parse_args(argv)
    try:
        files = preprocess(args.input_dir, args.output_dir, args.vol_per_file, args.single_data_dir,
                           args.seed, args.workers, args.verbose, args.layout)
    except UserError as err:
        print(f"preprocess_data.py: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(files)} record files to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
