"""Running the ``shallow-ensemble`` command in-process, for the CLI tests."""

import contextlib
import io
from dataclasses import dataclass

from shallow_ensemble.cli.__main__ import main


@dataclass
class Run:
    code: int
    out: str
    err: str


def run_main(argv: list) -> Run:
    """``main(argv)`` with stdout and stderr captured (usable in module fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return Run(code, out.getvalue(), err.getvalue())


def assert_clean_error(run: Run, *fragments: str) -> None:
    """Exit code 1, one ``error:`` line naming the problem, no traceback."""
    assert run.code == 1, run
    assert "Traceback" not in run.err
    lines = [line for line in run.err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, run.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
