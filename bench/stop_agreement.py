"""The cost of the workers' agreement on a stop, paid after every training step
(runtime/loops/stopping.py): JaxEngine.agree, a host all-gather of one int32, over two JAX processes on
localhost (gloo on CPU; on GPUs the same host collective), timed over many calls.

usage: python bench/stop_agreement.py [--calls 500]
Prints the mean and the 95th percentile of one call in milliseconds, to set beside a step's time.
"""
import argparse
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(address, index, calls):
    """One of the two processes: join, warm up, time `calls` agreements, print them (process 0)."""
    import jax
    jax.distributed.initialize(coordinator_address=address, num_processes=2, process_id=index)
    sys.path.insert(0, ROOT)
    import numpy as np

    from runtime.engines.jax_engine import JaxEngine
    for _ in range(10):
        JaxEngine.agree(0)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        assert JaxEngine.agree(index) == 1
        times.append(time.perf_counter() - start)
    if index == 0:
        ms = 1000 * np.array(times)
        print(f"agree over 2 processes: mean {ms.mean():.3f} ms, 95th percentile "
              f"{np.percentile(ms, 95):.3f} ms ({calls} calls)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--address", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.address, args.worker, args.calls)
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        address = f"localhost:{probe.getsockname()[1]}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "KERAS_BACKEND": "jax"}
    procs = [subprocess.Popen([sys.executable, __file__, "--calls", str(args.calls), "--worker",
                               str(i), "--address", address], env=env) for i in range(2)]
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    sys.exit(main())
