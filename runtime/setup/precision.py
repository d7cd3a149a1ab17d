"""The compute precision: bf16 where the device runs it natively and it pays, fp32 elsewhere.

bf16 is native on Habana cards, on NVIDIA GPUs of compute capability 8.0 or higher and on CPUs
with AVX512_BF16 or AMX (x86) or the BF16 extension (Arm). Elsewhere it is emulated: on an
AVX2-only CPU a bf16 UNet3D step takes many times longer than an fp32 one. Two native CPU cases
still default to fp32: the JAX backend, whose CPU kernels run bf16 slower than fp32, and CPUs with
AMX under TensorFlow. There oneDNN's AMX kernels (TensorFlow 2.21's oneDNN 3.7) compute 3-D
convolutions of stride 2 whose output's last axis is 1 wrongly, forward and kernel gradient (NaN
or wrong values; UNet3D's last downsampling at crops of 32 or fewer voxels on the last axis), so a
bf16 run there keeps oneDNN on its AVX512_BF16 kernels (`amx_off_for_bf16`), which are slower
than fp32.

float16 (`--use_amp`, TensorFlow only) trains at speed on NVIDIA GPUs, and on a CPU only with
AMX-FP16, where oneDNN has kernels for all three passes of a convolution (not measured). With
AVX512_FP16 alone TensorFlow computes a float16 convolution's weight gradient in oneDNN's reference
kernel, and without it float16 convolutions in generic kernels (Eigen's): a training step takes
many times an fp32 one, and a one-line warning says so (docs/performance.md, "fp16 and bf16 on a
CPU", has the measurements).
"""
import os
import sys

CPU_FLAGS = {"bf16": ({"avx512_bf16", "amx_bf16", "bf16"}, "AVX512_BF16, AMX or Arm's BF16"),
             "fp16": ({"amx_fp16"}, "AMX-FP16")}
# A float16 training step against an fp32 one on a CPU without AMX-FP16, UNet3D and V-Net on the
# TensorFlow backend (docs/performance.md, "fp16 and bf16 on a CPU", 2026-12-05): with AVX512_FP16;
# without it, as on an AVX2-only CPU (float16 with TensorFlow's oneDNN off, fp32 with oneDNN's
# AVX2 kernels).
FP16_CPU_SLOWDOWN = {"avx512_fp16": "70–180×", "other": "7–8×"}


def _slow_fp16_on_cpu(flags):
    """Why float16 trains slowly on a CPU of these flags without AMX-FP16 (TensorFlow's kernels)."""
    if "avx512_fp16" in flags:
        return ("this CPU has AVX512_FP16 but no AMX-FP16, so TensorFlow computes float16 "
                "convolution weight gradients in oneDNN's reference kernel: a training step took "
                f"{FP16_CPU_SLOWDOWN['avx512_fp16']} an fp32 one on such a CPU")
    return ("this CPU has no AVX512_FP16 or AMX-FP16, so TensorFlow computes float16 convolutions "
            f"in generic kernels: a training step took {FP16_CPU_SLOWDOWN['other']} an fp32 one "
            "with them")


def _bf16_not_worth_it(backend, device):
    """Why bf16, native on this CPU, is still not the default there (None where it is worth it):
    measured on a Xeon with AMX (docs/performance.md, "fp16 and bf16 on a CPU", 2026-12-05)."""
    if device.kind != "cpu":
        return None
    if backend == "jax":
        return "JAX's CPU kernels run bf16 slower than fp32 (a UNet3D step took 1.33× an fp32 one)"
    if "amx_bf16" in device.cpu_flags:
        return ("oneDNN's AMX kernels compute some bf16 convolutions wrongly, and its AVX512_BF16 "
                "kernels, which a bf16 run uses instead, trained the demo's UNet3D 1.4× slower than fp32")
    return None


AMX_OFF = "AVX512_CORE_BF16"  # oneDNN's ISA below AMX: its AVX512_BF16 kernels


def amx_off_for_bf16(dtype, backend, device, environ=os.environ):
    """On a CPU with AMX, a TensorFlow bf16 run keeps oneDNN off its AMX kernels, which compute 3-D
    convolutions of stride 2 whose output's last axis is 1 wrongly: sets ONEDNN_MAX_CPU_ISA in
    `environ` before the first convolution (oneDNN reads it then), unless the user set it. Returns
    the line that says so, or None where nothing was set."""
    if (dtype != "bf16" or backend != "tensorflow" or device.kind != "cpu"
            or "amx_bf16" not in device.cpu_flags or environ.get("ONEDNN_MAX_CPU_ISA")):
        return None
    environ["ONEDNN_MAX_CPU_ISA"] = AMX_OFF
    return (f"bf16 on this CPU's AVX512_BF16 kernels: ONEDNN_MAX_CPU_ISA={AMX_OFF} set, as oneDNN's "
            "AMX kernels compute 3-D convolutions of stride 2 whose output's last axis is 1 wrongly "
            "(NaN or wrong values); set ONEDNN_MAX_CPU_ISA yourself to choose")


