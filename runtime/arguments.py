"""Command line of the tool: every flag of the UNet3D reference, grouped so that other models fit.

`parse_args` returns an `argparse.Namespace`; every check that needs more than one flag lives in
`check_args`, which reports a problem as a one-line argparse error naming the flag.
"""
import argparse
import os

EXEC_MODES = ("train", "evaluate", "train_and_evaluate", "predict", "train_and_predict")
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BF16_CONFIG = os.path.join(HERE, "bf16_config", "unet.json")


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
    group.add_argument("--model", choices=("unet3d", "vnet"), default="unet3d",
                       help="unet3d (BraTS TFRecords) or vnet (an MSD task folder) "
                            "(default: %(default)s)")
    group.add_argument("--exec_mode", default="train_and_evaluate", choices=EXEC_MODES,
                       help="what to do (default: %(default)s)")
    group.add_argument("--model_dir", nargs="+", default=["./results"],
                       help="checkpoints and predictions go here (default: ./results); evaluate "
                            "and predict take several, an ensemble averaging their probabilities")
    group.add_argument("--output_dir", default=None,
                       help="predict writes masks, probabilities and NIfTI files here (default: "
                            "the first --model_dir)")
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
                       help="predict also writes <case>.nii.gz masks in BraTS labels (0, 1, 2, 4) "
                            "and the case's own grid, into model_dir/nifti")
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
                       help="optimizer (default: rmsprop, centered)")
    group.add_argument("--gradient_clipping", choices=("global_norm", "none"), default=None,
                       help="clip gradients to a global norm of 1.0 (default: global_norm)")
    group.add_argument("--base_lr", type=positive_float, default=None,
                       help="learning rate (default: 0.0001)")
    group.add_argument("--momentum", type=float, default=None, help="optimizer momentum (default: 0.0)")
    group.add_argument("--train_split", type=float, default=None,
                       help="fraction of the training cases that train; the rest validate "
                            "(default: 1.0)")
    group.add_argument("--split_seed", type=non_negative_int, default=None,
                       help="accepted for compatibility: as in the reference the split takes the "
                            "cases in dataset.json order (default: 0)")


COMMON_DEFAULTS = {"batch_size": (2, 8), "seed": (None, 0), "log_every": (100, 10),
                   "warmup_steps": (40, 200), "augment": (True, False), "loss": ("dice+ce", "dice"),
                   "dtype": (None, "fp32")}  # None: bf16 where native, else fp32 (runtime/precision.py)
UNET3D_DEFAULTS = {"max_steps": 16000, "fold": 0, "num_folds": 5, "learning_rate": 0.0002,
                   "normalization": "instancenorm", "include_background": False}
VNET_DEFAULTS = {"data_normalization": "zscore", "activation": "relu", "resize_interpolator": "linear",
                 "normalization_layer": "batchnorm", "pooling": "conv_pool",
                 "upsampling": "transposed_conv", "input_shape": [32, 32, 32],
                 "downscale_blocks": [3, 3, 3], "upscale_blocks": [3, 3], "convolution_size": 3,
                 "train_epochs": 1, "optimizer": "rmsprop", "gradient_clipping": "global_norm",
                 "base_lr": 0.0001, "momentum": 0.0, "train_split": 1.0, "split_seed": 0}


