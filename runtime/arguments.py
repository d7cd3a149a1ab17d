"""The command line: every flag of the references, grouped by section, parsed into `Settings`.

This is the one module that sees the argparse Namespace: `parse_args` hands its values to
runtime/settings.py, which fills the defaults and checks the flags together, binding the
network-defining ones to a model_dir's saved settings. Errors are one line naming the flag.
"""
import argparse
import os

from runtime.run_record import saved_network
from runtime.settings import EXEC_MODES, GRADIENT_CLIPPING, MODELS, FlagError, resolve


def positive_int(text):
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {text}")
    return value


def positive_float(text):
    """argparse type: a float > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _add_run_flags(parser):
    group = parser.add_argument_group("run")
    group.add_argument("--model", choices=MODELS, default=None,
                       help="unet3d (BraTS TFRecords) or vnet (an MSD task folder) (default: the "
                            "model_dir's saved settings, else unet3d)")
    group.add_argument("--exec_mode", default="train_and_evaluate", choices=EXEC_MODES,
                       help="what to do (default: %(default)s)")
    group.add_argument("--model_dir", dest="model_dirs", nargs="+", default=["./results"],
                       help="checkpoints and predictions go here (default: ./results); evaluate "
                            "and predict take several, an ensemble averaging their probabilities")
    group.add_argument("--output_dir", default=None,
                       help="predict writes masks, probabilities and NIfTI files here, evaluate "
                            "metrics.csv, both PNGs (default: the first --model_dir)")
    group.add_argument("--export_dir", default=None,
                       help="--exec_mode export writes the newest checkpoint of --model_dir here, "
                            "as a SavedModel, model.onnx and metadata.json for segment.py (a new "
                            "or empty folder)")
    group.add_argument("--log_dir", default="/tmp/unet3d_logs",
                       help="JSON-lines log (log.json) and TensorBoard files (default: %(default)s)")
    group.add_argument("--data_dir", default=None,
                       help="unet3d: a folder of preprocessed TFRecord files; vnet: an MSD task "
                            "folder (dataset.json); without it a built-in phantom dataset is "
                            "generated once and used")
    group.add_argument("--batch_size", type=positive_int, default=None,
                       help="batch size per device (default: 2 for unet3d, 8 for vnet)")
    group.add_argument("--seed", type=non_negative_int, default=None,
                       help="seed for weights, shuffling and augmentation; two runs with the same "
                            "seed give the same numbers on the same machine (default: none for "
                            "unet3d, 0 for vnet)")
    group.add_argument("--log_every", type=positive_int, default=None,
                       help="log the training loss every N steps (default: 100 for unet3d, 10 "
                            "for vnet)")
    group.add_argument("--resume_training", action="store_true",
                       help="continue from the newest checkpoint in model_dir")
    group.add_argument("--disable_ckpt_saving", action="store_true",
                       help="write no checkpoints")
    group.add_argument("--ckpt_every", type=non_negative_int, default=1000,
                       help="also save a checkpoint every N training steps, 0 for only at the end "
                            "(default: %(default)s)")
    group.add_argument("--save_nifti", action="store_true",
                       help="predict also writes <case>.nii.gz masks in the dataset's own label "
                            "values (BraTS 2019-2021: 0, 1, 2, 4) on the case's own grid, into "
                            "model_dir/nifti")
    group.add_argument("--save_png", action="store_true",
                       help="evaluate and predict also write <case>.png into output_dir/png: the "
                            "axial, coronal and sagittal slices through the tumour's centre, the "
                            "first image channel with the ground truth (solid) and prediction "
                            "(dashed) outlined")
    group.add_argument("--eval_every", type=non_negative_int, default=0,
                       help="training also evaluates (the centred window) every N steps, in one "
                            "process; log_dir/training_curves.png plots the validation dice with "
                            "the loss (default: 0, off)")
    group.add_argument("--benchmark", action="store_true",
                       help="time every step and report throughput and latency")
    group.add_argument("--warmup_steps", type=non_negative_int, default=None,
                       help="steps left out of the benchmark statistics (default: 40 for unet3d, "
                            "200 for vnet)")
    group.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                       help="random flips (and for unet3d brightness) during training (default: "
                            "on for unet3d, off for vnet)")
    group.add_argument("--synth_data", action="store_true",
                       help="deterministic synthetic data instead of data_dir")
    group.add_argument("--tensorboard_logging", action="store_true",
                       help="write TensorBoard scalars and hyper-parameters into log_dir")
    group.add_argument("--log_all_workers", action="store_true",
                       help="every worker logs into worker_N subfolders of log_dir and model_dir")
    group.add_argument("--tf_verbosity", type=int, choices=(0, 1, 2, 3), default=None,
                       help="TensorFlow's C++ log level (TF_CPP_MIN_LOG_LEVEL); 0 also shows "
                            "Python tracebacks of errors")
    group.add_argument("--dump_config", default=None, metavar="DIR",
                       help="write the training step's graph and XLA HLO and a profiler trace of "
                            "three training steps into DIR, for performance debugging")


def overlap_fraction(text):
    """argparse type: a float in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _add_inference_flags(parser):
    group = parser.add_argument_group("inference (evaluate, predict)")
    group.add_argument("--sliding_window", action="store_true",
                       help="unet3d: predict and score each whole volume with overlapping windows "
                            "of the training crop size, blended with a Gaussian (default: the "
                            "reference's centred window)")
    group.add_argument("--overlap", type=overlap_fraction, default=0.5,
                       help="sliding windows overlap by at least this fraction of a window, in "
                            "[0, 1) (default: %(default)s)")
    group.add_argument("--sw_batch_size", type=positive_int, default=2,
                       help="sliding windows run through the network together (default: %(default)s)")
    group.add_argument("--tta", action="store_true",
                       help="test-time augmentation: the mean of the probabilities of the 8 "
                            "mirrorings of the three spatial axes")
    group.add_argument("--challenge_metrics", action="store_true",
                       help="unet3d with --sliding_window: evaluate also computes the BraTS "
                            "challenge's metrics with panoptica (per region: Dice, NSD, HD95; "
                            "lesion-wise TP, FP, FN, F1, Dice, NSD, HD95), writes them per case to "
                            "metrics.csv in output_dir and logs their means")
    group.add_argument("--save_probabilities", action="store_true",
                       help="predict also writes each volume's class probabilities (float16, D×H×W×"
                            "classes) as <mask name>.npz beside its mask")


