"""Every script in benchmarks/ runs with tiny arguments and prints its summary line.

Smoke runs only (the numbers mean nothing): each script runs as a subprocess,
``python benchmarks/X.py ...``, on a few bundled structures, with one thread, two
members, one epoch or repeat. The scripts are started together, two at a time (most of
their time is the start of fresh Python processes), when the first test asks for its
result. ``metatrain_comparison.py`` needs metatrain (a ``test`` extra) and runs
``mtt train`` three times.
"""

import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

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
        "--repeats=2",
        "--output={output}",
        "--json=protocols.json",
    ],
    "out_of_distribution": [
        f"--data={SILICON}",
        "--ood={slabs}",
        "--members=2",
        "--batch-size=8",
        "--valid=0.25",
        "--test=0.25",
        "--cutoff=3.5",
        "--max-radial=3",
        "--max-angular=2",
        "--epochs=1",
        "--finetune-epochs=1",
        "--threads=1",
        "--check-export",
        "--output={output}",
        "--json=ood.json",
    ],
    "noise_floor": [
        *[a for a in TRAINING if not a.startswith("--epochs")],
        "--epochs=2",
        "--warmup-epochs=1",
        "--repeats=2",
        "--output={output}",
        "--json=noise_floor.json",
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

PROTOCOLS = (
    "mse",
    "energy_nll",
    "energy_force_nll",
    "laplace",
    "random_heads",
    "protocol",
    "finetune<-energy_nll",
    "deep_ensemble",
)

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
    "protocols": "protocols: repeats=2 "
    + "; ".join(
        rf"{re.escape(name)} F_RLL={NUMBER}±{NUMBER} t=\d+s" for name in PROTOCOLS
    ),
    "out_of_distribution": "out_of_distribution: "
    + "; ".join(
        rf"{name} ratio={NUMBER} alpha_E={NUMBER}"
        for name in ("laplace", "energy_nll", "energy_force_nll")
    )
    + rf"; protocol ratio={NUMBER} alpha_E={NUMBER} \((meets|misses) target\)",
    "noise_floor": rf"noise_floor: ethanol-60\.xyz, 2 repeats: test alpha_F {NUMBER} ± "
    rf"{NUMBER} \(factor alone\) -> {NUMBER} ± {NUMBER} \(with floors\); force RLL "
    rf"{NUMBER} -> {NUMBER}",
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
        argument.format(
            data=folder / "ethanol-60.xyz",
            slabs=folder / "slabs.xyz",
            output=output / "runs",
        )
        for argument in ARGUMENTS[name]
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=output,
    )
    process.folder = output  # where --json files land
    return process


def _slabs(frames):
    """Bulk frames with 12 Å of vacuum added along the third cell vector (the
    references are the bulk ones: a smoke run, the numbers mean nothing)."""
    slabs = []
    for frame in frames:
        cell = np.array(frame.cell)
        cell[2] *= 1 + 12.0 / np.linalg.norm(cell[2])
        slab = ase.Atoms(frame.numbers, frame.positions, cell=cell, pbc=True)
        slab.calc = SinglePointCalculator(
            slab, energy=frame.get_potential_energy(), forces=frame.get_forces()
        )
        slabs.append(slab)
    return slabs


@pytest.fixture(scope="module")
def benchmark_runs(tmp_path_factory):
    """Every script's finished process (a future), started two at a time."""
    folder = tmp_path_factory.mktemp("benchmarks")
    # metatrain's batches of 8 need 9 validation and test structures (15% each)
    ase.io.write(folder / "ethanol-60.xyz", ase.io.read(ETHANOL, ":60"))
    ase.io.write(folder / "slabs.xyz", _slabs(ase.io.read(SILICON, ":6")))
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


def _json(benchmark_runs, name, file):
    process = benchmark_runs[name].result()
    assert process.returncode == 0, process.stderr[-5000:]
    with open(process.folder / file) as fd:
        return json.load(fd)


