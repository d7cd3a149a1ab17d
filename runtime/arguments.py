"""The command line: every flag of the references, grouped by section, parsed into `Settings`.

This is the one module that sees the argparse Namespace: `parse_args` hands its values to
runtime/settings.py, which fills the defaults and checks the flags together, binding the
network-defining ones to a model_dir's saved settings. Errors are one line naming the flag.
The defaults are written only there: a flag left out is None here, and each help states the
default of the setting its flag fills (`_flag`).
"""
import argparse
import os
from typing import Any, Dict, Mapping, NoReturn, Optional, Sequence

from runtime.run_record import saved_network
from runtime.settings import (EXEC_MODES, GRADIENT_CLIPPING, HERE as PROJECT, MODELS, FlagError,
                              RunSettings, Settings, flag_defaults, resolve)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def spelled(value: Any) -> str:
    """A default as --help writes it: on/off, none, a list space-separated, a file of the project
    relative to the project's folder."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    if isinstance(value, str) and value.startswith(PROJECT + os.sep):
        return os.path.relpath(value, PROJECT)
    return str(value)


def default_text(dest: str) -> Optional[str]:
    """How --help states the default of the setting that the flag `dest` fills (runtime/settings.py
    holds the value): "X", or "X for unet3d, Y for vnet" where the networks' defaults differ; None
    where there is no value to state (no such setting, none for every network, a switch that is
    off)."""
    values = flag_defaults(dest)
    if all(value is None or value is False for value in values.values()):
        return None
    texts = {model: spelled(value) for model, value in values.items()}
    if len(set(texts.values())) == 1:
        return next(iter(texts.values()))
    return ", ".join(f"{text} for {model}" for model, text in texts.items())


def _flag(group: argparse._ArgumentGroup, *names: str, **kwargs: Any) -> argparse.Action:
    """`group.add_argument` for a flag that fills a setting: left out it gives None (a switch
    False) and `resolve` takes the setting's default, which the help states. The help places it
    with "{default}" (the text of `default_text`) or "{unet3d}" / "{vnet}" (one network's);
    without any of them, and without a "(default: ...)" of its own (words for a setting whose
    default is none), "(default: X)" is appended where there is a value to state.
    tests/test_arguments.py checks every stated default against the settings."""
    action = group.add_argument(*names, **kwargs)
    text = default_text(action.dest)
    markers = {"{default}": text}
    markers.update({"{" + model + "}": spelled(value)
                    for model, value in flag_defaults(action.dest).items()})
    if any(marker in action.help for marker in markers):
        for marker, value in markers.items():
            if marker in action.help:
                action.help = action.help.replace(marker, value)
    elif text is not None and "(default: " not in action.help:
        action.help += f" (default: {text})"
    return action


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    _flag(group, "--model", choices=MODELS,
          help="unet3d (BraTS TFRecords) or vnet (an MSD task folder) (default: the model_dir's "
               "saved settings, else {default})")
    _flag(group, "--exec_mode", choices=EXEC_MODES, help="what to do")
    _flag(group, "--model_dir", dest="model_dirs", nargs="+",
          help="checkpoints and predictions go here (default: {default}); evaluate and predict "
               "take several, an ensemble averaging their probabilities")
    _flag(group, "--output_dir",
          help="predict writes masks, probabilities and NIfTI files here, evaluate metrics.csv, "
               "both PNGs (default: the first --model_dir)")
    _flag(group, "--export_dir",
          help="--exec_mode export writes the newest checkpoint of --model_dir here, as a "
               "SavedModel, model.onnx and metadata.json for segment.py (a new or empty folder)")
    _flag(group, "--log_dir", help="JSON-lines log (log.json) and TensorBoard files")
    _flag(group, "--data_dir",
          help="unet3d: a folder of preprocessed TFRecord files; vnet: an MSD task folder "
               "(dataset.json); without it a built-in phantom dataset is generated once and used")
    _flag(group, "--batch_size", type=positive_int, help="batch size per device")
    _flag(group, "--seed", type=non_negative_int,
          help="seed for weights, shuffling and augmentation; two runs with the same seed give the "
               "same numbers on the same machine")
    _flag(group, "--log_every", type=positive_int, help="log the training loss every N steps")
    _flag(group, "--resume_training", action="store_true",
          help="continue from the newest checkpoint in model_dir")
    _flag(group, "--disable_ckpt_saving", action="store_true", help="write no checkpoints")
    _flag(group, "--ckpt_every", type=non_negative_int,
          help="also save a checkpoint every N training steps, 0 for only at the end")
    _flag(group, "--save_nifti", action="store_true",
          help="predict also writes <case>.nii.gz masks in the dataset's own label values (BraTS "
               "2019-2021: 0, 1, 2, 4) on the case's own grid, into output_dir/nifti")
    _flag(group, "--save_png", action="store_true",
          help="evaluate and predict also write <case>.png into output_dir/png: the axial, coronal "
               "and sagittal slices through the tumour's centre, the first image channel with the "
               "ground truth (solid) and prediction (dashed) outlined")
    _flag(group, "--eval_every", type=non_negative_int,
          help="training also evaluates (the centred window) every N steps, 0 for never, in one "
               "process; log_dir/training_curves.png plots the validation dice with the loss")
    _flag(group, "--benchmark", action="store_true",
          help="time every step and report throughput and latency")
    _flag(group, "--warmup_steps", type=non_negative_int,
          help="steps left out of the benchmark statistics")
    _flag(group, "--augment", action=argparse.BooleanOptionalAction,
          help="random flips (and for unet3d brightness) during training")
    _flag(group, "--synth_data", action="store_true",
          help="deterministic synthetic data instead of data_dir")
    _flag(group, "--tensorboard_logging", action="store_true",
          help="write TensorBoard scalars and hyper-parameters into log_dir")
    _flag(group, "--log_all_workers", action="store_true",
          help="every worker logs into worker_N subfolders of log_dir and model_dir")
    _flag(group, "--tf_verbosity", type=int, choices=(0, 1, 2, 3),
          help="TensorFlow's C++ log level (TF_CPP_MIN_LOG_LEVEL); 0 also shows Python tracebacks "
               "of errors")
    _flag(group, "--dump_config", metavar="DIR",
          help="write the training step's graph and XLA HLO and a profiler trace of three training "
               "steps into DIR, for performance debugging")


def overlap_fraction(text: str) -> float:
    """argparse type: a float in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _add_inference_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inference (evaluate, predict)")
    _flag(group, "--sliding_window", action="store_true",
          help="unet3d: predict and score each whole volume with overlapping windows of the "
               "training crop size, blended with a Gaussian (without it, the reference's centred "
               "window)")
    _flag(group, "--overlap", type=overlap_fraction,
          help="sliding windows overlap by at least this fraction of a window, in [0, 1)")
    _flag(group, "--sw_batch_size", type=positive_int,
          help="sliding windows run through the network together")
    _flag(group, "--tta", action="store_true",
          help="test-time augmentation: the mean of the probabilities of the 8 mirrorings of the "
               "three spatial axes")
    _flag(group, "--challenge_metrics", action="store_true",
          help="unet3d with --sliding_window: evaluate also computes the BraTS challenge's metrics "
               "with panoptica (per region: Dice, NSD, HD95; lesion-wise TP, FP, FN, F1, Dice, NSD, "
               "HD95), writes them per case to metrics.csv in output_dir and logs their means")
    _flag(group, "--save_probabilities", action="store_true",
          help="predict also writes each volume's class probabilities (float16, D×H×W×classes) as "
               "<mask name>.npz beside its mask")
    _flag(group, "--choose_postprocessing", action="store_true",
          help="with --challenge_metrics: evaluate also chooses the postprocessing of the masks "
               "on the validation cases (per region: none, removing components below N voxels, "
               "keeping the largest, relabelling an enhancing tumour below T voxels as core; one "
               "kept only if it beats none), writes it to postprocessing.json in the first "
               "--model_dir, metrics.csv after it and metrics_raw.csv before")
    _flag(group, "--postprocessing_criterion", metavar="COLUMNS",
          help="what --choose_postprocessing maximizes: metrics.csv score columns, comma-separated, "
               "their mean over every region and case (hd95, lesion_hd95, lesion_fp, lesion_fn "
               "are minimized)")
    _flag(group, "--no_postprocessing", action="store_true",
          help="evaluate, predict and export leave out the model_dir's postprocessing.json, which "
               "they otherwise apply to the masks (metrics.csv, pictures, masks, NIfTI files) and "
               "carry into metadata.json")


def _add_unet3d_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("UNet3D on BraTS (--model unet3d)")
    _flag(group, "--max_steps", type=positive_int,
          help="training steps in all, divided among the workers unless benchmarking")
    _flag(group, "--fold", type=non_negative_int, help="validation fold")
    _flag(group, "--num_folds", type=positive_int, help="number of cross-validation folds")
    _flag(group, "--learning_rate", type=positive_float, help="Adam learning rate")
    _flag(group, "--loss", choices=("dice", "ce", "dice+ce"), help="training loss")
    _flag(group, "--normalization", choices=("instancenorm", "batchnorm", "groupnorm", "none"),
          help="normalization layer")
    _flag(group, "--include_background", action="store_const", const=True,
          help="keep class 0 in the loss and the metrics")


def _add_vnet_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("V-Net on MSD data (--model vnet)")
    _flag(group, "--data_normalization", choices=("zscore", "none"),
          help="per-volume intensity normalization of non-CT images")
    _flag(group, "--activation", choices=("relu", "elu"),
          help="activation after each convolution")
    _flag(group, "--resize_interpolator", choices=("linear", "nearest", "bspline"),
          help="interpolation of images onto --input_shape (default: {default}; labels always use "
               "nearest neighbour)")
    _flag(group, "--normalization_layer", choices=("batchnorm", "instancenorm", "groupnorm", "none"),
          help="normalization after each convolution")
    _flag(group, "--pooling", choices=("conv_pool", "avg_pool", "max_pool"),
          help="down-sampling of the down blocks")
    _flag(group, "--upsampling", choices=("transposed_conv", "upsampling"),
          help="up-sampling of the up blocks")
    _flag(group, "--input_shape", type=positive_int, nargs=3, metavar=("X", "Y", "Z"),
          help="grid every volume is resampled to")
    _flag(group, "--downscale_blocks", type=positive_int, nargs="+",
          help="convolutions in each down block's residual block")
    _flag(group, "--upscale_blocks", type=positive_int, nargs="+",
          help="convolutions in each up block's residual block")
    _flag(group, "--convolution_size", type=int, choices=(3, 5),
          help="kernel size of the convolutions")
    _flag(group, "--train_epochs", type=positive_int, help="passes over the training cases")
    _flag(group, "--optimizer", choices=("rmsprop", "adam", "sgd"),
          help="optimizer, with TensorFlow 1's update rules; rmsprop is centered, as the "
               "reference's")
    _flag(group, "--gradient_clipping", choices=GRADIENT_CLIPPING,
          help="global_norm and none apply unclipped gradients, as the reference trained (it "
               "clipped a copy it never applied); applied_global_norm clips the applied gradients "
               "to a global norm of 1.0")
    _flag(group, "--base_lr", type=positive_float, help="learning rate")
    _flag(group, "--momentum", type=float, help="optimizer momentum")
    _flag(group, "--train_split", type=float,
          help="fraction of the training cases that train; the rest validate")
    _flag(group, "--split_seed", type=non_negative_int,
          help="accepted for compatibility: as in the reference the split takes the cases in "
               "dataset.json order")


def _add_precision_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("precision and devices")
    _flag(group, "--backend", choices=("tensorflow", "jax"),
          help="Keras backend (default: $KERAS_BACKEND, else {default}); with jax, XLA is always "
               "on and --synth_data needs no TensorFlow")
    _flag(group, "--dtype", "-d", choices=("fp32", "bf16"),
          help="compute precision (default: {vnet} for vnet; for unet3d bf16 where the device runs "
               "it natively, on Habana cards, NVIDIA GPUs of compute capability 8.0 or higher and "
               "CPUs with AVX512_BF16 or AMX, else fp32, with a notice of the choice). bf16 asked "
               "for on other devices runs emulated, much slower, after a warning")
    _flag(group, "--bf16_config_path",
          help="op lists of Habana's bf16 conversion, used with bf16 on HPU")
    _flag(group, "--use_amp", "--amp", dest="use_amp", action="store_true",
          help="float16 automatic mixed precision with loss scaling, for GPUs; on a CPU without "
               "AMX-FP16 a training step takes many times an fp32 one (a warning says so)")
    xla = group.add_mutually_exclusive_group()
    _flag(xla, "--use_xla", "--xla", dest="use_xla", action="store_true", default=None,
          help="compile the steps with XLA (default: on when a GPU is visible, off otherwise: on "
               "CPU XLA makes UNet3D training much slower, and HPUs run without it; always on "
               "with --backend jax)")
    _flag(xla, "--no_xla", dest="use_xla", action="store_false", help="do not compile with XLA")
    _flag(group, "--conv_kernel", choices=("auto", "keras"),
          help="auto: with --backend jax, bf16 and Hopper GPUs (H100, H200) in one process, "
               "UNet3D's 3×3×3 convolutions of up to 32 channels (the 128³ level of a training "
               "crop, the evaluation window) compute their forward pass and input gradient, and "
               "the 32→32, 64→32 and 32→classes ones of the 128³ level (and the image's, from "
               "batch 4 per GPU) their kernel gradient, with the tool's Mosaic GPU kernels "
               "(runtime/engines/mosaic_conv.py, mosaic_wgrad.py); keras: Keras's (XLA's) "
               "convolutions everywhere")
    _flag(group, "--no_hpu", action="store_true",
          help="do not look for a Habana Gaudi card. Without this flag the HPU is used when the "
               "package habana_frameworks.tensorflow imports (Habana's containers install it); "
               "otherwise the run stays on CPU/GPU, and says so when --bf16_config_path was given "
               "or at --tf_verbosity 0 or 1")
    _flag(group, "--use_horovod", action="store_true",
          help="data-parallel training with Horovod (must be installed)")
    _add_jax_process_flags(parser)
    # Accepted for compatibility with the reference launch scripts; they change nothing.
    group.add_argument("--num_workers_per_hls", type=int, default=1, help=argparse.SUPPRESS)
    group.add_argument("--hls_type", default="HLS1", help=argparse.SUPPRESS)
    group.add_argument("--kubernetes_run", default=False, help=argparse.SUPPRESS)


def _add_jax_process_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "several JAX processes (--backend jax)",
        "Under mpirun (Open MPI) or srun (SLURM) JAX finds these itself; elsewhere start every "
        "process with the same --coordinator_address and --num_processes and its own --process_id.")
    _flag(group, "--coordinator_address", metavar="HOST:PORT",
          help="address of process 0, where jax.distributed's coordinator listens (default: "
               "$JAX_COORDINATOR_ADDRESS)")
    _flag(group, "--num_processes", type=positive_int,
          help="processes in all (default: $JAX_NUM_PROCESSES)")
    _flag(group, "--process_id", type=non_negative_int,
          help="this process's index, 0 to num_processes - 1; process 0 saves, evaluates, "
               "predicts and logs (default: $JAX_PROCESS_ID)")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line: `main.py: error: <what> (see --help)`."""

    def error(self, message: str) -> NoReturn:
        """Exit with status 2 and `message` on one line."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> Parser:
    """The argparse parser of main.py: every flag left out is None (a switch False), and its help
    states the default of the setting it fills, read from runtime/settings.py."""
    parser = Parser(
        prog="main.py",
        description="Train, evaluate and run 3-D segmentation networks: UNet3D on BraTS, "
                    "V-Net on Medical Segmentation Decathlon data.")
    _add_run_flags(parser)
    _add_inference_flags(parser)
    _add_unet3d_flags(parser)
    _add_vnet_flags(parser)
    _add_precision_flags(parser)
    return parser