class Device:
    """What the run computes on: `kind` ('cpu', 'gpu', 'hpu' or 'tpu'), with the CPU's feature
    flags or the GPU's compute capability (major, minor)."""

    def __init__(self, kind, cpu_flags=frozenset(), capability=None):
        self.kind, self.cpu_flags, self.capability = kind, frozenset(cpu_flags), capability

    def native(self, precision):
        """(native, why): whether the device computes `precision` ('bf16' or 'fp16') in hardware."""
        if self.kind in ("hpu", "tpu"):
            return precision == "bf16", f"{self.kind.upper()}s compute bf16 natively"
        if self.kind == "gpu":
            major, minor = self.capability
            if precision == "fp16" or major >= 8:
                return True, f"this NVIDIA GPU (compute capability {major}.{minor}) runs it natively"
            return False, (f"this NVIDIA GPU (compute capability {major}.{minor}) has no native "
                           "bf16 (8.0 or higher has)")
        wanted, names = CPU_FLAGS[precision]
        found = sorted(self.cpu_flags & wanted)
        if found:
            return True, f"this CPU has {found[0].upper()}"
        if precision == "fp16":
            return False, _slow_fp16_on_cpu(self.cpu_flags)
        return False, f"this CPU has no native {precision} ({names})"


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The CPU's feature flags from /proc/cpuinfo (x86 'flags', Arm 'Features'); empty elsewhere."""
    try:
        with open(cpuinfo) as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def local_device(backend, tf=None, hpu=None):
    """The Device this process computes on (call after the cluster is set up: on JAX it starts
    the backend)."""
    if hpu is not None:
        return Device("hpu")
    if backend == "jax":
        import jax
        device = jax.local_devices()[0]
        if device.platform == "gpu":
            major, _, minor = str(getattr(device, "compute_capability", "0.0")).partition(".")
            return Device("gpu", capability=(int(major), int(minor or 0)))
        if device.platform == "tpu":
            return Device("tpu")
        return Device("cpu", cpu_flags())
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = min(tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
                         for gpu in gpus)
        return Device("gpu", capability=tuple(capability))
    return Device("cpu", cpu_flags())


def choose_dtype(precision, device):
    """The dtype of the run ('fp32', 'bf16', or 'fp16' with --use_amp) for `precision` (the
    PrecisionSettings) on `device`: when left to the tool, bf16 where the device runs it natively,
    with a one-line notice of the choice and why (stdout); an explicit bf16 or --use_amp that will
    be emulated, or slow on a CPU, warns once (stderr)."""
    if precision.use_amp:
        native, why = device.native("fp16")
        if not native and device.kind == "cpu":
            print(f"warning: --use_amp: {why}; leave out --use_amp", file=sys.stderr, flush=True)
        elif not native:
            print(f"warning: --use_amp: {why}: float16 is emulated and much slower than fp32 here; "
                  "leave out --use_amp", file=sys.stderr, flush=True)
        return "fp16"
    native, why = device.native("bf16")
    trap = _bf16_not_worth_it(precision.backend, device) if native else None
    if precision.dtype is None:
        if trap:
            print(f"--dtype fp32 chosen: {why}, but {trap}; --dtype bf16 forces it", flush=True)
            return "fp32"
        dtype = "bf16" if native else "fp32"
        other = ("--dtype fp32 for full precision" if native
                 else "--dtype bf16 forces it, emulated and much slower")
        print(f"--dtype {dtype} chosen: {why}; {other}", flush=True)
        return dtype
    if precision.dtype == "bf16" and not native:
        print(f"warning: --dtype bf16: {why}: bf16 is emulated and much slower than --dtype fp32 "
              "here", file=sys.stderr, flush=True)
    elif precision.dtype == "bf16" and trap and precision.backend == "tensorflow":
        print(f"warning: --dtype bf16: {why}, but {trap}", file=sys.stderr, flush=True)
    return precision.dtype


def keras_policy(dtype, hpu=None):
    """Keras' dtype policy for a dtype: mixed_float16 for fp16, mixed_bfloat16 for bf16 (but
    float32 on HPU, where Habana's bridge converts the graph itself), else float32."""
    if dtype == "fp16":
        return "mixed_float16"
    if dtype == "bf16" and hpu is None:
        return "mixed_bfloat16"
    return "float32"
