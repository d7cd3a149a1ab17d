"""Command-line entry point: parse the flags into settings, then hand over to the run."""
import os
import sys
import traceback

from runtime.arguments import parse_args
from common.errors import UserError
from runtime.setup.xla_flags import prefer_channels_last_convolutions


def main(argv=None):
    """Run the tool with the given command line (sys.argv[1:] when None); returns the exit code."""
    try:
        settings = parse_args(argv)
    except UserError as err:
        print(f"main.py: error: {err}", file=sys.stderr)
        return 1
    os.environ["KERAS_BACKEND"] = settings.precision.backend  # before Keras is imported
    prefer_channels_last_convolutions()  # before XLA starts
    from runtime.loops.stopping import Stopped
    from runtime.setup.cluster import end_now_if_distributed
    from runtime.run import run
    try:
        run(settings)
    except Stopped as stop:  # every worker stopped after the same step: exit as usual
        print(f"main.py: {stop}", file=sys.stderr)
        return stop.code
    except (UserError, FloatingPointError) as err:
        if settings.run.tf_verbosity == 0:
            traceback.print_exc()
        else:
            print(f"main.py: error: {err}", file=sys.stderr)
        return end_now_if_distributed(1)
    except KeyboardInterrupt:  # Ctrl-C outside the loops (setting up): the status of SIGINT
        print("main.py: interrupted; continue later with --resume_training", file=sys.stderr)
        return end_now_if_distributed(130)
    except BaseException:  # a bug: its traceback, and no wait for other processes
        end_now_if_distributed(1, traceback.format_exc())
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
