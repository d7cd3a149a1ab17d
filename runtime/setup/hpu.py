"""Habana Gaudi (HPU) support: load the Habana module, prefetch to the HPU, Habana's instance norm.

Unless `--no_hpu`, the tool looks for `habana_frameworks.tensorflow`. When it is there:
- with bf16 (the default on HPU), TF_BF16_CONVERSION points at `--bf16_config_path`, so
  that the Habana bridge converts the graph to bf16 by its op lists (set before the module loads);
- the module is loaded, which registers the HPU device;
- every pipeline prefetches onto that device, and `instancenorm` uses Habana's fused op.
Without it the tool runs on CPU or GPU; it says so in one line only where that may surprise:
when `--bf16_config_path` was given, or at `--tf_verbosity` 0 or 1.
"""
import importlib
import json
import os

from common.errors import UserError
from runtime.setup.precision import Device, choose_dtype

HPU_DEVICE = "/device:HPU:0"
BF16_KEYS = ("allowlist", "conditional_list", "strict_conditional_list", "non_convertible_exceptions",
             "convertible_exceptions")


class Hpu:
    """What the run needs to know of the HPU: its device name, Habana's instance-norm layer and the
    dtype chosen for it."""

    def __init__(self, device, instance_norm_layer, dtype):
        self.device, self.instance_norm_layer, self.dtype = device, instance_norm_layer, dtype


def check_bf16_config(path):
    """A UserError unless `path` is a bf16 config in the Habana bridge's format."""
    try:
        with open(path) as handle:
            config = json.load(handle)
    except OSError as err:
        raise UserError(f"--bf16_config_path {path}: cannot read it ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"--bf16_config_path {path}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or not all(isinstance(config.get(k), list) for k in BF16_KEYS):
        raise UserError(f"--bf16_config_path {path}: not a Habana bf16 config (needs the lists "
                        f"{', '.join(BF16_KEYS)})")
    return config


def setup_hpu(precision, tf_verbosity=None):
    """An Hpu when Habana software is present and wanted (`precision`: the PrecisionSettings), else
    None.

    On the HPU a dtype left to the tool is bf16, chosen here before the module loads. Without
    Habana software a one-line notice says so when the run asked for Habana things
    (`--bf16_config_path`) or at `--tf_verbosity` 0 or 1.
    """
    if precision.no_hpu:
        return None
    try:
        habana = importlib.import_module("habana_frameworks.tensorflow")
    except ImportError:
        if precision.bf16_config_explicit or tf_verbosity in (0, 1):
            print("no Habana software found (habana_frameworks.tensorflow): running on CPU/GPU; "
                  "--no_hpu skips this check", flush=True)
        return None
    dtype = choose_dtype(precision, Device("hpu"))
    if dtype == "bf16":
        check_bf16_config(precision.bf16_config_path)
        os.environ["TF_BF16_CONVERSION"] = os.path.abspath(precision.bf16_config_path)
    habana.load_habana_module()
    norm = importlib.import_module("habana_frameworks.tensorflow.ops.instance_norm")
    return Hpu(HPU_DEVICE, norm.HabanaInstanceNormalization, dtype)
