"""V-Net on an MSD task folder (or the phantom hippocampus data)."""
import math

from runtime.tasks.base import Task


class VNetTask(Task):
    """V-Net's data, model, optimizer, dice loss, per-label dice and resampled masks."""

    def data(self, worker_id=0, num_workers=1, batch_size=None, need_eval=True, need_test=True,
             local_streams=1):
        """The MSD pipelines of this process, in batches of `batch_size` (default --batch_size):
        its training batch joins the input streams worker_id .. worker_id + local_streams - 1 of
        num_workers (one per device)."""
        from dataset.msd_loader import MsdData
        d, net = self.data_settings, self.net
        data_dir = d.data_dir
        if data_dir is None:
            from runtime.tasks.demo_data import phantom_msd
            data_dir = phantom_msd()
        return MsdData(data_dir, net.input_shape, batch_size or d.batch_size,
                       train_split=net.train_split, seed=self.seed, augment=d.augment,
                       interpolator=net.resize_interpolator, data_normalization=net.data_normalization,
                       worker_id=worker_id, num_workers=num_workers, local_streams=local_streams,
                       prefetch_device=self.prefetch_device, need_eval=need_eval, need_test=need_test)

    def model(self, data):
        """The reference's V-Net (model/vnet.py there) for the task's classes."""
        from model.vnet import VNetConfig, build_vnet
        net = self.net
        config = VNetConfig(n_classes=data.n_classes, downscale_blocks=net.downscale_blocks,
                            upscale_blocks=net.upscale_blocks, convolution_size=net.convolution_size,
                            normalization=net.normalization_layer, activation=net.activation,
                            pooling=net.pooling, upsampling=net.upsampling)
        return build_vnet(tuple(net.input_shape) + (1,), config, seed=self.seed,
                          instance_norm=self.instance_norm)

    def optimizer(self):
        """TF1's centered RMSProp (or Adam, SGD) at base_lr.

        The reference's `--gradient_clipping global_norm` clips a copy of the gradients that its
        `minimize` call never applies, so `global_norm` (the default) and `none` apply the
        gradients unclipped, as the reference trained; `applied_global_norm` clips the applied
        gradients to a global norm of 1, as the reference meant to.
        """
        from model.optimizers import make_optimizer
        net = self.net
        clip = 1.0 if net.gradient_clipping == "applied_global_norm" else None
        return make_optimizer(net.optimizer, net.base_lr, momentum=net.momentum, global_clipnorm=clip)

    def optimizer_record(self):
        """The optimizer's name, ε and update rule, for the saved run settings."""
        from model.optimizers import optimizer_record
        return optimizer_record(self.net.optimizer)

    def loss_and_metrics(self, data):
        """(the dice loss over every class, soft and hard dice per label)."""
        from model.losses import vnet_dice_loss, vnet_metrics
        return vnet_dice_loss, vnet_metrics(data.label_names)

    def last_step(self, data, num_replicas, warmup_steps=None):
        """⌈n_train / (batch · devices)⌉ · train_epochs; 2 · warmup_steps when benchmarking
        (`warmup_steps` given)."""
        if warmup_steps is not None:
            return 2 * warmup_steps
        return math.ceil(data.n_train / (self.data_settings.batch_size * num_replicas)) * self.net.train_epochs

    def mask_names(self, data, count):
        """The test images' names (all `count` of them)."""
        return data.test_names

    def nifti_writer(self, data, out_dir):
        """Masks resampled back onto each test image's own grid, as <name>.nii.gz."""
        from runtime.tasks.masks import msd_nifti_writer
        return msd_nifti_writer(out_dir, data.test_paths, data.test_names)
