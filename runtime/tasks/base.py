"""What every network's task offers the run, and `make_task`.

A task holds what differs between the networks: its data, model, optimizer, loss and metrics,
how many steps it trains, and how its masks are named and written. It receives its own settings
section, the data settings and the resolved Machine, and nothing else.
"""


class Task:
    """The settings of one network (`net`), the data settings (`data_settings`) and the Machine;
    where the HPU (if any) wants prefetching and its instance norm."""

    def __init__(self, net, data_settings, machine):
        self.net, self.data_settings, self.machine = net, data_settings, machine
        hpu = machine.hpu if machine is not None else None
        self.prefetch_device = hpu.device if hpu else None
        self.instance_norm = hpu.instance_norm_layer if hpu else None

    @property
    def seed(self):
        """The run's seed (agreed between processes), or the data settings' one without a machine."""
        return self.machine.seed if self.machine is not None else self.data_settings.seed

    def finish_train_batch(self):
        """The device half of the training transform, or None when the pipeline ships finished
        batches."""
        return None


def make_task(model, net, data_settings, machine=None):
    """The task of `model` ('unet3d' or 'vnet') for its settings section `net`."""
    if model == "unet3d":
        from runtime.tasks.unet3d import UNet3DTask
        return UNet3DTask(net, data_settings, machine)
    from runtime.tasks.vnet import VNetTask
    return VNetTask(net, data_settings, machine)
