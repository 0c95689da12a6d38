"""The GPU check: CPU-against-device agreement (Python and the C++ driver), training
step times, inference atoms/s, member-force cost and peak GPU memory, in one table.

Liquid water cells of 192 atoms (64 molecules at 1 g/cm^3, random orientations,
labelled with ASE's TIP3P force field) replicated ``n x n x n`` times (``--sizes
1,2,4``: 192, 1536, 12288 atoms), or a frame of ``--data``. For each size, on the CPU
and on ``--device``:

- one optimiser step (loss, backward, Adam; float32, ``--members`` heads) of ``mse``,
  ``energy_nll`` and ``energy_force_nll`` on a batch of that one structure;
- energy + forces of the exported model (float64) through metatomic, as atoms/s;
- member forces (``predict(forces="members")``) against mean forces, on the device;
- the device's peak memory of each (CUDA only).

The agreement rows compare, on the 192-atom cell, the float64 exported model through
ASE's ``MetatomicCalculator(device=...)`` and the C++ driver (``--driver``, run with
``--device cpu`` and ``--device DEVICE``) with the Python CPU values, and the member
forces of ``predict``. ``torchrun`` (``nccl`` on CUDA, one process per visible GPU,
at most 2; ``gloo`` and one process on the CPU) trains one short epoch and is
compared with a one-process run.

    python benchmarks/device_check.py --device cuda --driver DRIVER

``--device cpu --tiny`` is the dry run the test suite does. Prints a table and one
line starting with ``device_check:``.
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ase
import ase.io
import numpy as np
import torch
from ase.calculators.tip3p import TIP3P

from shallow_ensemble.config import Config, DataConfig, ModelConfig, TrainingConfig
from shallow_ensemble.data import GraphDataset, collate, read_structures
from shallow_ensemble.export import export_model
from shallow_ensemble.export.predict import load_exported
from shallow_ensemble.training import get_strategy
from shallow_ensemble.training.initialization import build_model, init_data_dependent


OBJECTIVES = ["mse", "energy_nll", "energy_force_nll"]
TINY = {"cutoff": 3.5, "max_radial": 3, "max_angular": 2, "hidden_sizes": [16, 8]}


# --- data ---------------------------------------------------------------------------
def water_box(seed: int = 0) -> ase.Atoms:
    """64 water molecules on a 4x4x4 grid in a 12.42 A cube (1 g/cm^3), randomly
    oriented, with TIP3P energy and forces (ASE's calculator)."""
    rng = np.random.default_rng(seed)
    edge = 12.42
    molecule = ase.Atoms(
        "OH2", positions=[[0, 0, 0], [0.9572, 0, 0], [-0.2400, 0.9266, 0]]
    )
    atoms = ase.Atoms(cell=[edge] * 3, pbc=True)
    for i in range(4):
        for j in range(4):
            for k in range(4):
                water = molecule.copy()
                water.rotate(rng.uniform(0, 360), rng.normal(size=3), center=(0, 0, 0))
                water.translate((np.array([i, j, k]) + 0.5) * edge / 4)
                atoms += water
    atoms.calc = TIP3P(rc=5.0)
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = None
    atoms.info["energy"] = energy
    atoms.arrays["forces"] = forces
    return atoms


def labelled_cells(base: ase.Atoms, sizes: list[int], folder: Path) -> dict[int, Path]:
    """``base`` replicated ``n x n x n`` (energies and forces replicated too)."""
    paths = {}
    for n in sizes:
        atoms = base.repeat((n, n, n))
        atoms.info["energy"] = base.info["energy"] * n**3
        atoms.arrays["forces"] = np.tile(base.arrays["forces"], (n**3, 1))
        paths[n] = folder / f"water-{n}.xyz"
        ase.io.write(paths[n], atoms)
    return paths


# --- timing -------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(work, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``work()`` after ``warmup`` calls."""
    for _ in range(warmup):
        work()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        work()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_mib(work, device: torch.device) -> float:
    """The device memory ``work()`` needs at its peak, MiB (NaN on the CPU)."""
    if device.type != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    work()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def model_config(args) -> Config:
    hypers = TINY if args.tiny else {}
    return Config(
        data=DataConfig(train="", valid=""),
        model=ModelConfig(num_members=args.members, **hypers),
    )


def training_rows(args, path: Path, devices: list[torch.device]) -> list[dict]:
    """Step time of each objective on each device, one structure per batch."""
    config = model_config(args)
    dataset = GraphDataset(read_structures(str(path)), config.model.cutoff)
    cpu_batch = collate([dataset[0]])
    rows = []
    for objective in OBJECTIVES:
        strategy = get_strategy(TrainingConfig(strategy=objective, warmup_epochs=0))
        for device in devices:
            torch.manual_seed(0)
            model = build_model(config, [1, 8], strategy.num_members(args.members))
            init_data_dependent(model, dataset)
            model = model.to(device=device, dtype=torch.float32)
            optimizer = torch.optim.Adam(strategy.param_groups(model), lr=1e-5)
            batch = cpu_batch.to(device=device, dtype=torch.float32)
            step = functools.partial(_step, strategy, model, optimizer, batch)
            seconds = timed(step, device, args.repeats)
            rows.append(
                {
                    "what": f"train {objective}",
                    "device": device.type,
                    "atoms": int(cpu_batch.n_atoms.sum()),
                    "ms": 1000 * seconds,
                    "peak_mib": peak_mib(step, device),
                }
            )
    return rows


def _step(strategy, model, optimizer, batch) -> None:
    optimizer.zero_grad()
    strategy.loss(model, batch, epoch=10).total.backward()
    optimizer.step()


def _exported_call(model, atoms: ase.Atoms, device: torch.device):
    """Energy and its gradient (the pair forces, from which engines sum the atomic
    forces) of the exported model on ``device``, as a function to time; the
    neighbour lists are computed once, on the CPU, outside the timing."""
    from metatomic.torch import ModelEvaluationOptions, ModelOutput, systems_to_torch
    from vesin.metatomic import neighbor_lists_for_model

    dtype = getattr(torch, model.capabilities().dtype)
    system = systems_to_torch(atoms, dtype=dtype)
    for calculator in neighbor_lists_for_model("angstrom", model, "angstrom"):
        calculator.add_neighbor_list([system])
    system = system.to(device=device)
    vectors = []
    for request in system.known_neighbor_lists():
        values = system.get_neighbor_list(request).values
        vectors.append(values.requires_grad_(True))
    options = ModelEvaluationOptions(
        length_unit="angstrom", outputs={"energy": ModelOutput(unit="eV")}
    )

    def call() -> None:
        energy = model([system], options, check_consistency=False)["energy"]
        torch.autograd.grad(energy.block().values.sum(), vectors)

    return call


def inference_rows(args, paths, devices, exported_path) -> list[dict]:
    rows = []
    for path in paths.values():
        atoms = ase.io.read(path)
        for device in devices:
            model = load_exported(exported_path).to(device)
            call = _exported_call(model, atoms, device)
            # TorchScript's profiling executor optimises after two calls
            seconds = timed(call, device, args.repeats, warmup=3)
            rows.append(
                {
                    "what": "inference E+F",
                    "device": device.type,
                    "atoms": len(atoms),
                    "ms": 1000 * seconds,
                    "atoms_per_s": len(atoms) / seconds,
                    "peak_mib": peak_mib(call, device),
                }
            )
    return rows


def member_force_rows(args, paths, device) -> list[dict]:
    """Member forces against mean forces, float32, on ``device``."""
    config = model_config(args)
    rows = []
    for path in paths.values():
        dataset = GraphDataset(read_structures(str(path)), config.model.cutoff)
        torch.manual_seed(0)
        model = build_model(config, [1, 8], args.members)
        init_data_dependent(model, dataset)
        model = model.to(device=device, dtype=torch.float32)
        batch = collate([dataset[0]]).to(device=device, dtype=torch.float32)
        times = {}
        for mode in ("mean", "members"):
            work = functools.partial(model.predict, batch, forces=mode)
            times[mode] = timed(work, device, args.repeats)
            peak = peak_mib(work, device)
        rows.append(
            {
                "what": "member forces",
                "device": device.type,
                "atoms": int(batch.n_atoms.sum()),
                "ms": 1000 * times["members"],
                "ratio": times["members"] / times["mean"],
                "peak_mib": peak,
            }
        )
    return rows


# --- agreement ----------------------------------------------------------------------
def relative(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-300))


