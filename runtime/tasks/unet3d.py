"""UNet3D on BraTS TFRecords (or the phantom BraTS data, or synthetic data)."""
from runtime.tasks.base import Task

GPU_CHANNEL_MULTIPLE = 8  # cuDNN's fast 3-D convolution kernels want 8 or more input channels


class UNet3DTask(Task):
    """UNet3D's data, model, Adam, dice/ce loss, per-class dice and BraTS masks."""

    def data(self, worker_id=0, num_workers=1, batch_size=None, need_eval=True, need_test=True,
             local_streams=1):
        """The BraTS pipelines of this process, in batches of `batch_size` (default --batch_size):
        its training batch joins the input streams worker_id .. worker_id + local_streams - 1 of
        num_workers (one per device). Its validation records serve evaluation and prediction
        alike, so `need_eval` and `need_test` change nothing here."""
        d, net = self.data_settings, self.net
        batch_size = batch_size or d.batch_size
        backend = self.machine.backend if self.machine is not None else "tensorflow"
        if d.synth_data and backend == "jax":  # NumPy batches: no TensorFlow needed
            from dataset.synthetic import SyntheticData
            return SyntheticData(batch_size, seed=self.seed, augment=d.augment)
        from dataset.data_loader import BratsData, SyntheticTFData
        if d.synth_data:
            return SyntheticTFData(batch_size, seed=self.seed, augment=d.augment,
                                   prefetch_device=self.prefetch_device)
        data_dir = d.data_dir
        if data_dir is None:
            from runtime.tasks.demo_data import phantom_brats
            data_dir = phantom_brats()
        # runtime/settings.py took the network's convention, channels and classes from these
        # records (or refused a saved network they do not fit)
        return BratsData(data_dir, batch_size, fold=net.fold, num_folds=net.num_folds, seed=self.seed,
                         augment=d.augment, worker_id=worker_id, num_workers=num_workers,
                         local_streams=local_streams, prefetch_device=self.prefetch_device)

    def model(self, data=None):
        """The reference's UNet3D (model/layers.py and model/model_fn.py there); on a GPU its image convolution pads the input channels to 8, and
        on a Hopper GPU under JAX its small convolutions run on the tool's kernel."""
        from model.unet3d import build_unet3d
        conv_implementation, multiple = None, None
        if self.machine is not None:
            from runtime.engines.kernels import conv_implementation as choose
            conv_implementation = choose(self.machine)
            multiple = GPU_CHANNEL_MULTIPLE if self.machine.gpu else None
        return build_unet3d(in_channels=self.net.in_channels, n_classes=self.net.n_classes,
                            normalization=self.net.normalization, seed=self.seed,
                            instance_norm=self.instance_norm, image_channel_multiple=multiple,
                            conv_implementation=conv_implementation)

    def optimizer(self):
        """TF1's Adam at learning_rate (ε 1e-8), as the reference."""
        from model.optimizers import make_optimizer
        return make_optimizer("adam", self.net.learning_rate)

    def optimizer_record(self):
        """The optimizer's name, ε and update rule, for the saved run settings."""
        from model.optimizers import optimizer_record
        return optimizer_record("adam")

    def convention(self):
        """The LabelConvention of the network's classes."""
        from dataset.conventions import CONVENTIONS
        return CONVENTIONS[self.net.convention]

    def finish_train_batch(self):
        """The device half of the training transform (one-hot over the network's classes): every
        BraTS pipeline ships compact batches."""
        import functools

        from dataset.device_transform import finish_train_batch
        return functools.partial(finish_train_batch, n_classes=self.net.n_classes)

    def loss_and_metrics(self, data):
        """(loss_fn, metrics_fn) as the reference's model/losses.py; the per-class dice is named as the reference names
        it for brats2021 data, by the convention's class names otherwise."""
        from dataset.conventions import DEFAULT_CONVENTION
        from model.losses import eval_dice_per_sample, get_loss
        include = self.net.include_background
        names = None if self.net.convention == DEFAULT_CONVENTION else self.convention().names[1:]
        return (get_loss(self.net.loss, include),
                lambda y, p: eval_dice_per_sample(y, p, include, names))

    def last_step(self, data, num_replicas, warmup_steps=None):
        """max_steps, divided among the devices unless benchmarking (`warmup_steps` given)."""
        if warmup_steps is not None:
            return self.net.max_steps
        return max(1, self.net.max_steps // num_replicas)

    def mask_names(self, data, count):
        """vol_<i> for each of the `count` prediction volumes."""
        return [f"vol_{i}" for i in range(count)]

    def nifti_writer(self, data, out_dir):
        """Masks as <case>.nii.gz in the source's label values on the case's grid."""
        from runtime.tasks.masks import brats_nifti_writer
        return brats_nifti_writer(out_dir, data.eval_records, self.convention())
