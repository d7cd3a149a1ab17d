"""The run's settings: frozen sections with the reference's defaults, and every cross-flag check.

The field defaults below (and MODEL_DEFAULTS, where V-Net's differ) are the one place a flag's
default is written: the command line leaves a flag it was not given as None, and its --help
states the default from here (`flag_defaults`).

`resolve(flags, ...)` turns the parsed command line (a plain dict of flag values, None where a
flag was left out) into one frozen `Settings`; nothing changes it afterwards. A problem is a
`FlagError` whose text names the flag; the command line reports it as a one-line error.

The network-defining fields (`NETWORK_FIELDS`) of a model_dir's saved settings bind: a flag that
repeats one may be left out, one that contradicts it is an error (runtime/run_record.py reads them).
"""
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BF16_CONFIG = os.path.join(HERE, "bf16_config", "unet.json")

EXEC_MODES = ("train", "evaluate", "train_and_evaluate", "predict", "train_and_predict", "export")
TRAINS = ("train", "train_and_evaluate", "train_and_predict")
EVALUATES = ("evaluate", "train_and_evaluate")
PREDICTS = ("predict", "train_and_predict")
MODELS = ("unet3d", "vnet")
# V-Net's --gradient_clipping: the reference's global_norm clips a copy of the gradients that it
# never applies, so global_norm and none train unclipped; applied_global_norm clips what is applied.
GRADIENT_CLIPPING = ("global_norm", "none", "applied_global_norm")


class FlagError(ValueError):
    """A flag, or a combination of flags, the tool cannot run with; the text names the flag."""


@dataclass(frozen=True)
class RunSettings:
    """What to do and where: the mode, the folders, checkpoints, logging and benchmarking."""
    model: str = "unet3d"
    exec_mode: str = "train_and_evaluate"
    model_dirs: tuple = ("./results",)
    output_dir: Optional[str] = None
    export_dir: Optional[str] = None
    log_dir: str = "/tmp/unet3d_logs"
    resume_training: bool = False
    disable_ckpt_saving: bool = False
    ckpt_every: int = 1000
    save_nifti: bool = False
    save_png: bool = False
    eval_every: int = 0
    benchmark: bool = False
    warmup_steps: int = 40
    log_every: int = 100
    tensorboard_logging: bool = False
    log_all_workers: bool = False
    tf_verbosity: Optional[int] = None
    dump_config: Optional[str] = None

    @property
    def model_dir(self) -> str:
        """The folder training writes into (the first of an ensemble)."""
        return self.model_dirs[0]

    @property
    def trains(self) -> bool:
        """Whether this mode trains."""
        return self.exec_mode in TRAINS

    @property
    def evaluates(self) -> bool:
        """Whether this mode evaluates."""
        return self.exec_mode in EVALUATES

    @property
    def predicts(self) -> bool:
        """Whether this mode predicts."""
        return self.exec_mode in PREDICTS

    @property
    def exports(self) -> bool:
        """Whether this mode exports the trained model (runtime/loops/export.py)."""
        return self.exec_mode == "export"


@dataclass(frozen=True)
class DataSettings:
    """Where the data comes from and how training batches are drawn."""
    data_dir: Optional[str] = None
    batch_size: int = 2
    seed: Optional[int] = None
    augment: bool = True
    synth_data: bool = False


@dataclass(frozen=True)
class InferenceSettings:
    """How evaluate and predict see a volume: the centred window, or sliding windows, mirroring;
    what they score and write, and the postprocessing of their masks (a model_dir's
    postprocessing.json, or its choice on the validation cases)."""
    sliding_window: bool = False
    overlap: float = 0.5
    sw_batch_size: int = 2
    tta: bool = False
    save_probabilities: bool = False
    challenge_metrics: bool = False
    choose_postprocessing: bool = False
    # metrics.csv score columns, their mean (runtime/loops/postprocessing_choice.py's DEFAULT_CRITERION)
    postprocessing_criterion: str = "dice,lesion_f1"
    no_postprocessing: bool = False


@dataclass(frozen=True)
class PrecisionSettings:
    """Backend, precision and devices as asked for (runtime/setup/machine.py resolves what is left open)."""
    backend: str = "tensorflow"
    dtype: Optional[str] = None  # None: bf16 where the device runs it natively, else fp32
    use_amp: bool = False
    use_xla: Optional[bool] = None  # None: on with a GPU, off on CPU and HPU; always on with jax
    conv_kernel: str = "auto"
    no_hpu: bool = False
    bf16_config_path: str = DEFAULT_BF16_CONFIG
    bf16_config_explicit: bool = False
    use_horovod: bool = False


