"""UNet3D's JAX training step on a GPU under candidate XLA and cuDNN options, one process each.

usage: python bench/xla_options.py [--steps 20] [--dtype bf16] [--only NAME ...] [--conv_kernels mosaic]
Runs bench/step_profile.py once per option set (the tool's channels-last flag plus the option)
and prints the median step time with the batch on the device and the change against the tool's
flags alone; with --conv_kernels, the step with those kernels too (step_profile's own rows), each
against the tool's flags with the same kernels. An option XLA does not know fails its own row only.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from runtime.setup.xla_flags import CHANNELS_LAST  # noqa: E402

# every command type XLA can put in a CUDA graph for a one-device step (collectives aside)
WHOLE_STEP_COMMANDS = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
OPTIONS = {
    "tool flags": "",
    "cudnn runtime fusion": "--xla_gpu_use_runtime_fusion=true",
    "no command buffers": "--xla_gpu_enable_command_buffer=",
    "command buffers of every kind": f"--xla_gpu_enable_command_buffer={WHOLE_STEP_COMMANDS}",
    "command buffers of every kind, any size": (f"--xla_gpu_enable_command_buffer={WHOLE_STEP_COMMANDS} "
                                                 "--xla_gpu_graph_min_graph_size=1"),
    "autotune level 0": "--xla_gpu_autotune_level=0",
    "cudnn gemm fusion 2": "--xla_gpu_cudnn_gemm_fusion_level=2",
    "no triton gemm": "--xla_gpu_enable_triton_gemm=false",
    "exhaustive tile search": "--xla_gpu_exhaustive_tile_search=true",
    "channels-first (XLA's own)": "--xla_gpu_force_conv_nchw=true",
}


def step_ms(flags, steps, dtype, kernels):
    """{kernel: median step ms with the batch on the device} of step_profile under
    XLA_FLAGS=`flags` ("xla" for XLA's convolutions, and each of `kernels`), or the error's last line."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "step_profile.py"), "--steps", str(steps),
           "--dtype", dtype] + (["--conv_kernels", *kernels] if kernels else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XLA_FLAGS": flags, "KERAS_BACKEND": "jax"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return (done.stderr.strip().splitlines() or ["failed"])[-1][:120]
    rows = [json.loads(line) for line in lines]
    return {row.get("conv_kernels", "xla"): row["step_ms_device_batch"] for row in rows}


def main():
    """Run every option set and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--only", nargs="*", default=None, help="option names to run (default: all)")
    parser.add_argument("--conv_kernels", nargs="*", default=[], help="step_profile's --conv_kernels")
    args = parser.parse_args()
    names = [n for n in OPTIONS if args.only is None or n in args.only or n == "tool flags"]
    results = {}
    for name in names:
        option = OPTIONS[name]
        flags = option if "conv_nchw" in option else f"{CHANNELS_LAST} {option}".strip()
        results[name] = (flags, step_ms(flags, args.steps, args.dtype, args.conv_kernels))
        print(name, results[name], flush=True)
    base = results["tool flags"][1]
    print("\n| option | XLA_FLAGS | convolutions | step ms (batch on device) | vs tool flags |\n|---|---|---|---|---|")
    for name, (flags, result) in results.items():
        if isinstance(result, str):
            print(f"| {name} | `{flags}` | - | failed: {result} | - |")
            continue
        for kernel, ms in result.items():
            change = f"{100 * (ms / base[kernel] - 1):+.1f}%" if isinstance(base, dict) and kernel in base else "-"
            print(f"| {name} | `{flags}` | {kernel} | {ms:.2f} | {change} |")


if __name__ == "__main__":
    main()
