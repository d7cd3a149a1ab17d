"""Benchmark: the tf.data training pipeline alone on BraTS-sized records, in images/s per CPU core.

usage: python bench/input_pipeline.py [--cases 6] [--cores 1 2] [--batches 30] [--records DIR]
Writes phantom BraTS cases of 240×240×155 (dataset/phantom/brats.py) and their records
(dataset/preprocess_data.py) once, then, for each core count, reads training batches of 2 from
BratsData in a process pinned to that many cores: the pipeline as the tool runs it (parse, crop,
drawn augmentation: compact uint8 batches) and, for comparison, the same batches finished on the
host (flip, z-score, brightness, one-hot in float32: the work the tool used to do there).
Prints images/s and images/s per core.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def measure(records, batches, host_finish):
    """images/s of `batches` training batches of 2 after 5 warm-up batches (this process)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from dataset.data_loader import BratsData
    from dataset.device_transform import finish_train_batch
    n_files = len([f for f in os.listdir(records) if f.endswith(".tfrecord")])
    data = BratsData(records, batch_size=2, fold=0, num_folds=n_files, seed=0)
    ds = data.train_dataset()
    if host_finish:
        ds = ds.map(finish_train_batch, num_parallel_calls=-1)
    stream = iter(ds)
    for _ in range(5):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return 2 * batches / (time.perf_counter() - start)


def main():
    """Make the records once, then time the pipeline on each core count in its own process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--cores", type=int, nargs="*", default=None,
                        help="core counts to pin to (default: 1 and all)")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--records", default=None, help="existing records folder (skips making them)")
    parser.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        records, batches, host_finish = args._child
        print(json.dumps(measure(records, int(batches), host_finish == "1")))
        return
    available = sorted(os.sched_getaffinity(0))
    cores = args.cores or sorted({1, len(available)})
    with tempfile.TemporaryDirectory() as tmp:
        records = args.records
        if records is None:
            from dataset.phantom.brats import write_brats_phantom
            from dataset.preprocess_data import preprocess
            write_brats_phantom(os.path.join(tmp, "nifti"), args.cases, shape=(240, 240, 155), seed=0,
                                workers=len(available))
            records = os.path.join(tmp, "records")
            preprocess(os.path.join(tmp, "nifti"), records, vol_per_file=1, single_data_dir=True,
                       seed=0, workers=len(available))
        print("| cores | batches shipped | images/s | images/s per core |\n|---|---|---|---|")
        for n in cores:
            for host_finish in (False, True):
                cmd = ["taskset", "-c", ",".join(map(str, available[:n])), sys.executable,
                       os.path.abspath(__file__), "--_child", records, str(args.batches),
                       "1" if host_finish else "0"]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rate = json.loads(out.strip().splitlines()[-1])
                kind = "finished on the host (float32)" if host_finish else "compact (uint8)"
                print(f"| {n} | {kind} | {rate:.1f} | {rate / n:.1f} |", flush=True)


if __name__ == "__main__":
    main()