def apply_model_defaults(parser, args):
    """Reject the other model's flags, then fill in this model's defaults."""
    own, other = ((UNET3D_DEFAULTS, VNET_DEFAULTS) if args.model == "unet3d"
                  else (VNET_DEFAULTS, UNET3D_DEFAULTS))
    for name in other:
        if getattr(args, name) is not None:
            parser.error(f"argument --{name}: belongs to --model "
                         f"{'vnet' if args.model == 'unet3d' else 'unet3d'}, not {args.model}")
    if args.model == "vnet" and args.loss not in (None, "dice"):
        parser.error(f"argument --loss: vnet trains with the dice loss, got {args.loss}")
    column = 0 if args.model == "unet3d" else 1
    for name, values in COMMON_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[column])
    for name, value in own.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


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
                          "otherwise: on CPU XLA makes UNet3D training about ten times slower, and "
                          "HPUs run without it; always on with --backend jax)")
    xla.add_argument("--no_xla", dest="use_xla", action="store_false",
                     help="do not compile with XLA")
    group.add_argument("--conv_kernel", choices=("auto", "keras"), default="auto",
                       help="auto: with --backend jax, bf16 and one Hopper GPU (H100, H200), UNet3D's "
                            "3×3×3 convolutions of up to 32 channels (its 128³ level in training) "
                            "compute their forward pass and input gradient with the tool's Mosaic GPU "
                            "kernel (runtime/mosaic_conv.py; about 7%% more images/s on an H100); "
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


JAX_PROCESS_FLAGS = {"coordinator_address": "JAX_COORDINATOR_ADDRESS",
                     "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}


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


def check_jax_process_flags(parser, args, environ):
    """The three flags of several JAX processes, filled in from JAX_* variables and checked."""
    from runtime.cluster import launched_by
    if args.backend != "jax":
        for name in JAX_PROCESS_FLAGS:
            if getattr(args, name) is not None:
                parser.error(f"argument --{name}: needs --backend jax (TensorFlow workers come from "
                             "mpirun, srun or TF_CONFIG)")
        return
    for name, variable in JAX_PROCESS_FLAGS.items():
        text = environ.get(variable)
        if getattr(args, name) is not None or not text:
            continue
        if name == "coordinator_address":
            args.coordinator_address = text
            continue
        lowest = 1 if name == "num_processes" else 0
        if not text.isdigit() or int(text) < lowest:
            parser.error(f"{variable}={text}: must be an integer of at least {lowest}")
        setattr(args, name, int(text))
    address, count, index = args.coordinator_address, args.num_processes, args.process_id
    if address is not None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            parser.error(f"argument --coordinator_address: HOST:PORT of process 0, got {address}")
    if count is not None and index is not None and index >= count:
        parser.error(f"argument --process_id: must be below --num_processes ({count}), got {index}")
    if launched_by(environ) in ("mpi", "slurm"):
        return  # JAX detects what is not given
    given = [f"--{name}" for name in JAX_PROCESS_FLAGS if getattr(args, name) is not None]
    if given and len(given) < len(JAX_PROCESS_FLAGS):
        missing = [f"--{name}" for name in JAX_PROCESS_FLAGS if getattr(args, name) is None]
        parser.error(f"argument {given[0]}: needs {' and '.join(missing)} too (outside mpirun and "
                     "srun)")


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


def check_args(parser, args):
    """Cross-flag checks; a failure exits through `parser.error` with a one-line message."""
    apply_model_defaults(parser, args)
    check_model_dirs(parser, args)
    args.backend = args.backend or os.environ.get("KERAS_BACKEND") or "tensorflow"
    if args.backend not in ("tensorflow", "jax"):
        parser.error(f"KERAS_BACKEND={args.backend}: this tool runs on tensorflow or jax")
    if args.backend == "jax":
        for flag in ("use_horovod", "use_amp"):
            if getattr(args, flag):
                parser.error(f"argument --{flag}: needs --backend tensorflow (on jax use --dtype bf16; "
                             "several processes join through jax.distributed)")
    check_jax_process_flags(parser, args, os.environ)
    if args.model == "unet3d" and args.fold >= args.num_folds:
        parser.error(f"argument --fold: must be below --num_folds ({args.num_folds}), "
                     f"got {args.fold}")
    if args.model == "vnet" and not 0.0 < args.train_split <= 1.0:
        parser.error(f"argument --train_split: must be in (0, 1], got {args.train_split}")
    if args.model == "vnet" and len(args.upscale_blocks) != len(args.downscale_blocks) - 1:
        parser.error("argument --upscale_blocks: needs one block fewer than --downscale_blocks "
                     f"({len(args.downscale_blocks)}), got {len(args.upscale_blocks)}")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        parser.error(f"argument --data_dir: {args.data_dir} is not a folder")
    args.bf16_config_explicit = args.bf16_config_path is not None
    args.bf16_config_path = args.bf16_config_path or DEFAULT_BF16_CONFIG
    if args.bf16_config_explicit and not os.path.isfile(args.bf16_config_path):
        parser.error(f"argument --bf16_config_path: {args.bf16_config_path} does not exist")
    return args


def check_model_dirs(parser, args):
    """One --model_dir to train; several (an ensemble) only to evaluate or predict. Keeps the first
    in args.model_dir and every one in args.model_dirs."""
    dirs = [args.model_dir] if isinstance(args.model_dir, str) else list(args.model_dir)
    if len(dirs) > 1 and args.exec_mode.startswith("train"):
        parser.error(f"argument --model_dir: --exec_mode {args.exec_mode} trains into one folder, "
                     f"got {len(dirs)}; several (an ensemble) are for evaluate and predict")
    if args.sliding_window and args.model == "vnet":
        parser.error("argument --sliding_window: V-Net's inputs are resampled whole onto "
                     "--input_shape; leave it out for --model vnet (--tta works for both)")
    args.model_dirs, args.model_dir = dirs, dirs[0]


def parse_args(argv=None):
    """Parse and check the command line (sys.argv[1:] when argv is None)."""
    parser = build_parser()
    return check_args(parser, parser.parse_args(argv))
