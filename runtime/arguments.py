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
    group.add_argument("--exec_mode", default="train_and_evaluate", choices=EXEC_MODES,
                       help="what to do (default: %(default)s)")
    group.add_argument("--model_dir", default="./results",
                       help="checkpoints and predictions go here (default: %(default)s)")
    group.add_argument("--log_dir", default="/tmp/unet3d_logs",
                       help="JSON-lines log (log.json) and TensorBoard files (default: %(default)s)")
    group.add_argument("--data_dir", default=None,
                       help="folder of preprocessed TFRecord files; without it the built-in "
                            "phantom dataset is generated once and used")
    group.add_argument("--batch_size", type=positive_int, default=2,
                       help="batch size per device (default: %(default)s)")
    group.add_argument("--max_steps", type=positive_int, default=16000,
                       help="training steps in all, divided among the workers unless "
                            "benchmarking (default: %(default)s)")
    group.add_argument("--seed", type=non_negative_int, default=None,
                       help="seed for weights, shuffling and augmentation; two runs with the same "
                            "seed give the same numbers on the same machine")
    group.add_argument("--log_every", type=positive_int, default=100,
                       help="log the training loss every N steps (default: %(default)s)")
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
    group.add_argument("--warmup_steps", type=non_negative_int, default=40,
                       help="steps left out of the benchmark statistics (default: %(default)s)")
    group.add_argument("--tensorboard_logging", action="store_true",
                       help="write TensorBoard scalars and hyper-parameters into log_dir")
    group.add_argument("--log_all_workers", action="store_true",
                       help="every worker logs into worker_N subfolders of log_dir and model_dir")
    group.add_argument("--tf_verbosity", type=int, choices=(0, 1, 2, 3), default=None,
                       help="TensorFlow's C++ log level (TF_CPP_MIN_LOG_LEVEL); 0 also shows "
                            "Python tracebacks of errors")
    group.add_argument("--dump_config", default=None, metavar="DIR",
                       help="folder for debug traces of the compiled graphs")


def _add_unet3d_flags(parser):
    group = parser.add_argument_group("UNet3D on BraTS")
    group.add_argument("--fold", type=non_negative_int, default=0,
                       help="validation fold (default: %(default)s)")
    group.add_argument("--num_folds", type=positive_int, default=5,
                       help="number of cross-validation folds (default: %(default)s)")
    group.add_argument("--learning_rate", type=positive_float, default=0.0002,
                       help="Adam learning rate (default: %(default)s)")
    group.add_argument("--loss", choices=("dice", "ce", "dice+ce"), default="dice+ce",
                       help="training loss (default: %(default)s)")
    group.add_argument("--normalization", choices=("instancenorm", "batchnorm", "groupnorm", "none"),
                       default="instancenorm", help="normalization layer (default: %(default)s)")
    group.add_argument("--include_background", action="store_true",
                       help="keep class 0 in the loss and the metrics")
    group.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                       help="random flips and brightness during training (default: on)")
    group.add_argument("--synth_data", action="store_true",
                       help="deterministic synthetic data instead of data_dir")


def _add_precision_flags(parser):
    group = parser.add_argument_group("precision and devices")
    group.add_argument("--dtype", "-d", choices=("fp32", "bf16"), default="bf16",
                       help="compute precision (default: %(default)s)")
    group.add_argument("--bf16_config_path", default=DEFAULT_BF16_CONFIG,
                       help="mixed-precision config for bf16 (default: bf16_config/unet.json)")
    group.add_argument("--use_amp", "--amp", dest="use_amp", action="store_true",
                       help="float16 automatic mixed precision with loss scaling (GPU)")
    xla = group.add_mutually_exclusive_group()
    xla.add_argument("--use_xla", "--xla", dest="use_xla", action="store_true", default=None,
                     help="compile the step with XLA (default: on for GPU and HPU, off on CPU, "
                          "where XLA makes UNet3D training about ten times slower)")
    xla.add_argument("--no_xla", dest="use_xla", action="store_false",
                     help="do not compile with XLA")
    group.add_argument("--no_hpu", action="store_true", help="do not load the Habana modules")
    group.add_argument("--use_horovod", action="store_true",
                       help="data-parallel training with Horovod (must be installed)")
    # Accepted for compatibility with the reference launch scripts; they change nothing.
    group.add_argument("--num_workers_per_hls", type=int, default=1, help=argparse.SUPPRESS)
    group.add_argument("--hls_type", default="HLS1", help=argparse.SUPPRESS)
    group.add_argument("--kubernetes_run", default=False, help=argparse.SUPPRESS)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line: `main.py: error: <what> (see --help)`."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    """The argparse parser of main.py."""
    parser = Parser(
        prog="main.py",
        description="Train, evaluate and run 3-D segmentation networks (UNet3D on BraTS).")
    _add_run_flags(parser)
    _add_unet3d_flags(parser)
    _add_precision_flags(parser)
    return parser


def check_args(parser, args):
    """Cross-flag checks; a failure exits through `parser.error` with a one-line message."""
    if args.fold >= args.num_folds:
        parser.error(f"argument --fold: must be below --num_folds ({args.num_folds}), "
                     f"got {args.fold}")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        parser.error(f"argument --data_dir: {args.data_dir} is not a folder")
    if args.bf16_config_path and args.dtype == "bf16" and not os.path.isfile(args.bf16_config_path):
        parser.error(f"argument --bf16_config_path: {args.bf16_config_path} does not exist")
    return args


def parse_args(argv=None):
    """Parse and check the command line (sys.argv[1:] when argv is None)."""
    parser = build_parser()
    return check_args(parser, parser.parse_args(argv))