@dataclass(frozen=True)
class ProcessSettings:
    """Several JAX processes started by hand (mpirun and srun need none of these)."""
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None


@dataclass(frozen=True)
class UNet3DSettings:
    """UNet3D on BraTS: the network, its loss and optimizer, the folds and the steps. The label
    `convention` of the data (dataset/conventions.py) and the input channels and output classes
    it fixes come from the records folder's records.json (the phantom's: brats2021, 4, 4)."""
    max_steps: int = 16000
    fold: int = 0
    num_folds: int = 5
    learning_rate: float = 0.0002
    loss: str = "dice+ce"
    normalization: str = "instancenorm"
    include_background: bool = False
    in_channels: int = 4
    n_classes: int = 4
    convention: str = "brats2021"

    NETWORK_FIELDS = ("normalization", "in_channels", "n_classes", "include_background",
                      "convention")


@dataclass(frozen=True)
class VNetSettings:
    """V-Net on an MSD task: resampling, the network, its optimizer and the epochs."""
    data_normalization: str = "zscore"
    activation: str = "relu"
    resize_interpolator: str = "linear"
    normalization_layer: str = "batchnorm"
    pooling: str = "conv_pool"
    upsampling: str = "transposed_conv"
    input_shape: tuple = (32, 32, 32)
    downscale_blocks: tuple = (3, 3, 3)
    upscale_blocks: tuple = (3, 3)
    convolution_size: int = 3
    train_epochs: int = 1
    optimizer: str = "rmsprop"
    gradient_clipping: str = "global_norm"
    base_lr: float = 0.0001
    momentum: float = 0.0
    train_split: float = 1.0
    split_seed: int = 0
    loss: str = "dice"

    NETWORK_FIELDS = ("data_normalization", "activation", "resize_interpolator", "normalization_layer",
                      "pooling", "upsampling", "input_shape", "downscale_blocks", "upscale_blocks",
                      "convolution_size")


NETWORK_SECTIONS = {"unet3d": UNet3DSettings, "vnet": VNetSettings}
# The sections every run has; each network adds its own (NETWORK_SECTIONS).
RUN_SECTIONS = (RunSettings, DataSettings, InferenceSettings, PrecisionSettings, ProcessSettings)
# Where a network's default differs from the field default of the run's sections (UNet3D's).
MODEL_DEFAULTS = {"vnet": {"batch_size": 8, "seed": 0, "log_every": 10, "warmup_steps": 200,
                           "augment": False, "dtype": "fp32"}}


