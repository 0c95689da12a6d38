"""The ``shallow-ensemble`` command."""

import argparse
import sys

from ..errors import ShallowEnsembleError
from . import evaluate, export, quickstart, train


COMMANDS = {
    "train": train,
    "evaluate": evaluate,
    "export": export,
    "quickstart": quickstart,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shallow-ensemble",
        description="Train, calibrate, evaluate and export shallow-ensemble "
        "interatomic potentials with calibrated uncertainties.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=__version__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(COMMANDS[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ShallowEnsembleError, ValueError, OSError, RuntimeError) as error:
        # the package's own errors, bad values and file-system errors are reported
        # in one line; anything else is a bug and keeps its traceback
        if getattr(args, "debug", False):
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.strerror}: '{error.filename}'"
    return str(error)


if __name__ == "__main__":
    sys.exit(main())
