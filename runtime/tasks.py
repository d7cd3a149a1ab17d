"""What differs between the two networks: data, model, optimizer, loss, metrics, steps and outputs.

`make_task(args)` returns a UNet3DTask or a VNetTask; runtime/run.py drives either the same way.
"""
import math
import os

from common.errors import UserError

GPU_CHANNEL_MULTIPLE = 8  # cuDNN's fast 3-D convolution kernels want 8 or more input channels


def gpu_visible(backend):
    """Whether `backend` ("jax" or "tensorflow") computes on a GPU."""
    if backend == "jax":
        import jax
        return jax.default_backend() == "gpu"
    from common.quiet_import import import_tensorflow
    return bool(import_tensorflow().config.list_logical_devices("GPU"))


def conv_implementation(args):
    """What computes UNet3D's 3×3×3 convolutions besides Keras: with --conv_kernel auto, bf16 and the
    JAX backend on one Hopper GPU, runtime/mosaic_conv.py's kernel (with a one-line notice); else
    None, Keras's convolution everywhere."""
    if args.conv_kernel != "auto" or args.backend != "jax" or args.dtype != "bf16":
        return None
    try:
        from runtime.mosaic_conv import hopper_convolution
    except ImportError:  # a JAX without Pallas' Mosaic GPU backend
        return None
    implementation = hopper_convolution()
    if implementation is not None:
        print("--conv_kernel auto: the bf16 3×3×3 convolutions of up to 32 channels run on the tool's "
              "Mosaic GPU kernel (--conv_kernel keras for XLA's)", flush=True)
    return implementation


class Task:
    """The flags of the run, and where the HPU (if any) wants prefetching and instance norm."""

    def __init__(self, args, hpu=None):
        self.args = args
        self.prefetch_device = hpu.device if hpu else None
        self.instance_norm = hpu.instance_norm_layer if hpu else None


