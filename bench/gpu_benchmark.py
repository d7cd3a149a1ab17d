"""Benchmark on an NVIDIA GPU: the tool's UNet3D (JAX backend) against the PyTorch UNet3D.

usage: python bench/gpu_benchmark.py --torch_script PATH [--steps 60] [--warmup 20] [--out DIR]
Runs, in one go on one machine: main.py --backend jax --synth_data --benchmark for training and
inference (batch 2, 128³ crops) in bf16 and fp32, then PATH (the PyTorch UNet3D of
shared/device/torch_unet3d.py) with torch.compile in bf16 and fp32 and eager in bf16, and prints
one table with images/s, ms/step and the fraction of the card's bf16 compute bound.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_TFLOP_PER_IMAGE = 2.94   # one 128³ training step, forward and backward
BF16_TFLOPS = 800.0            # dense bf16 matrix rate measured on an H100/H200


def tool_run(mode, dtype, steps, warmup, out):
    """throughput and latency of one main.py benchmark run."""
    log_dir = os.path.join(out, f"{mode}-{dtype}")
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--backend", "jax", "--synth_data",
           "--benchmark", "--exec_mode", mode, "--batch_size", "2", "--dtype", dtype,
           "--max_steps", str(steps), "--warmup_steps", str(warmup), "--log_every", str(steps),
           "--model_dir", log_dir, "--log_dir", log_dir, "--seed", "0"]
    subprocess.run(cmd, check=True, env={**os.environ, "KERAS_BACKEND": "jax"})
    with open(os.path.join(log_dir, "log.json")) as handle:
        data = [json.loads(line)["data"] for line in handle if '"benchmark"' in line][-1]
    return data[f"throughput_{mode}"], data[f"latency_{mode}"]


def torch_run(script, precision, compile_):
    """images/s and ms/step of the PyTorch UNet3D (its median step)."""
    out = subprocess.run([sys.executable, script, precision, "2", "20", "128", "1" if compile_ else "0"],
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["img_s"], result["step_ms_median"]


def main():
    """Run everything and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch_script", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="gpu-bench-")
    rows = []
    for mode in ("train", "predict"):
        for dtype in ("bf16", "fp32"):
            img_s, ms = tool_run(mode, dtype, args.steps, args.warmup, out)
            rows.append((f"this tool, JAX, {mode}", dtype, img_s, ms))
    for precision, compile_ in (("bf16", True), ("fp32", True), ("bf16", False)):
        img_s, ms = torch_run(args.torch_script, precision, compile_)
        rows.append((f"PyTorch {'+ torch.compile' if compile_ else 'eager'}, train", precision, img_s, ms))
    bound = BF16_TFLOPS / TRAIN_TFLOP_PER_IMAGE
    print(f"\n| run | precision | img/s | ms/step | of bf16 bound ({bound:.0f} img/s, training) |")
    print("|---|---|---|---|---|")
    for name, precision, img_s, ms in rows:
        fraction = f"{100 * img_s / bound:.1f}%" if "train" in name else "-"
        print(f"| {name} | {precision} | {img_s:.2f} | {ms:.1f} | {fraction} |")


if __name__ == "__main__":
    main()