def _add_unet3d_flags(parser):
    group = parser.add_argument_group("UNet3D on BraTS (--model unet3d)")
    group.add_argument("--max_steps", type=positive_int, default=None,
                       help="training steps in all, divided among the workers unless "
                            "benchmarking (default: 16000)")
    group.add_argument("--fold", type=non_negative_int, default=None,
                       help="validation fold (default: 0)")
    group.add_argument("--num_folds", type=positive_int, default=None,
                       help="number of cross-validation folds (default: 5)")
    group.add_argument("--learning_rate", type=positive_float, default=None,
                       help="Adam learning rate (default: 0.0002)")
    group.add_argument("--loss", choices=("dice", "ce", "dice+ce"), default=None,
                       help="training loss (default: dice+ce; vnet: dice)")
    group.add_argument("--normalization", choices=("instancenorm", "batchnorm", "groupnorm", "none"),
                       default=None, help="normalization layer (default: instancenorm)")
    group.add_argument("--include_background", action="store_const", const=True, default=None,
                       help="keep class 0 in the loss and the metrics")


def _add_vnet_flags(parser):
    group = parser.add_argument_group("V-Net on MSD data (--model vnet)")
    group.add_argument("--data_normalization", choices=("zscore", "none"), default=None,
                       help="per-volume intensity normalization of non-CT images (default: zscore)")
    group.add_argument("--activation", choices=("relu", "elu"), default=None,
                       help="activation after each convolution (default: relu)")
    group.add_argument("--resize_interpolator", choices=("linear", "nearest", "bspline"), default=None,
                       help="interpolation of images onto --input_shape (default: linear; labels "
                            "always use nearest neighbour)")
    group.add_argument("--normalization_layer", choices=("batchnorm", "instancenorm", "groupnorm", "none"),
                       default=None, help="normalization after each convolution (default: batchnorm)")
    group.add_argument("--pooling", choices=("conv_pool", "avg_pool", "max_pool"), default=None,
                       help="down-sampling of the down blocks (default: conv_pool)")
    group.add_argument("--upsampling", choices=("transposed_conv", "upsampling"), default=None,
                       help="up-sampling of the up blocks (default: transposed_conv)")
    group.add_argument("--input_shape", type=positive_int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                       help="grid every volume is resampled to (default: 32 32 32)")
    group.add_argument("--downscale_blocks", type=positive_int, nargs="+", default=None,
                       help="convolutions in each down block's residual block (default: 3 3 3)")
    group.add_argument("--upscale_blocks", type=positive_int, nargs="+", default=None,
                       help="convolutions in each up block's residual block (default: 3 3)")
    group.add_argument("--convolution_size", type=int, choices=(3, 5), default=None,
                       help="kernel size of the convolutions (default: 3)")
    group.add_argument("--train_epochs", type=positive_int, default=None,
                       help="passes over the training cases (default: 1)")
    group.add_argument("--optimizer", choices=("rmsprop", "adam", "sgd"), default=None,
                       help="optimizer, with TensorFlow 1's update rules (default: rmsprop, "
                            "centered, as the reference)")
    group.add_argument("--gradient_clipping", choices=GRADIENT_CLIPPING, default=None,
                       help="global_norm (default) and none apply unclipped gradients, as the "
                            "reference trained (it clipped a copy it never applied); "
                            "applied_global_norm clips the applied gradients to a global norm of 1.0")
    group.add_argument("--base_lr", type=positive_float, default=None,
                       help="learning rate (default: 0.0001)")
    group.add_argument("--momentum", type=float, default=None, help="optimizer momentum (default: 0.0)")
    group.add_argument("--train_split", type=float, default=None,
                       help="fraction of the training cases that train; the rest validate "
                            "(default: 1.0)")
    group.add_argument("--split_seed", type=non_negative_int, default=None,
                       help="accepted for compatibility: as in the reference the split takes the "
                            "cases in dataset.json order (default: 0)")