@dataclass(frozen=True)
class Settings:
    """Every section of one run; `network` is the UNet3DSettings or VNetSettings of `run.model`."""
    run: RunSettings = field(default_factory=RunSettings)
    data: DataSettings = field(default_factory=DataSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    precision: PrecisionSettings = field(default_factory=PrecisionSettings)
    processes: ProcessSettings = field(default_factory=ProcessSettings)
    network: object = field(default_factory=UNet3DSettings)

    def network_fields(self) -> Dict[str, Any]:
        """{name: value} of what defines the network's function, the model's name included."""
        values = {"model": self.run.model}
        for name in type(self.network).NETWORK_FIELDS:
            value = getattr(self.network, name)
            values[name] = list(value) if isinstance(value, tuple) else value
        return values


def default_value(name: str, model: str) -> Any:
    """The value setting `name` takes with --model `model` when its flag is left out: `model`'s
    entry in MODEL_DEFAULTS, else the field default of the section that holds it (a run section
    or `model`'s network section). A KeyError when none of them has the field."""
    overrides = MODEL_DEFAULTS.get(model, {})
    if name in overrides:
        return overrides[name]
    for section in RUN_SECTIONS + (NETWORK_SECTIONS[model],):
        for found in dataclasses.fields(section):
            if found.name == name:
                if found.default_factory is not dataclasses.MISSING:
                    return found.default_factory()
                return found.default
    raise KeyError(name)


def flag_defaults(name: str) -> Dict[str, Any]:
    """{model: default_value(name, model)} for each model that has the setting `name` (both for a
    setting of the run's sections, one for a field of one network's section); {} for a name that is
    no setting. The command line's help states a flag's default from these."""
    values = {}
    for model in MODELS:
        try:
            values[model] = default_value(name, model)
        except KeyError:
            pass
    return values


def _own_fields(section: type) -> List[str]:
    """The field names of a settings dataclass."""
    return [f.name for f in dataclasses.fields(section)]


def _section(cls: type, flags: Dict[str, Any], **extra: Any) -> Any:
    """An instance of `cls` from the flags that are set (None: the dataclass default)."""
    values = {name: flags[name] for name in _own_fields(cls) if flags.get(name) is not None}
    values.update(extra)
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = tuple(value)
    return cls(**values)


def _bind(flags: Dict[str, Any], saved: Dict[str, Any], model_dir: str) -> None:
    """Fill the network-defining flags left out from `saved`; a contradicting flag is an error.
    What the data fixed rather than a flag (V-Net's n_classes, from dataset.json) does not bind."""
    section = NETWORK_SECTIONS.get(saved.get("model"))
    for name, value in saved.items():
        if section is not None and name != "model" and name not in section.NETWORK_FIELDS:
            continue
        given = flags.get(name)
        if isinstance(given, (list, tuple)):
            given = list(given)
        if given is None:
            flags[name] = value
        elif given != value:
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            given_shown = " ".join(map(str, given)) if isinstance(given, list) else given
            raise FlagError(f"argument --{name}: {given_shown} contradicts {shown}, with which "
                            f"{model_dir} was trained (its settings.json); leave the flag out or "
                            "choose another --model_dir")


def _bind_data(flags: Dict[str, Any], records: Dict[str, Any],
               saved: Optional[Tuple[str, Dict[str, Any]]], phantom: bool) -> None:
    """Fill the fields the data fixes (convention, in_channels, n_classes) from `records` (what
    --data_dir's records.json says, or with `phantom` the built-in phantom's); data that a saved
    network was not built for is an error."""
    if saved is not None:
        model_dir, network = saved
        # settings.json of runs before conventions existed hold no convention: brats2021's
        known = {"convention": UNet3DSettings.convention} | network
        differs = [name for name in records if known.get(name, records[name]) != records[name]]
        if differs:
            shown = ", ".join(f"{name} {records[name]}" for name in differs)
            trained = ", ".join(f"{name} {known.get(name)}" for name in differs)
            whose = "left out, the built-in phantom's" if phantom else "its"
            raise FlagError(f"argument --data_dir: {whose} records ({shown}) do not fit the network "
                            f"{model_dir} was trained for ({trained}, its settings.json); choose "
                            "records of that dataset or another --model_dir")
    for name, value in records.items():
        if flags.get(name) is None:
            flags[name] = value


def resolve(flags: Dict[str, Any], environ: Optional[Mapping[str, str]] = None,
            launcher: Optional[str] = None, saved: Optional[Tuple[str, Dict[str, Any]]] = None,
            records: Optional[Dict[str, Any]] = None, phantom: bool = False) -> Settings:
    """The frozen Settings of a parsed command line.

    `flags`: {flag name: value or None}; `environ`: where KERAS_BACKEND and the JAX_* process
    variables are read (default os.environ); `launcher`: 'mpi', 'slurm', 'tf_config' or None;
    `saved`: (model_dir, network fields) of a model_dir trained before, which bind; `records`:
    the network fields the training data fixes ({convention, in_channels, n_classes}: those of
    --data_dir's records, or with `phantom` those of the built-in phantom that a run without
    --data_dir uses), or None. A FlagError names the flag.
    """
    flags = dict(flags)
    environ = os.environ if environ is None else environ
    dirs = flags.get("model_dirs") or list(RunSettings.model_dirs)
    flags["model_dirs"] = [dirs] if isinstance(dirs, str) else list(dirs)
    exec_mode = flags.get("exec_mode") or RunSettings.exec_mode
    if len(flags["model_dirs"]) > 1 and exec_mode in TRAINS:
        raise FlagError(f"argument --model_dir: --exec_mode {exec_mode} trains into one folder, got "
                        f"{len(flags['model_dirs'])}; several (an ensemble) are for evaluate and "
                        "predict")
    saved_model = saved[1].get("model") if saved is not None else None
    if records is not None and (flags.get("model") or saved_model or RunSettings.model) \
            == "unet3d":
        _bind_data(flags, records, saved, phantom)
    if saved is not None:
        _bind(flags, saved[1], saved[0])
    model = flags.get("model") or RunSettings.model
    flags["model"] = model
    _check_model_flags(flags, model)
    for name, value in MODEL_DEFAULTS.get(model, {}).items():
        if flags.get(name) is None:
            flags[name] = value
    backend = flags.get("backend") or environ.get("KERAS_BACKEND") or PrecisionSettings.backend
    if backend not in ("tensorflow", "jax"):
        raise FlagError(f"KERAS_BACKEND={backend}: this tool runs on tensorflow or jax")
    if exec_mode == "export":
        if flags.get("backend") == "jax":
            raise FlagError("argument --backend: --exec_mode export writes TensorFlow's SavedModel "
                            "and runs on tensorflow (checkpoints of either backend load); leave it out")
        backend = "tensorflow"  # the checkpoints are the same on both backends
    flags["backend"] = backend
    _check_backend(flags)
    _fill_processes(flags, environ, launcher)
    bf16_explicit = flags.get("bf16_config_path") is not None
    settings = Settings(
        run=_section(RunSettings, flags),
        data=_section(DataSettings, flags),
        inference=_section(InferenceSettings, flags),
        precision=_section(PrecisionSettings, flags, bf16_config_explicit=bf16_explicit),
        processes=_section(ProcessSettings, flags),
        network=_section(NETWORK_SECTIONS[model], flags))
    check(settings)
    return settings


def _check_model_flags(flags: Dict[str, Any], model: str) -> None:
    """No flag of the other network's section; V-Net trains with the dice loss only."""
    other = "vnet" if model == "unet3d" else "unet3d"
    own = set(_own_fields(NETWORK_SECTIONS[model]))
    for name in _own_fields(NETWORK_SECTIONS[other]):
        if name not in own and flags.get(name) is not None:
            raise FlagError(f"argument --{name}: belongs to --model {other}, not {model}")
    if model == "vnet" and flags.get("loss") not in (None, "dice"):
        raise FlagError(f"argument --loss: vnet trains with the dice loss, got {flags['loss']}")


def _check_backend(flags: Dict[str, Any]) -> None:
    """Horovod and AMP are TensorFlow's; the JAX process flags are JAX's."""
    if flags["backend"] == "jax":
        for name in ("use_horovod", "use_amp"):
            if flags.get(name):
                raise FlagError(f"argument --{name}: needs --backend tensorflow (on jax use --dtype "
                                "bf16; several processes join through jax.distributed)")
        return
    for name in ProcessSettings.__dataclass_fields__:
        if flags.get(name) is not None:
            raise FlagError(f"argument --{name}: needs --backend jax (TensorFlow workers come from "
                            "mpirun, srun or TF_CONFIG)")


JAX_PROCESS_VARIABLES = {"coordinator_address": "JAX_COORDINATOR_ADDRESS",
                         "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}


def _fill_processes(flags: Dict[str, Any], environ: Mapping[str, str],
                    launcher: Optional[str]) -> None:
    """The three flags of several JAX processes, filled in from JAX_* variables and checked."""
    if flags["backend"] != "jax":
        return
    for name, variable in JAX_PROCESS_VARIABLES.items():
        text = environ.get(variable)
        if flags.get(name) is not None or not text:
            continue
        if name == "coordinator_address":
            flags[name] = text
            continue
        lowest = 1 if name == "num_processes" else 0
        if not text.isdigit() or int(text) < lowest:
            raise FlagError(f"{variable}={text}: must be an integer of at least {lowest}")
        flags[name] = int(text)
    address, count, index = (flags.get(n) for n in JAX_PROCESS_VARIABLES)
    if address is not None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise FlagError(f"argument --coordinator_address: HOST:PORT of process 0, got {address}")
    if count is not None and index is not None and index >= count:
        raise FlagError(f"argument --process_id: must be below --num_processes ({count}), got {index}")
    if launcher in ("mpi", "slurm"):
        return  # JAX detects what is not given
    given = [f"--{n}" for n in JAX_PROCESS_VARIABLES if flags.get(n) is not None]
    if given and len(given) < len(JAX_PROCESS_VARIABLES):
        missing = [f"--{n}" for n in JAX_PROCESS_VARIABLES if flags.get(n) is None]
        raise FlagError(f"argument {given[0]}: needs {' and '.join(missing)} too (outside mpirun "
                        "and srun)")


def _check_outputs(settings: Settings) -> None:
    """The challenge's metrics, pictures and evaluation during training."""
    run, inference = settings.run, settings.inference
    if inference.challenge_metrics:
        if run.model == "vnet":
            raise FlagError("argument --challenge_metrics: the BraTS metrics are for --model unet3d")
        if not run.evaluates:
            raise FlagError("argument --challenge_metrics: computed by --exec_mode evaluate or "
                            f"train_and_evaluate, not {run.exec_mode}")
        if not inference.sliding_window:
            raise FlagError("argument --challenge_metrics: the lesion-wise metrics need whole "
                            "volumes; add --sliding_window")
    _check_postprocessing(settings)
    if run.save_png and run.exec_mode == "train":
        raise FlagError("argument --save_png: pictures are of evaluate and predict; use "
                        "--exec_mode train_and_evaluate, evaluate or predict")
    if run.eval_every:
        if not run.trains:
            raise FlagError(f"argument --eval_every: evaluates during training, and --exec_mode "
                            f"{run.exec_mode} does not train")
        if run.benchmark:
            raise FlagError("argument --eval_every: leave it out with --benchmark (evaluations "
                            "would be timed as training steps)")


def _check_postprocessing(settings: Settings) -> None:
    """--choose_postprocessing scores the validation cases with the challenge's metrics by a
    criterion of metrics.csv's columns; --postprocessing_criterion is for it alone."""
    run, inference, data = settings.run, settings.inference, settings.data
    criterion = inference.postprocessing_criterion
    if not inference.choose_postprocessing:
        if criterion != InferenceSettings.postprocessing_criterion:
            raise FlagError("argument --postprocessing_criterion: only --choose_postprocessing "
                            "uses it; add that flag or leave this one out")
        return
    if not inference.challenge_metrics:
        raise FlagError("argument --choose_postprocessing: it scores the candidates on the "
                        "validation cases with the challenge's metrics; add --challenge_metrics "
                        "(with --sliding_window, --exec_mode evaluate or train_and_evaluate)")
    if data.synth_data:
        raise FlagError("argument --choose_postprocessing: synthetic data has no validation cases "
                        "to choose on; leave out --synth_data")
    if inference.no_postprocessing:
        raise FlagError("argument --no_postprocessing: --choose_postprocessing already scores the "
                        "masks before any postprocessing; leave one of them out")
    from runtime.loops.postprocessing_choice import criterion_columns
    try:
        criterion_columns(criterion)
    except ValueError as err:
        raise FlagError(f"argument --postprocessing_criterion: {err}") from None


def check(settings: Settings) -> None:
    """Every check of flags together (the checks between sections), run by `resolve` on the
    Settings it builds; a FlagError names the flag."""
    run, data, net = settings.run, settings.data, settings.network
    if settings.inference.sliding_window and run.model == "vnet":
        raise FlagError("argument --sliding_window: V-Net's inputs are resampled whole onto "
                        "--input_shape; leave it out for --model vnet (--tta works for both)")
    _check_outputs(settings)
    if run.model == "unet3d" and net.fold >= net.num_folds:
        raise FlagError(f"argument --fold: must be below --num_folds ({net.num_folds}), got "
                        f"{net.fold}")
    if run.model == "vnet":
        if not 0.0 < net.train_split <= 1.0:
            raise FlagError(f"argument --train_split: must be in (0, 1], got {net.train_split}")
        if len(net.upscale_blocks) != len(net.downscale_blocks) - 1:
            raise FlagError("argument --upscale_blocks: needs one block fewer than "
                            f"--downscale_blocks ({len(net.downscale_blocks)}), got "
                            f"{len(net.upscale_blocks)}")
        if data.synth_data:
            raise FlagError("argument --synth_data: synthetic data is for --model unet3d only")
    if data.synth_data and run.save_nifti:
        raise FlagError("argument --save_nifti: synthetic test images have no case grid to write "
                        "onto; leave out --save_nifti or --synth_data")
    _check_export(run)
    if data.data_dir is not None and not os.path.isdir(data.data_dir):
        raise FlagError(f"argument --data_dir: {data.data_dir} is not a folder")
    precision = settings.precision
    if precision.bf16_config_explicit and not os.path.isfile(precision.bf16_config_path):
        raise FlagError(f"argument --bf16_config_path: {precision.bf16_config_path} does not exist")


def _check_export(run: RunSettings) -> None:
    """--export_dir goes with --exec_mode export, and names a folder without files in it."""
    if not run.exports:
        if run.export_dir is not None:
            raise FlagError("argument --export_dir: only --exec_mode export writes there")
        return
    if run.export_dir is None:
        raise FlagError("argument --export_dir: --exec_mode export needs the folder to write the "
                        "SavedModel, model.onnx and metadata.json into")
    if len(run.model_dirs) > 1:
        raise FlagError(f"argument --model_dir: export takes one trained folder, got "
                        f"{len(run.model_dirs)}")
    if os.path.exists(run.export_dir) and (not os.path.isdir(run.export_dir)
                                           or os.listdir(run.export_dir)):
        raise FlagError(f"argument --export_dir: {run.export_dir} already holds files; export "
                        "into a new or empty folder (nothing there is overwritten)")
