"""Benchmark on an NVIDIA GPU: the tool's sliding-window prediction of one BraTS-sized volume against
MONAI's `sliding_window_inference` of the PyTorch UNet3D, with and without the 8 mirrorings.

usage: python bench/sliding_window_benchmark.py --torch_script PATH [--volumes 8] [--out DIR]
           [--sw_batch_sizes 2 6 9] [--tta_sw_batch_sizes 2 3] [--monai_sw_batch_sizes 2 6]
           [--conv_kernels auto keras]
Both predict the same synthetic 240×240×155×4 volume (`--synth_data`'s) in bf16 with 128³ windows,
overlap 0.5 and a Gaussian importance map of σ = window/8, from a host array to an int8 mask on
the host. The tool: `main.py --backend jax --synth_data --exec_mode predict --sliding_window
--benchmark` (its `latency_predict`, the mean over the volumes after the warm-up ones; as in
every predict run, the next volume is copied to the GPU while the current one is predicted), for
several --sw_batch_size, with and without --tta, and for each --conv_kernel named (default: auto,
the tool's own; keras: XLA's convolutions). MONAI: torch.compile'd UNet3D (PATH, i.e.
shared/device/torch_unet3d.py), bf16 autocast, roi 128³, overlap 0.5, mode="gaussian",
sigma_scale=0.125, sw_batch_size 2 (and more, for a like-for-like row); with mirroring, the mean
over the 8 mirrored volumes. One table of mean (and MONAI's median) seconds per volume; the ratio
columns compare each row with MONAI at sw_batch_size 2 (its default in the issue) and with MONAI at
its best sw_batch_size of those run.
"""
import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SEED = 0


def tool_run(sw_batch_size, tta, volumes, out, conv_kernel="auto"):
    """Mean and 99% bound of the tool's seconds per volume (`volumes` timed after as many warm-up)."""
    log_dir = os.path.join(out, f"tool-sw{sw_batch_size}{'-tta' if tta else ''}-{conv_kernel}")
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--backend", "jax", "--synth_data",
           "--exec_mode", "predict", "--sliding_window", "--sw_batch_size", str(sw_batch_size),
           "--benchmark", "--warmup_steps", str(volumes), "--batch_size", "1", "--dtype", "bf16",
           "--model_dir", log_dir, "--log_dir", log_dir, "--seed", str(SEED),
           "--conv_kernel", conv_kernel] + (["--tta"] if tta else [])
    subprocess.run(cmd, check=True, env={**os.environ, "KERAS_BACKEND": "jax"})
    with open(os.path.join(log_dir, "log.json")) as handle:
        data = [json.loads(line)["data"] for line in handle if '"benchmark"' in line][-1]
    return data["latency_predict"] / 1000, data["Latency_predict 99%"] / 1000


def monai_runs(script, volumes, sw_batch_sizes):
    """{(sw_batch_size, mirroring): (mean, median) seconds per volume} of MONAI's
    sliding_window_inference."""
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    from dataset.synthetic import SyntheticData
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    from torch_unet3d import UNet3D

    torch.backends.cudnn.benchmark = True
    torch.manual_seed(SEED)
    model = UNet3D().cuda().to(memory_format=torch.channels_last_3d).eval()
    network = torch.compile(model)
    (volume,) = SyntheticData(1, seed=SEED).test_volumes()  # (1, 240, 240, 155, 4)
    host = torch.from_numpy(np.ascontiguousarray(volume.transpose(0, 4, 1, 2, 3)))
    mirrors = [()] + [axes for r in (1, 2, 3) for axes in itertools.combinations((2, 3, 4), r)]

    def predict(sw_batch_size, mirroring):
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            x = host.cuda()
            total = 0
            for axes in (mirrors if mirroring else [()]):
                flipped = torch.flip(x, axes) if axes else x
                probs = sliding_window_inference(flipped, (128, 128, 128), sw_batch_size, network, overlap=0.5,
                                                 mode="gaussian", sigma_scale=0.125)
                total = total + (torch.flip(probs, axes) if axes else probs)
            return total.argmax(1).to(torch.int8).cpu()

    results = {}
    for sw_batch_size, mirroring in itertools.product(sw_batch_sizes, (False, True)):
        for _ in range(max(2, volumes // 2)):  # compile and warm up
            predict(sw_batch_size, mirroring)
        times = []
        for _ in range(volumes):
            torch.cuda.synchronize()
            start = time.perf_counter()
            predict(sw_batch_size, mirroring)
            times.append(time.perf_counter() - start)
        results[sw_batch_size, mirroring] = (statistics.mean(times), statistics.median(times))
    return results


def main():
    """Run both sides and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch_script", required=True)
    parser.add_argument("--volumes", type=int, default=8, help="timed volumes per configuration")
    parser.add_argument("--sw_batch_sizes", type=int, nargs="+", default=[2, 6, 9])
    parser.add_argument("--tta_sw_batch_sizes", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--monai_sw_batch_sizes", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--conv_kernels", nargs="+", default=["auto"], choices=("auto", "keras"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="sw-bench-")
    rows = []
    for kernel in args.conv_kernels:
        for tta, sizes in ((False, args.sw_batch_sizes), (True, args.tta_sw_batch_sizes)):
            for size in sizes:
                mean, bound = tool_run(size, tta, args.volumes, out, kernel)
                rows.append((f"this tool, JAX, --conv_kernel {kernel}, sw_batch_size {size}", tta, mean, None, bound))
                print(rows[-1], flush=True)
    for (size, tta), (mean, median) in monai_runs(args.torch_script, args.volumes,
                                                  args.monai_sw_batch_sizes).items():
        rows.append((f"MONAI + torch.compile, sw_batch_size {size}", tta, mean, median, None))
        print(rows[-1], flush=True)
    monai = {tta: mean for name, tta, mean, _, _ in rows if name == "MONAI + torch.compile, sw_batch_size 2"}
    best = {tta: min(mean for name, t, mean, _, _ in rows if name.startswith("MONAI") and t == tta)
            for tta in (False, True)}
    print("\n| run | mirroring | s/volume (mean) | median | 99% bound | MONAI sw 2's time / this "
          "| MONAI's best time / this |")
    print("|---|---|---|---|---|---|---|")
    for name, tta, mean, median, bound in rows:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        ratio = lambda ref: "-" if ref is None else f"{ref / mean:.2f}×"  # noqa: E731
        print(f"| {name} | {'8 mirrorings' if tta else 'none'} | {mean:.3f} | {fmt(median)} | "
              f"{fmt(bound)} | {ratio(monai.get(tta))} | {ratio(best[tta])} |")
    with open(os.path.join(out, "sliding_window.json"), "w") as handle:
        json.dump(rows, handle)


if __name__ == "__main__":
    main()