def _add_precision_flags(parser):
    group = parser.add_argument_group("precision and devices")
    group.add_argument("--backend", choices=("tensorflow", "jax"), default=None,
                       help="Keras backend (default: $KERAS_BACKEND, else tensorflow); with jax, XLA "
                            "is always on and --synth_data needs no TensorFlow")
    group.add_argument("--dtype", "-d", choices=("fp32", "bf16"), default=None,
                       help="compute precision (default for unet3d: bf16 where the device runs it "
                            "natively: Habana cards, NVIDIA GPUs of compute capability 8.0 or "
                            "higher, CPUs with AVX512_BF16 or AMX; fp32 elsewhere, with a notice "
                            "of the choice. vnet: fp32). bf16 asked for on other devices runs "
                            "emulated, much slower, after a warning")
    group.add_argument("--bf16_config_path", default=None,
                       help="op lists of Habana's bf16 conversion, used with bf16 on HPU "
                            "(default: bf16_config/unet.json)")
    group.add_argument("--use_amp", "--amp", dest="use_amp", action="store_true",
                       help="float16 automatic mixed precision with loss scaling, for GPUs; on a "
                            "CPU without AVX512_FP16 or AMX-FP16 it is emulated (a warning says so)")
    xla = group.add_mutually_exclusive_group()
    xla.add_argument("--use_xla", "--xla", dest="use_xla", action="store_true", default=None,
                     help="compile the steps with XLA (default: on when a GPU is visible, off "
                          "otherwise: on CPU XLA makes UNet3D training much slower, and HPUs run "
                          "without it; always on with --backend jax)")
    xla.add_argument("--no_xla", dest="use_xla", action="store_false",
                     help="do not compile with XLA")
    group.add_argument("--conv_kernel", choices=("auto", "keras"), default="auto",
                       help="auto: with --backend jax, bf16 and one Hopper GPU (H100, H200), UNet3D's "
                            "3×3×3 convolutions of up to 32 channels (its 128³ level in training) "
                            "compute their forward pass and input gradient with the tool's Mosaic GPU "
                            "kernel (runtime/engines/mosaic_conv.py); "
                            "keras: Keras's (XLA's) convolutions everywhere (default: %(default)s)")
    group.add_argument("--no_hpu", action="store_true",
                       help="do not look for a Habana Gaudi card. Without this flag the HPU is used "
                            "when the package habana_frameworks.tensorflow imports (Habana's "
                            "containers install it); otherwise the run stays on CPU/GPU, and says "
                            "so when --bf16_config_path was given or at --tf_verbosity 0 or 1")
    group.add_argument("--use_horovod", action="store_true",
                       help="data-parallel training with Horovod (must be installed)")
    _add_jax_process_flags(parser)
    # Accepted for compatibility with the reference launch scripts; they change nothing.
    group.add_argument("--num_workers_per_hls", type=int, default=1, help=argparse.SUPPRESS)
    group.add_argument("--hls_type", default="HLS1", help=argparse.SUPPRESS)
    group.add_argument("--kubernetes_run", default=False, help=argparse.SUPPRESS)


def _add_jax_process_flags(parser):
    group = parser.add_argument_group(
        "several JAX processes (--backend jax)",
        "Under mpirun (Open MPI) or srun (SLURM) JAX finds these itself; elsewhere start every "
        "process with the same --coordinator_address and --num_processes and its own --process_id.")
    group.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                       help="address of process 0, where jax.distributed's coordinator listens "
                            "(default: $JAX_COORDINATOR_ADDRESS)")
    group.add_argument("--num_processes", type=positive_int, default=None,
                       help="processes in all (default: $JAX_NUM_PROCESSES)")
    group.add_argument("--process_id", type=non_negative_int, default=None,
                       help="this process's index, 0 to num_processes - 1; process 0 saves, "
                            "evaluates, predicts and logs (default: $JAX_PROCESS_ID)")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line: `main.py: error: <what> (see --help)`."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    """The argparse parser of main.py."""
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


def data_network(flags):
    """The network fields --data_dir's records fix (their records.json: convention, input
    channels, classes), or None without a records folder (phantom or synthetic data, V-Net)."""
    data_dir = flags.get("data_dir")
    if flags.get("model") not in (None, "unet3d") or flags.get("synth_data") or data_dir is None \
            or not os.path.isdir(data_dir):
        return None
    from dataset.record_info import read_info
    return read_info(data_dir).network_fields()


def parse_args(argv=None, environ=None):
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
        saved = saved_network(flags["model_dirs"], lambda d: latest_checkpoint(d) is not None)
    try:
        return resolve(flags, environ, launched_by(environ), saved, data_network(flags))
    except FlagError as err:
        parser.error(str(err))
