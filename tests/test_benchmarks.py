"""Every script in benchmarks/ runs with tiny arguments and prints its summary line.

Smoke runs only (the numbers mean nothing): each script runs as a subprocess,
``python benchmarks/X.py ...``, on a few bundled structures, with one thread, two
members, one epoch or repeat. The scripts are started together, two at a time (most of
their time is the start of fresh Python processes), when the first test asks for its
result. ``metatrain_comparison.py`` needs metatrain (a ``test`` extra) and runs
``mtt train`` three times.
"""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ase.io
import pytest

from conftest import ETHANOL, SILICON


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

TRAINING = [
    "--data={data}",
    "--members=2",
    "--batch-size=8",
    "--valid=0.25",
    "--test=0.25",
    "--cutoff=3.5",
    "--max-radial=3",
    "--max-angular=2",
    "--epochs=1",
    "--threads=1",
]

# script -> arguments; longest first (they start in this order)
ARGUMENTS = {
    "metatrain_comparison": [
        "--data={data}",
        "--output={output}",
        "--members=2",
        "--pet-epochs=1",
        "--llpr-epochs=1",
        "--finetune-epochs=1",
        "--finetune-target=heads",
    ],
    "training_step": [
        f"--data={ETHANOL}",
        "--members=2",
        "--batch-size=2",
        "--repeats=1",
        "--threads=1",
    ],
    "protocols": [
        *TRAINING,
        "--finetune-epochs=1",
        "--deep-members=2",
        "--output={output}",
    ],
    "member_forces": [f"--data={ETHANOL}", "--members=2", "--repeats=1", "--threads=1"],
    "scaling": [
        f"--data={SILICON}",
        "--members=2",
        "--replicate=1",
        "--repeats=1",
        "--threads=1",
    ],
    "train_strategies": [*TRAINING, "--output={output}"],
    "streaming": [
        "--data={data}",
        "--structures=40",
        "--compare=30",
        "--epochs=1",
        "--members=2",
        "--batch-size=8",
        "--valid=0.25",
        "--workers=1",
        "--threads=1",
    ],
    "inference_overhead": [
        f"--data={ETHANOL}",
        "--members=2",
        "--replicate=1",
        "--repeats=1",
        "--threads=1",
    ],
}

NUMBER = r"(-?[0-9.]+|nan)"

# script -> pattern of its summary line
SUMMARY = {
    "training_step": rf"training_step: mse=1\.00x/{NUMBER}MiB "
    rf"energy_nll={NUMBER}x/{NUMBER}MiB energy_force_nll={NUMBER}x/{NUMBER}MiB "
    rf"finetune_heads={NUMBER}x/{NUMBER}MiB \(mse step {NUMBER} ms\)",
    "member_forces": rf"member_forces: M=2 batched/mean={NUMBER} "
    rf"loop/batched={NUMBER} batched={NUMBER}MiB",
    "inference_overhead": rf"inference_overhead: M=2 N=9 overhead={NUMBER}% "
    rf"\(fastest runs {NUMBER}%\)",
    "scaling": r"scaling: default atoms/s \d+:\d+; tuned atoms/s \d+:\d+",
    "streaming": rf"streaming: N=40 peak={NUMBER}MiB epoch={NUMBER}s; N=30 "
    rf"memory={NUMBER}s/{NUMBER}MiB streaming={NUMBER}s/{NUMBER}MiB "
    rf"ratio={NUMBER} workers=1",
    "train_strategies": "train_strategies: "
    + "; ".join(
        rf"{name} E_rmse={NUMBER} F_rmse={NUMBER} F_rll={NUMBER} s/epoch={NUMBER}"
        for name in ("mse", "energy_nll", "energy_force_nll")
    ),
    "protocols": "protocols: "
    + "; ".join(
        rf"{re.escape(name)} F_RLL={NUMBER} t=\d+s"
        for name in (
            "mse",
            "energy_nll",
            "energy_force_nll",
            "laplace",
            "random_heads",
            "finetune<-laplace",
            "finetune<-energy_nll",
            "deep_ensemble",
        )
    ),
    "metatrain_comparison": rf"metatrain_comparison: PET \d+ s; best calibrated force "
    rf"RLL {NUMBER} \((mtt llpr|mtt llpr \+ ensemble training|ours: laplace|"
    r"ours: laplace \+ finetune \(heads, 1 epochs, lr 0\.001\))\)",
}


#: scripts whose dry run has a test module of its own
TESTED_ELSEWHERE = {"device_check"}  # tests/test_device_check.py


def test_every_benchmark_is_run():
    scripts = {p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    scripts -= TESTED_ELSEWHERE
    assert scripts == set(ARGUMENTS) == set(SUMMARY)


def _run(name, folder):
    output = folder / name
    output.mkdir()
    arguments = [
        argument.format(data=folder / "ethanol-60.xyz", output=output / "runs")
        for argument in ARGUMENTS[name]
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=output,
    )


@pytest.fixture(scope="module")
def benchmark_runs(tmp_path_factory):
    """Every script's finished process (a future), started two at a time."""
    folder = tmp_path_factory.mktemp("benchmarks")
    # metatrain's batches of 8 need 9 validation and test structures (15% each)
    ase.io.write(folder / "ethanol-60.xyz", ase.io.read(ETHANOL, ":60"))
    pool = ThreadPoolExecutor(max_workers=2)
    runs = {name: pool.submit(_run, name, folder) for name in ARGUMENTS}
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("name", list(ARGUMENTS))
def test_benchmark_prints_its_summary(name, benchmark_runs):
    process = benchmark_runs[name].result()
    assert process.returncode == 0, process.stderr[-5000:]
    lines = process.stdout.strip().splitlines()
    summaries = [line for line in lines if line.startswith(f"{name}: ")]
    assert len(summaries) == 1, process.stdout
    assert summaries[0] == lines[-1]
    assert re.fullmatch(SUMMARY[name], summaries[0]), summaries[0]