class UNet3DTask(Task):
    """UNet3D on BraTS TFRecords (or the phantom BraTS data, or synthetic data)."""

    def __init__(self, args, hpu=None):
        super().__init__(args, hpu)
        if args.synth_data and args.save_nifti:
            raise UserError("--save_nifti: synthetic test images have no case grid to write onto; "
                            "leave out --save_nifti or --synth_data")

    def data(self, worker_id=0, num_workers=1, batch_size=None):
        """The BraTS pipelines of this worker, in batches of `batch_size` (default --batch_size)."""
        a = self.args
        batch_size = batch_size or a.batch_size
        if a.synth_data and a.backend == "jax":  # NumPy batches: no TensorFlow needed
            from dataset.synthetic import SyntheticData
            return SyntheticData(batch_size, seed=a.seed, augment=a.augment)
        from dataset.data_loader import BratsData, SyntheticTFData
        if a.synth_data:
            return SyntheticTFData(batch_size, seed=a.seed, augment=a.augment,
                                   prefetch_device=self.prefetch_device)
        data_dir = a.data_dir
        if data_dir is None:
            from runtime.demo_data import phantom_brats
            data_dir = phantom_brats()
        return BratsData(data_dir, batch_size, fold=a.fold, num_folds=a.num_folds, seed=a.seed,
                         augment=a.augment, worker_id=worker_id, num_workers=num_workers,
                         prefetch_device=self.prefetch_device)

    def model(self, data):
        """The UNet3D of SPEC §1.4; on a GPU its image convolution pads the 4 channels to 8, and on a
        Hopper GPU under JAX its small convolutions run on the tool's kernel (conv_implementation)."""
        from model.unet3d import build_unet3d
        multiple = GPU_CHANNEL_MULTIPLE if gpu_visible(self.args.backend) else None
        return build_unet3d(in_channels=4, normalization=self.args.normalization, seed=self.args.seed,
                            instance_norm=self.instance_norm, image_channel_multiple=multiple,
                            conv_implementation=conv_implementation(self.args))

    def optimizer(self):
        """Adam(learning_rate)."""
        import keras
        return keras.optimizers.Adam(self.args.learning_rate)

    def finish_train_batch(self):
        """The device half of the training transform: every BraTS pipeline ships compact batches."""
        from dataset.device_transform import finish_train_batch
        return finish_train_batch

    def loss_and_metrics(self, data):
        """(loss_fn, metrics_fn) of SPEC §1.5."""
        from model.losses import eval_dice_per_sample, get_loss
        include = self.args.include_background
        return get_loss(self.args.loss, include), lambda y, p: eval_dice_per_sample(y, p, include)

    def last_step(self, data, num_workers):
        """max_steps, divided among the workers unless benchmarking."""
        if self.args.benchmark:
            return self.args.max_steps
        return max(1, self.args.max_steps // num_workers)

    def mask_names(self, data, whole=False):
        """vol_<i> for the i-th prediction volume (a validation volume, or a synthetic test image;
        `whole`: the whole volumes, of which synthetic data has one)."""
        return [f"vol_{i}" for i in range(data.n_eval if whole else data.n_test)]

    def nifti_writer(self, data, out_dir):
        """Masks as <case>.nii.gz in BraTS labels on the case's grid."""
        from runtime.masks import nifti_writer
        return nifti_writer(out_dir, data.eval_records)


class VNetTask(Task):
    """V-Net on an MSD task folder (or the phantom hippocampus data)."""

    def __init__(self, args, hpu=None):
        super().__init__(args, hpu)
        if args.synth_data:
            raise UserError("--synth_data: synthetic data is for --model unet3d only")

    def data(self, worker_id=0, num_workers=1, batch_size=None):
        """The MSD pipelines of this worker, in batches of `batch_size` (default --batch_size)."""
        from dataset.msd_loader import MsdData
        a = self.args
        batch_size = batch_size or a.batch_size
        data_dir = a.data_dir
        if data_dir is None:
            from runtime.demo_data import phantom_msd
            data_dir = phantom_msd()
        return MsdData(data_dir, a.input_shape, batch_size, train_split=a.train_split, seed=a.seed,
                       augment=a.augment, interpolator=a.resize_interpolator,
                       data_normalization=a.data_normalization, worker_id=worker_id,
                       num_workers=num_workers, prefetch_device=self.prefetch_device,
                       need_eval=a.exec_mode in ("evaluate", "train_and_evaluate"),
                       need_test=a.exec_mode in ("predict", "train_and_predict"))

    def model(self, data):
        """The V-Net of SPEC §2.3 for the task's classes."""
        from model.vnet import VNetConfig, build_vnet
        a = self.args
        config = VNetConfig(n_classes=data.n_classes, downscale_blocks=a.downscale_blocks,
                            upscale_blocks=a.upscale_blocks, convolution_size=a.convolution_size,
                            normalization=a.normalization_layer, activation=a.activation,
                            pooling=a.pooling, upsampling=a.upsampling)
        return build_vnet(tuple(a.input_shape) + (1,), config, seed=a.seed,
                          instance_norm=self.instance_norm)

    def optimizer(self):
        """Centered RMSprop (or Adam, SGD) at base_lr, gradients clipped to a global norm of 1."""
        import keras
        a = self.args
        clip = 1.0 if a.gradient_clipping == "global_norm" else None
        if a.optimizer == "rmsprop":
            return keras.optimizers.RMSprop(a.base_lr, momentum=a.momentum, centered=True,
                                            global_clipnorm=clip)
        if a.optimizer == "adam":
            return keras.optimizers.Adam(a.base_lr, global_clipnorm=clip)
        return keras.optimizers.SGD(a.base_lr, momentum=a.momentum, global_clipnorm=clip)

    def finish_train_batch(self):
        """None: the MSD pipelines ship finished batches."""
        return None

    def loss_and_metrics(self, data):
        """(the dice loss over every class, soft and hard dice per label)."""
        from model.losses import vnet_dice_loss, vnet_metrics
        return vnet_dice_loss, vnet_metrics(data.label_names)

    def last_step(self, data, num_workers):
        """⌈n_train / (batch · workers)⌉ · train_epochs; 2 · warmup_steps when benchmarking."""
        if self.args.benchmark:
            return 2 * self.args.warmup_steps
        return math.ceil(data.n_train / (self.args.batch_size * num_workers)) * self.args.train_epochs

    def mask_names(self, data, whole=False):
        """The test images' names (V-Net has no whole-volume inputs besides them)."""
        return data.test_names

    def nifti_writer(self, data, out_dir):
        """Masks resampled back onto each test image's own grid, as <name>.nii.gz."""
        import SimpleITK as sitk

        from dataset.msd import mask_to_source_grid
        os.makedirs(out_dir, exist_ok=True)

        def write(index, mask):
            image = mask_to_source_grid(mask, data.test_paths[index])
            sitk.WriteImage(image, os.path.join(out_dir, f"{data.test_names[index]}.nii.gz"))

        return write


def make_task(args, hpu=None):
    """The task of `args.model`; `hpu` (an Hpu or None) places prefetching and instance norm."""
    return (UNet3DTask if args.model == "unet3d" else VNetTask)(args, hpu)
