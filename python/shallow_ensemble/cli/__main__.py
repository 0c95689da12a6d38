"""The ``shallow-ensemble`` command."""

import argparse
import logging
import os
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


class ConsoleHandler(logging.Handler):
    """Plain messages of the package's loggers: INFO and below on stdout, warnings
    and errors on stderr, written to the streams current at the time (so that
    redirecting ``sys.stdout`` catches them)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            print(self.format(record), file=stream, flush=True)
        except Exception:
            self.handleError(record)


def setup_logging(debug: bool = False) -> None:
    """Show the messages of the ``shallow_ensemble`` loggers (INFO, or DEBUG with
    ``--debug``); under ``torchrun``, only rank 0 shows more than warnings.
    Calling it again replaces the handler it installed."""
    package = logging.getLogger("shallow_ensemble")
    for handler in list(package.handlers):
        if isinstance(handler, ConsoleHandler):
            package.removeHandler(handler)
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    package.addHandler(handler)
    level = logging.DEBUG if debug else logging.INFO
    if os.environ.get("RANK", "0") != "0":
        level = logging.WARNING
    package.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "debug", False))
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
