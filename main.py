"""Command-line entry point: parse the flags, then hand over to the runtime."""
import os
import sys
import traceback

from runtime.arguments import parse_args
from common.errors import UserError
from runtime.xla_flags import prefer_channels_last_convolutions


def main(argv=None):
    """Run the tool with the given command line (sys.argv[1:] when None); returns the exit code."""
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend  # before Keras is imported
    prefer_channels_last_convolutions()  # before XLA starts
    from runtime.cluster import end_now_if_distributed
    from runtime.run import run
    try:
        run(args)
    except (UserError, FloatingPointError) as err:
        if args.tf_verbosity == 0:
            traceback.print_exc()
        else:
            print(f"main.py: error: {err}", file=sys.stderr)
        return end_now_if_distributed(1)
    except KeyboardInterrupt:
        print("main.py: interrupted; continue later with --resume_training", file=sys.stderr)
        return end_now_if_distributed(130)
    except BaseException:  # a bug: its traceback, and no wait for other processes
        end_now_if_distributed(1, traceback.format_exc())
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