def data_network(flags: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The network fields UNet3D's training data fixes (convention, input channels, classes):
    those of --data_dir's records.json, or without --data_dir those of the built-in phantom
    (BraTS 2019-2021 data, as records without records.json); None where the run reads no records
    (V-Net, synthetic data, an export without --data_dir, a --data_dir that is no folder)."""
    data_dir = flags.get("data_dir")
    if flags.get("model") not in (None, "unet3d") or flags.get("synth_data"):
        return None
    from dataset.record_info import DEFAULT_INFO, read_info
    if data_dir is None:
        return None if flags.get("exec_mode") == "export" else DEFAULT_INFO.network_fields()
    return read_info(data_dir).network_fields() if os.path.isdir(data_dir) else None


def parse_args(argv: Optional[Sequence[str]] = None,
               environ: Optional[Mapping[str, str]] = None) -> Settings:
    """Parse and check the command line (sys.argv[1:] when argv is None) into frozen Settings.

    A flag error exits with status 2 and one line; an unreadable saved settings file or an
    ensemble of different networks is a UserError.
    """
    from runtime.loops.checkpoint import latest_checkpoint
    from runtime.setup.cluster import launched_by
    parser = build_parser()
    flags = dict(vars(parser.parse_args(argv)))
    for name in ("num_workers_per_hls", "hls_type", "kubernetes_run"):  # the reference's, unused
        flags.pop(name)
    environ = os.environ if environ is None else environ
    reads_saved = flags["exec_mode"] in ("evaluate", "predict", "export") or flags["resume_training"]
    saved = None
    if reads_saved:
        model_dirs = flags["model_dirs"] or RunSettings.model_dirs
        saved = saved_network(model_dirs, lambda d: latest_checkpoint(d) is not None)
    try:
        return resolve(flags, environ, launched_by(environ), saved, data_network(flags),
                       phantom=flags["data_dir"] is None)
    except FlagError as err:
        parser.error(str(err))
