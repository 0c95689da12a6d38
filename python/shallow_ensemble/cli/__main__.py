"""The ``shallow-ensemble`` command."""

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from ..errors import ShallowEnsembleError
from . import evaluate, export, quickstart, select, train


COMMANDS = {
    "train": train,
    "evaluate": evaluate,
    "export": export,
    "quickstart": quickstart,
    "select": select,
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


@contextlib.contextmanager
def console_logging(debug: bool = False) -> Iterator[None]:
    """Show the messages of the ``shallow_ensemble`` loggers (INFO, or DEBUG with
    ``--debug``) while the command runs; under ``torchrun``, only rank 0 shows more
    than warnings. The logger is restored afterwards, so that ``main()`` called
    from Python leaves library calls silent."""
    package = logging.getLogger("shallow_ensemble")
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logging.DEBUG if debug else logging.INFO
    if os.environ.get("RANK", "0") != "0":
        level = logging.WARNING
    previous = package.level
    package.addHandler(handler)
    package.setLevel(level)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with console_logging(getattr(args, "debug", False)):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
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