def test_protocols_statistics_match_the_repeats(benchmark_runs):
    """Every strategy has finite per-repeat values; mean and std are theirs; the
    repeats use different seeds and splits of the same size."""
    data = _json(benchmark_runs, "protocols", "protocols.json")
    repeats = data["repeats"]
    assert [(r["seed"], r["split_seed"]) for r in repeats] == [(0, 0), (1, 1)]
    assert (
        repeats[0]["sizes"]
        == repeats[1]["sizes"]
        == {
            "train": 30,
            "valid": 15,
            "test": 15,
        }
    )
    assert data["strategies"] == list(PROTOCOLS)
    for name in PROTOCOLS:
        keys = ["seconds", "E_rmse", "F_rmse", "alpha_E", "alpha_F"]
        if name != "mse":  # one member: no uncertainty
            keys += ["E_rll", "F_rll", "test_alpha_F", "E_ma", "F_ma"]
        for key in keys:
            values = [r["rows"][name][key] for r in repeats]
            assert all(v is not None and math.isfinite(v) for v in values), (
                name,
                key,
                values,
            )
            stats = data["statistics"][name][key]
            assert stats["mean"] == pytest.approx(np.mean(values), rel=1e-9, abs=1e-12)
            assert stats["std"] == pytest.approx(
                np.std(values, ddof=1), rel=1e-9, abs=1e-12
            )
    # the fine-tune builds on the mse and laplace stages: it costs more epochs
    assert data["statistics"]["protocol"]["epochs"]["mean"] == 2


def test_out_of_distribution_reports_every_strategy(benchmark_runs):
    """Finite sigmas and ratios for every strategy; the ratio is the quotient of
    the reported medians; the exported model gives the same per-atom sigma."""
    data = _json(benchmark_runs, "out_of_distribution", "ood.json")
    assert data["ood_frames"] == 6
    results = data["results"]
    assert list(results) == ["laplace", "energy_nll", "energy_force_nll", "protocol"]
    for r in results.values():
        for key in ("sigma_bulk_median", "sigma_outer_median", "alpha_E_slabs"):
            assert r[key] is not None and math.isfinite(r[key]) and r[key] > 0
        assert r["ratio_outer"] == pytest.approx(
            r["sigma_outer_median"] / r["sigma_bulk_median"]
        )
        # silicon only: the per-element covariance is the pooled one
        llpr = r["llpr_ratio_outer"]
        assert set(llpr) == {"pooled", "14"}
        assert math.isfinite(llpr["pooled"]) and llpr["pooled"] > 0
        assert llpr["14"] == pytest.approx(llpr["pooled"], rel=1e-9)
    assert results["protocol"]["export_max_relative_difference"] < 1e-2


def test_llpr_ratio_closed_form():
    """The analytic LLPR sigma is linear in the features: slab features twice the
    bulk ones give a ratio of exactly 2, pooled and per element; only the outer
    atoms of the slabs count, and an element without outer atoms has no ratio."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from out_of_distribution import llpr_ratios
    finally:
        sys.path.remove(str(BENCHMARKS))
    import torch

    generator = torch.Generator().manual_seed(0)
    phi = torch.randn(200, 5, dtype=torch.float64, generator=generator)
    numbers = np.array([1, 8] * 100)
    bulk = (phi[:40], numbers[:40])
    slabs = (2.0 * phi[:40], numbers[:40])
    outer = np.ones(40, dtype=bool)
    ratios = llpr_ratios((phi, numbers), bulk, slabs, outer)
    assert set(ratios) == {"pooled", "1", "8"}
    for value in ratios.values():
        assert value == pytest.approx(2.0, rel=1e-12)
    # only the outer atoms count
    outer[::2] = False
    slabs = (torch.where(torch.from_numpy(outer)[:, None], 3.0, 1.0) * phi[:40],)
    ratios = llpr_ratios((phi, numbers), bulk, slabs + (numbers[:40],), outer)
    assert ratios["8"] == pytest.approx(3.0, rel=1e-12)
    assert "1" not in ratios  # no outer hydrogen


def test_noise_floor_compares_two_calibrations_of_the_same_predictions(benchmark_runs):
    """Both calibrations are fitted on the same validation predictions: the same
    test RMSE, no floors in the first, finite test metrics in both."""
    data = _json(benchmark_runs, "noise_floor", "noise_floor.json")
    assert [r["alpha"]["calibration"]["sigma0_forces"] for r in data["repeats"]] == [
        {},
        {},
    ]
    for repeat in data["repeats"]:
        plain, floored = repeat["alpha"], repeat["alpha+floor"]
        assert plain["test"]["forces"]["rmse"] == floored["test"]["forces"]["rmse"]
        assert set(floored["calibration"]["sigma0_forces"]) == {"H", "C", "O"}
        for result in (plain, floored):
            for key in ("nll", "rll", "alpha"):
                assert math.isfinite(result["test"]["forces"][key]), key
