"""Benchmark: UNet3D trained in fp32 and in bf16 on the phantom data, same steps and seed.

usage: python bench/precision_dice.py [--max_steps 200] [--seed 0] [--out DIR]
Trains and evaluates twice with main.py and prints each run's validation dice and the gap in
WholeTumor dice (the acceptance bound is 0.03).
"""
import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from runtime.parse_results import final_eval  # noqa: E402


def main():
    """Run both precisions and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="precision-dice-")
    scores = {}
    for dtype in ("fp32", "bf16"):
        run_dir = os.path.join(out, dtype)
        subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--exec_mode", "train_and_evaluate",
                        "--max_steps", str(args.max_steps), "--seed", str(args.seed), "--dtype", dtype,
                        "--log_every", "50", "--model_dir", run_dir, "--log_dir", run_dir], check=True)
        scores[dtype] = final_eval(run_dir)
    for dtype, data in scores.items():
        print(dtype, " ".join(f"{k} {v:.4f}" for k, v in data.items()))
    gap = abs(scores["fp32"]["WholeTumor"] - scores["bf16"]["WholeTumor"])
    print(f"WholeTumor gap |fp32 - bf16| = {gap:.4f} ({'within' if gap <= 0.03 else 'above'} 0.03)")


if __name__ == "__main__":
    main()
