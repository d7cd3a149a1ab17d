"""Benchmark on an NVIDIA GPU: the tool's UNet3D (JAX backend) against the PyTorch UNet3D.

usage: python bench/gpu_benchmark.py --torch_script PATH [--before DIR] [--steps 60] [--warmup 20] [--out DIR]
Runs, in one go on one machine: main.py --backend jax --synth_data --benchmark for training
(batch 2, 128³ crops) in bf16 and fp32, and bench/inference_window.py (the 224×224×160 evaluation
window, batch 1, forward and argmax) in bf16 and fp32, for this tree and, with --before, for an
older checkout of the tool; then PATH (the PyTorch UNet3D of shared/device/torch_unet3d.py),
training with torch.compile in bf16 and fp32 and eagerly in bf16, inference with torch.compile
and eagerly in bf16. Prints one table with images/s, ms/step and the fraction of the card's bf16
compute bound; each row is also printed, and appended to DIR/rows.jsonl, as soon as it is measured.
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


def tool_train(root, dtype, steps, warmup, out):
    """(images/s, ms/step) of one main.py training benchmark of the tool at `root`."""
    log_dir = os.path.join(out, f"{os.path.basename(root)}-train-{dtype}")
    cmd = [sys.executable, os.path.join(root, "main.py"), "--backend", "jax", "--synth_data",
           "--benchmark", "--exec_mode", "train", "--batch_size", "2", "--dtype", dtype,
           "--max_steps", str(steps), "--warmup_steps", str(warmup), "--log_every", str(steps),
           "--model_dir", log_dir, "--log_dir", log_dir, "--seed", "0"]
    subprocess.run(cmd, check=True, cwd=root, env={**os.environ, "KERAS_BACKEND": "jax"})
    with open(os.path.join(log_dir, "log.json")) as handle:
        data = [json.loads(line)["data"] for line in handle if '"benchmark"' in line][-1]
    return data["throughput_train"], data["latency_train"]


def tool_infer(root, dtype):
    """(volumes/s, ms) of the tool at `root` on the 224×224×160 window, batch 1 (through that
    tree's own bench/inference_window.py, which builds the network its own way)."""
    cmd = [sys.executable, os.path.join(root, "bench", "inference_window.py"), "--root", root,
           "--dtype", dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "KERAS_BACKEND": "jax"}).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["vol_s"], result["ms_median"]


def torch_run(script, precision, compile_, infer):
    """(images/s, ms) of the PyTorch UNet3D (its median step): training at batch 2 and 128³, or
    inference of the 224×224×160 window at batch 1."""
    shape = ["1", "20", "224x224x160"] if infer else ["2", "20", "128"]
    cmd = [sys.executable, script, precision, *shape, "1" if compile_ else "0"] + (["infer"] if infer else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["img_s"], result["step_ms_median"]


def main():
    """Run everything and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch_script", required=True)
    parser.add_argument("--before", default=None, help="a checkout of the tool to measure as well")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="gpu-bench-")
    os.makedirs(out, exist_ok=True)
    rows = []

    def row(name, precision, rate, ms):
        rows.append((name, precision, rate, ms))
        line = json.dumps({"run": name, "precision": precision, "rate": rate, "ms": ms})
        print(line, flush=True)
        with open(os.path.join(out, "rows.jsonl"), "a") as handle:
            handle.write(line + "\n")

    trees = [("this tool", ROOT)] + ([("before", os.path.abspath(args.before))] if args.before else [])
    for label, root in trees:
        for dtype in ("bf16", "fp32"):
            row(f"{label}, JAX, train", dtype, *tool_train(root, dtype, args.steps, args.warmup, out))
        for dtype in ("bf16", "fp32"):
            row(f"{label}, JAX, inference 224×224×160", dtype, *tool_infer(root, dtype))
    for precision, compile_ in (("bf16", True), ("fp32", True), ("bf16", False)):
        name = f"PyTorch {'+ torch.compile' if compile_ else 'eager'}, train"
        row(name, precision, *torch_run(args.torch_script, precision, compile_, False))
    for compile_ in (True, False):
        name = f"PyTorch {'+ torch.compile' if compile_ else 'eager'}, inference 224×224×160"
        row(name, "bf16", *torch_run(args.torch_script, "bf16", compile_, True))
    bound = BF16_TFLOPS / TRAIN_TFLOP_PER_IMAGE
    print(f"\n| run | precision | img/s (train) or vol/s (inference) | ms/step | of bf16 bound "
          f"({bound:.0f} img/s, training) |")
    print("|---|---|---|---|---|")
    for name, precision, rate, ms in rows:
        fraction = f"{100 * rate / bound:.1f}%" if "train" in name else "-"
        print(f"| {name} | {precision} | {rate:.2f} | {ms:.1f} | {fraction} |")


if __name__ == "__main__":
    main()
