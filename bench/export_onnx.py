"""ONNX Runtime (CPU) against the tool's own predict step on the same window: seconds per window.

usage: python bench/export_onnx.py [--model unet3d|vnet] [--window 64 64 64] [--steps 5] [--onnx FILE]
Builds the network as its task does (fp32, seed 0, TensorFlow backend), exports it to ONNX as
`--exec_mode export` does (Keras' tf2onnx export, opset 17) or takes an export's model.onnx of
the same network (`--onnx`: UNet3D's conversion needs about 10 GB of memory; the weights then
differ, the work does not, and no difference is printed), and times on one random window
(batch 1) the tool's compiled predict (runtime/loops/inference.py: probabilities and argmax, as
`main.py --exec_mode predict` runs each window) and an ONNX Runtime CPU session (probabilities,
argmax in NumPy). Prints one JSON line: the median seconds of `--steps` calls of each, after one
warm-up call, and the largest probability difference.
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median_seconds(fn, steps):
    """The median wall seconds of `steps` calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    """Build, export, time, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("unet3d", "vnet"), default="unet3d")
    parser.add_argument("--window", type=int, nargs=3, default=None,
                        help="unet3d: any multiple of 32 per axis (default 64 64 64); vnet: its "
                             "--input_shape (default 32 32 32)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--onnx", default=None, help="an exported model.onnx of the same network")
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = "tensorflow"
    sys.path.insert(0, ROOT)
    from common.quiet_import import import_tensorflow
    tf = import_tensorflow()
    import numpy as np
    import onnxruntime as ort
    from keras import ops

    from runtime.settings import NETWORK_SECTIONS, DataSettings
    from runtime.engines.tf_engine import TFEngine
    from runtime.loops.export import INPUT_NAME, ONNX_OPSET
    from runtime.loops.inference import Inference
    from runtime.run import ClassCount
    from runtime.tasks.base import make_task

    window = tuple(args.window or ((64, 64, 64) if args.model == "unet3d" else (32, 32, 32)))
    net = NETWORK_SECTIONS["vnet"](input_shape=window) if args.model == "vnet" else NETWORK_SECTIONS["unet3d"]()
    model = make_task(args.model, net, DataSettings(seed=0)).model(ClassCount(3))
    channels = int(model.input.shape[-1])
    x = np.random.default_rng(0).standard_normal((1, *window, channels)).astype(np.float32)

    inference = Inference(TFEngine(model, None, None, None), int(model.output.shape[-1]))
    tool = median_seconds(lambda: inference.masks(x), args.steps)

    shape = [None] * 4 + [channels] if args.model == "unet3d" else [None, *window, channels]
    path = args.onnx
    if path is None:
        path = os.path.join(tempfile.mkdtemp(prefix="bench-onnx-"), "model.onnx")
        model.export(path, format="onnx", input_signature=[tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)],
                     opset_version=ONNX_OPSET, verbose=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    onnx = median_seconds(lambda: np.argmax(session.run(None, {name: x})[0], axis=-1), args.steps)

    difference = None
    if args.onnx is None:
        difference = float(np.max(np.abs(session.run(None, {name: x})[0]
                                         - ops.convert_to_numpy(inference.probabilities(x)))))
    print(json.dumps({"model": args.model, "window": list(window), "steps": args.steps,
                      "tool_predict_s": round(tool, 4), "onnxruntime_cpu_s": round(onnx, 4),
                      "speedup": round(tool / onnx, 2), "max_probability_difference": difference,
                      "cpu_threads": os.cpu_count(), "onnxruntime": ort.__version__}))


if __name__ == "__main__":
    main()
