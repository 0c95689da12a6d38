"""Test-set calibration with and without noise floors, over seeds and splits.

For each repeat ``r`` (training seed ``r`` and random train/valid/test split ``r``),
trains one ensemble, predicts its validation and test structures, fits the
calibration on validation twice (the factors alone, ``calibration.noise_floor:
false``; factors with noise floors, the default) and scores the test structures under
each: RMSE, NLL, RLL, alpha and miscalibration area of the force components (all of
them, and those with a member spread below 1e-4 eV/Å or of at least 1e-3 eV/Å) and
of the structure energies. Prints a markdown table (mean ± std over repeats) and one
summary line starting with ``noise_floor:``.

    python benchmarks/noise_floor.py --data batio3.xyz --repeats 3 --epochs 30 \\
        --members 8 --output runs/noise-floor --json noise-floor.json
"""

import argparse
import json
import subprocess
from pathlib import Path

import torch
from _common import add_model_arguments, finite_or_none, make_config, mean_std

from shallow_ensemble.calibration.metrics import summary
from shallow_ensemble.calibration.predictions import (
    evaluate_predictions,
    fit_calibration,
    noise_floors,
    predict_dataset,
)
from shallow_ensemble.data import GraphDataset
from shallow_ensemble.training import load_model, train
from shallow_ensemble.training.datasets import load_structures


#: member spreads below this are "nearly without spread", eV/Å
NEARLY_FLAT = 1e-4
#: member spreads of at least this are "with spread", eV/Å
SPREAD = 1e-3


def force_subsets(test, calibration) -> dict:
    """Force metrics of the components with nearly no spread and with spread."""
    calibrated = test.calibrated(
        calibration["alpha_energy"],
        calibration["alpha_forces"],
        noise_floors(calibration),
    )
    mean, std, spread = calibrated.forces_mean_std()
    reference = test.forces_ref
    result = {"share_nearly_flat": float((spread < NEARLY_FLAT).double().mean())}
    for name, mask in (
        ("nearly_flat", (spread < NEARLY_FLAT) & (std > 0)),
        ("with_spread", spread >= SPREAD),
    ):
        if bool(mask.any()):
            scores = summary(reference[mask], mean[mask], std[mask])
            result[name] = {k: scores[k] for k in ("alpha", "rll", "nll")}
    return result


def one_repeat(args, repeat: int, folder: Path) -> dict:
    args.seed, args.split_seed = repeat, repeat
    config = make_config(
        args,
        strategy=args.strategy,
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
    )
    train(config, folder, overwrite=True, progress=False)
    model = load_model(folder / "model.ckpt")
    sets = load_structures(config)
    predictions = {
        name: predict_dataset(
            model, GraphDataset(sets[name], model.cutoff), args.batch_size
        )
        for name in ("valid", "test")
    }
    result = {}
    for name, floor in (("alpha", False), ("alpha+floor", True)):
        calibration = fit_calibration(predictions["valid"], noise_floor=floor)
        test = predictions["test"].calibrated(
            calibration["alpha_energy"],
            calibration["alpha_forces"],
            noise_floors(calibration),
        )
        result[name] = {
            "calibration": calibration,
            # the factor on the uncalibrated force spread in the uncertainty
            "force_factor": calibration["alpha_forces"]
            * calibration["floor_scale_forces"],
            "test": evaluate_predictions(test),
            "forces_subsets": force_subsets(predictions["test"], calibration),
        }
    return result


ROWS = [
    ("F RMSE [eV/Å]", ("test", "forces", "rmse")),
    ("F NLL", ("test", "forces", "nll")),
    ("F RLL", ("test", "forces", "rll")),
    ("alpha_F (all)", ("test", "forces", "alpha")),
    ("miscal. area F", ("test", "forces", "miscalibration_area")),
    ("alpha_F (spread < 1e-4)", ("forces_subsets", "nearly_flat", "alpha")),
    ("alpha_F (spread >= 1e-3)", ("forces_subsets", "with_spread", "alpha")),
    ("RLL F (spread >= 1e-3)", ("forces_subsets", "with_spread", "rll")),
    ("E RLL", ("test", "energy", "rll")),
    ("alpha_E", ("test", "energy", "alpha")),
    ("validation factor on the force spread", ("force_factor",)),
]


def lookup(entry: dict, path: tuple) -> float:
    for key in path:
        if not isinstance(entry, dict) or key not in entry:
            return float("nan")
        entry = entry[key]
    return float(entry)


def table(repeats: list[dict]) -> str:
    lines = [
        "| metric (test) | factor alone | factor + floors |",
        "| --- | ---: | ---: |",
    ]
    for label, path in ROWS:
        cells = []
        for name in ("alpha", "alpha+floor"):
            mean, std = mean_std([lookup(r[name], path) for r in repeats])
            cells.append(f"{mean:.3g} ± {std:.2g}")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    share = mean_std(
        [r["alpha"]["forces_subsets"]["share_nearly_flat"] for r in repeats]
    )
    lines.append(
        f"\ncomponents with spread < 1e-4 eV/Å: {100 * share[0]:.1f} ± "
        f"{100 * share[1]:.1f} % of the test force components"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--strategy", default="energy_force_nll")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--warmup-epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", required=True, help="folder for the runs")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = [
        one_repeat(args, r, Path(args.output) / f"repeat-{r}")
        for r in range(args.repeats)
    ]
    print(table(repeats))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    ).stdout.strip()
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                finite_or_none(
                    {"args": vars(args), "commit": commit, "repeats": repeats}
                ),
                indent=1,
            )
        )
    plain = mean_std([lookup(r["alpha"], ROWS[3][1]) for r in repeats])
    floored = mean_std([lookup(r["alpha+floor"], ROWS[3][1]) for r in repeats])
    rll = [
        mean_std([lookup(r[name], ROWS[2][1]) for r in repeats])[0]
        for name in ("alpha", "alpha+floor")
    ]
    print(
        f"noise_floor: {Path(args.data).name}, {args.repeats} repeats: test alpha_F "
        f"{plain[0]:.3g} ± {plain[1]:.2g} (factor alone) -> {floored[0]:.3g} ± "
        f"{floored[1]:.2g} (with floors); force RLL {rll[0]:.3g} -> {rll[1]:.3g}"
    )


if __name__ == "__main__":
    main()
