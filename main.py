"""Command-line entry point: parse the flags, then hand over to the runtime."""
import sys

from runtime.arguments import parse_args


def main(argv=None):
    """Run the tool with the given command line (sys.argv[1:] when None); returns the exit code."""
    parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
