"""Setting a machine up for a run: devices, workers, precision, Habana, XLA."""
