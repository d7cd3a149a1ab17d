"""Data-parallel scaling of the JAX backend: one process with 1, 2, ..., N GPUs, and N processes
with one GPU each (jax.distributed through the coordinator flags), in one command.

usage: python bench/jax_scaling.py [--gpus 4] [--steps 60] [--warmup 20] [--dtype bf16] [--out DIR]
       python bench/jax_scaling.py --cpu --gpus 2 --steps 2 --warmup 1   (a smoke check: host devices)
Every run is main.py --backend jax --synth_data --benchmark --exec_mode train with --batch_size 2
per device; its throughput_train counts the global batch. Prints one table of images/s, ms/step
and the scaling over one device.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH_PER_DEVICE = 2


def device_env(cpu, devices):
    """The environment of a process that sees `devices` (indices of GPUs, or a count of CPU devices)."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONUNBUFFERED": "1"}
    if cpu:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={len(devices)}"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
    return env


def benchmark(log_dir):
    """throughput_train and latency_train of process 0's log."""
    with open(os.path.join(log_dir, "log.json")) as handle:
        data = [json.loads(line)["data"] for line in handle if '"benchmark"' in line][-1]
    return data["throughput_train"], data["latency_train"]


def flags(args, out):
    return [sys.executable, os.path.join(ROOT, "main.py"), "--backend", "jax", "--synth_data",
            "--benchmark", "--exec_mode", "train", "--batch_size", str(BATCH_PER_DEVICE),
            "--dtype", args.dtype, "--max_steps", str(args.steps), "--warmup_steps", str(args.warmup),
            "--log_every", str(args.steps), "--seed", "0", "--model_dir", out, "--log_dir", out]


def one_process(args, count, out):
    """One process over GPUs 0 .. count-1."""
    subprocess.run(flags(args, out), check=True, env=device_env(args.cpu, range(count)))
    return benchmark(out)


def processes(args, count, out):
    """`count` processes, one GPU each, joined through --coordinator_address."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    procs = [subprocess.Popen(flags(args, out) + ["--coordinator_address", f"localhost:{port}",
                                                  "--num_processes", str(count), "--process_id", str(i)],
                              env=device_env(args.cpu, [i]))
             for i in range(count)]
    codes = [proc.wait() for proc in procs]
    if any(codes):
        sys.exit(f"jax_scaling: the {count} processes ended with exit codes {codes}")
    return benchmark(out)


def main():
    """Run every launch and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=4, help="devices in the largest run (default: 4)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--cpu", action="store_true", help="CPU devices instead of GPUs (a smoke check)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="jax-scaling-")
    counts = sorted({1, 2, args.gpus} if args.gpus >= 2 else {1})
    rows = [("one process", n, *one_process(args, n, os.path.join(out, f"one-{n}"))) for n in counts]
    if args.gpus >= 2:
        rows.append((f"{args.gpus} processes", args.gpus,
                     *processes(args, args.gpus, os.path.join(out, f"procs-{args.gpus}"))))
    base = rows[0][2]
    device = "CPU devices" if args.cpu else "GPUs"
    print(f"\n| launch | {device} | global batch | img/s | ms/step | scaling |")
    print("|---|---|---|---|---|---|")
    for launch, n, img_s, ms in rows:
        print(f"| {launch} | {n} | {BATCH_PER_DEVICE * n} | {img_s:.2f} | {ms:.1f} | {img_s / base:.2f}× |")


if __name__ == "__main__":
    main()
