"""The loops of every mode, their hooks, checkpoints and whole-volume inference."""