def python_agreement(path: Path, exported_path: Path, device: torch.device) -> dict:
    from metatomic_ase import MetatomicCalculator

    values = {}
    for where in dict.fromkeys(["cpu", device.type]):
        atoms = ase.io.read(path)
        atoms.calc = MetatomicCalculator(
            str(exported_path), device=where, uncertainty_threshold=None
        )
        values[where] = (atoms.get_potential_energy(), atoms.get_forces())
    ref, got = values["cpu"], values[device.type]
    return {"energy": relative(got[0], ref[0]), "forces": relative(got[1], ref[1])}


def member_force_agreement(args, path: Path, device: torch.device) -> float:
    config = model_config(args)
    dataset = GraphDataset(read_structures(str(path)), config.model.cutoff)
    torch.manual_seed(0)
    model = build_model(config, [1, 8], args.members).to(torch.float64)
    init_data_dependent(model, dataset)
    batch = collate([dataset[0]])
    expected = model.predict(batch, forces="members").forces
    got = model.to(device).predict(batch.to(device=device), forces="members").forces
    assert expected is not None and got is not None
    return relative(got.cpu(), expected)


def driver_agreement(driver: str, path: Path, exported_path: Path, device) -> dict:
    from metatomic_ase import MetatomicCalculator

    atoms = ase.io.read(path)
    atoms.calc = MetatomicCalculator(str(exported_path), uncertainty_threshold=None)
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    result = {}
    for where in dict.fromkeys(["cpu", device.type]):
        process = subprocess.run(
            [driver, str(exported_path), str(path), "--device", where],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if process.returncode != 0:
            raise RuntimeError(f"driver --device {where}: {process.stderr.strip()}")
        output = json.loads(process.stdout)
        result[where] = {
            "energy": relative(output["energy"], energy),
            "forces": relative(output["forces"], forces),
        }
    return result


def torchrun_agreement(args, path: Path, device: torch.device, folder: Path) -> dict:
    """One epoch under torchrun against one process (valid loss, rel. difference)."""
    nproc = max(1, min(2, torch.cuda.device_count())) if device.type == "cuda" else 1
    config = {
        "data": {"train": str(path), "valid": str(path)},
        "model": {"num_members": 4, **TINY},
        "training": {
            "strategy": "energy_force_nll",
            "epochs": 1,
            "warmup_epochs": 0,
            "batch_size": 2,
            "device": device.type,
        },
        "calibration": {"enabled": False},
    }
    (folder / "torchrun.yaml").write_text(json.dumps(config))
    losses = {}
    for name, launcher in (
        ("single", [sys.executable, "-m", "shallow_ensemble.cli"]),
        (
            "torchrun",
            [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            + [f"--nproc-per-node={nproc}", "-m", "shallow_ensemble.cli"],
        ),
    ):
        out = folder / f"run-{name}"
        command = [*launcher, "train", str(folder / "torchrun.yaml"), "-o", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        process = subprocess.run(
            command, capture_output=True, text=True, timeout=600, env=env
        )
        if process.returncode != 0:
            raise RuntimeError(f"{name}: {process.stderr.strip()[-2000:]}")
        last = (out / "log.csv").read_text().strip().splitlines()
        header = last[0].split(",")
        losses[name] = float(last[-1].split(",")[header.index("valid_loss")])
    backend = "nccl" if device.type == "cuda" and nproc > 1 else "gloo"
    if nproc == 1:
        backend = "one rank"
    return {
        "nproc": nproc,
        "backend": backend,
        "rel": relative(losses["torchrun"], losses["single"]),
    }


# --- main ---------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N")
    parser.add_argument("--data", default=None, help="a water frame (default: built)")
    parser.add_argument("--sizes", default="1,2,4", help="replications n (n^3 cells)")
    parser.add_argument("--train-sizes", default=None, help="default: --sizes")
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--driver", default=None, help="shallow-ensemble-driver")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tiny", action="store_true", help="small model (dry run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available to torch")
    devices = list(dict.fromkeys([torch.device("cpu"), device]))
    sizes = [int(n) for n in args.sizes.split(",")]
    train_sizes = [int(n) for n in (args.train_sizes or args.sizes).split(",")]

    folder = Path(tempfile.mkdtemp(prefix="device-check-"))
    base = ase.io.read(args.data) if args.data else water_box()
    paths = labelled_cells(base, sorted(set(sizes + train_sizes + [1])), folder)
    torch.manual_seed(0)
    config = model_config(args)
    dataset = GraphDataset(read_structures(str(paths[1])), config.model.cutoff)
    model = build_model(config, [1, 8], args.members)
    init_data_dependent(model, dataset)
    exported_path = export_model(model.to(torch.float64), folder / "model.pt")

    failures = []

    def attempt(name, work):
        try:
            return work()
        except Exception as error:  # reported in the table, the check goes on
            failures.append(f"{name}: {type(error).__name__}: {error}")
            return None

    py = attempt("python", lambda: python_agreement(paths[1], exported_path, device))
    members = attempt("members", lambda: member_force_agreement(args, paths[1], device))
    cxx = None
    if args.driver:
        cxx = attempt(
            "driver",
            lambda: driver_agreement(args.driver, paths[1], exported_path, device),
        )
    dist = attempt(
        "torchrun", lambda: torchrun_agreement(args, paths[1], device, folder)
    )
    rows = []
    train_paths = {n: paths[n] for n in train_sizes}
    for n, path in train_paths.items():
        rows += (
            attempt(f"training {n}", lambda p=path: training_rows(args, p, devices))
            or []
        )
    size_paths = {n: paths[n] for n in sizes}
    rows += (
        attempt(
            "inference",
            lambda: inference_rows(args, size_paths, devices, exported_path),
        )
        or []
    )
    rows += (
        attempt("member forces", lambda: member_force_rows(args, size_paths, device))
        or []
    )

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device check: {name}, torch {torch.__version__}, M = {args.members}, "
        f"{args.threads} CPU threads{', tiny model' if args.tiny else ''}"
    )
    title = "agreement with the CPU (max rel. difference)"
    print(f"{title:<48}{'energy':>12}{'forces':>12}")
    agreement = []
    if py:
        label = f"python, MetatomicCalculator(device={device.type})"
        agreement.append((label, f"{py['energy']:.1e}", f"{py['forces']:.1e}"))
    if members is not None:
        agreement.append(("python, member forces (predict)", "", f"{members:.1e}"))
    for where, values in (cxx or {}).items():
        label = f"C++ driver --device {where} vs python cpu"
        agreement.append((label, f"{values['energy']:.1e}", f"{values['forces']:.1e}"))
    if dist:
        label = f"torchrun x{dist['nproc']} ({dist['backend']}) vs one process"
        agreement.append((label, "valid loss", f"{dist['rel']:.1e}"))
    for label, energy, forces in agreement:
        print(f"{label:<48}{energy:>12}{forces:>12}")
    print()
    header = ["what", "device", "atoms", "ms", "atoms/s", "x mean", "peak MiB"]
    widths = [26, 7, 7, 11, 11, 8, 10]
    print(
        header[0].ljust(widths[0])
        + "".join(h.rjust(w) for h, w in zip(header[1:], widths[1:], strict=True))
    )
    for row in rows:
        cells = [
            row["device"],
            str(row["atoms"]),
            f"{row['ms']:.1f}",
            f"{row['atoms_per_s']:.0f}" if "atoms_per_s" in row else "",
            f"{row['ratio']:.2f}" if "ratio" in row else "",
            "" if np.isnan(row["peak_mib"]) else f"{row['peak_mib']:.0f}",
        ]
        print(
            row["what"].ljust(widths[0])
            + "".join(c.rjust(w) for c, w in zip(cells, widths[1:], strict=True))
        )
    for failure in failures:
        print(f"FAILED {failure}")

    worst = max([py["energy"], py["forces"]] if py else [float("nan")])
    cxx_worst = max(
        (v for values in (cxx or {}).values() for v in values.values()),
        default=float("nan"),
    )
    summary = (
        f"device_check: {device.type} python={worst:.1e} "
        f"members={members if members is not None else float('nan'):.1e} "
        f"cxx={cxx_worst:.1e} torchrun={dist['rel'] if dist else float('nan'):.1e} "
        f"rows={len(rows)} failures={len(failures)}"
    )
    print(summary)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
