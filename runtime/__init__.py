"""The run: its flags and settings (arguments.py, settings.py), the record kept beside the
checkpoints (run_record.py), the run itself (run.py), the cross-validation table
(parse_results.py), and one sub-package per job: setup/ (the machine), tasks/ (what differs
between the networks), loops/ (the loops of every mode and their hooks), engines/ (the backends'
compiled steps and their kernels)."""
