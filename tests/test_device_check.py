"""The GPU check's CPU dry run (``benchmarks/device_check.sh --device cpu``), so
that the one command prepared for a GPU machine keeps working.

It builds the C++ driver (into the folder tests/cxx uses), collects the CUDA tests
(which skip here), and runs ``benchmarks/device_check.py`` with a tiny model on the
192-atom water cell: the agreement rows compare the CPU with itself and must be
(near) zero, and every timing row must be there. The numbers mean nothing."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"([0-9.]+e[+-][0-9]+)"


@pytest.fixture(scope="module")
def dry_run():
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed (the check builds the C++ driver)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    env.pop("SHALLOW_ENSEMBLE_REQUIRE_CUDA", None)
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--device", "cpu"]
        + ["--tiny", "--sizes=1", "--members=2", "--repeats=1", "--threads=1"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
    )


def test_dry_run_prints_the_table_and_its_summary(dry_run):
    output = dry_run.stdout
    assert dry_run.returncode == 0, output[-5000:] + dry_run.stderr[-5000:]
    lines = output.strip().splitlines()
    assert lines[-1].startswith("== done (status 0)")
    summary = lines[-2]
    match = re.fullmatch(
        rf"device_check: cpu python={NUMBER} members={NUMBER} cxx={NUMBER} "
        rf"torchrun={NUMBER} rows=5 failures=0",
        summary,
    )
    assert match, summary
    # the CPU against itself: the same code on the same numbers
    python, members, cxx, torchrun = (float(v) for v in match.groups())
    assert python == 0.0 and members == 0.0 and torchrun <= 1e-12
    assert cxx <= 1e-10
    for row in [
        "train mse",
        "train energy_nll",
        "train energy_force_nll",
        "inference E+F",
        "member forces",
    ]:
        pattern = rf"^{re.escape(row)} +cpu +192 +[0-9.]+"
        assert re.search(pattern, output, re.MULTILINE), row
    # the CUDA tests were collected (and skipped: no GPU here)
    assert re.search(r"\d+ skipped", output)
    assert "C++ driver --device cpu vs python cpu" in output
