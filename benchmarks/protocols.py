"""The paper's comparison: calibration vs training cost of every strategy, over
several seeds and random splits.

Runs, on one dataset with one backbone, for each repeat ``r`` (training seed and
split seed ``seed + r``, a fresh random train/valid/test split of the same frames):
``mse``, ``energy_nll``, ``energy_force_nll`` (from scratch), ``laplace`` and
``random_heads`` (from the ``mse`` model), ``protocol`` (a full-model fine-tune with
the joint energy + force NLL from the ``laplace`` model: the stages of
``strategy: protocol``, sharing the ``mse`` and ``laplace`` stages),
``finetune<-energy_nll`` (the same fine-tune from the ``energy_nll`` model:
``protocol.first: energy_nll``) and ``deep_ensemble``. The models are calibrated on
the validation set; the test set is disjoint from both (checked).

Prints the test-set metrics of every repeat, then one markdown table of mean ± std
over the repeats (RMSE, RLL after recalibration, the calibration factors alpha fitted
on the validation set, the test-set alpha after recalibration, miscalibration areas,
cumulative training time and epochs, i.e. including the stages a strategy builds
on) and a summary line starting with ``protocols:``.

    python benchmarks/protocols.py --data water.xyz --frames 60 --repeats 3 \\
        --epochs 20 --finetune-epochs 5 --members 8 --max-radial 4 --max-angular 3 \\
        --strategies mse,energy_nll,energy_force_nll,laplace,protocol \\
        --threads 1 --output runs/water --json water-protocols.json

``--frames N`` trains on a random subset of N frames of the file (the same subset
for every repeat; the repeats split it differently). Stages whose folder holds a
finished model of the same configuration are reused with ``--reuse``;
``--recalibrate`` then refits their calibration with the current code (e.g. after a
change of the calibration, without retraining; a configuration key added since the
stage was trained makes it train anew).
"""

import argparse
import copy
import dataclasses
import json
import subprocess
from pathlib import Path

import ase.io
import numpy as np
import torch
from _common import (
    add_model_arguments,
    finite_or_none,
    get,
    make_config,
    mean_std,
    run_stage,
    test_metrics,
)


ALL = (
    "mse",
    "energy_nll",
    "energy_force_nll",
    "laplace",
    "random_heads",
    "protocol",
    "finetune<-energy_nll",
    "deep_ensemble",
)

#: name -> (column header, unit, digits); the per-repeat values of each strategy
COLUMNS = {
    "seconds": ("train time", "s", 0),
    "epochs": ("epochs", "", 0),
    "E_rmse": ("E RMSE", "eV", 3),
    "F_rmse": ("F RMSE", "eV/Å", 3),
    "E_rll": ("E RLL", "%", 1),
    "F_rll": ("F RLL", "%", 1),
    "alpha_E": ("alpha_E (valid)", "", 2),
    "alpha_F": ("alpha_F (valid)", "", 2),
    "test_alpha_E": ("alpha_E (test, cal)", "", 2),
    "test_alpha_F": ("alpha_F (test, cal)", "", 2),
    "E_ma": ("E miscal. area", "", 3),
    "F_ma": ("F miscal. area", "", 3),
}


def stages(args):
    """(name, parent, training overrides) in dependency order."""
    finetune = {
        "strategy": "finetune",
        "epochs": args.finetune_epochs,
        "warmup_epochs": 0,
        "learning_rate": args.finetune_lr,
    }
    return [
        ("mse", None, {"strategy": "mse", "epochs": args.epochs}),
        ("energy_nll", None, {"strategy": "energy_nll", "epochs": args.epochs}),
        (
            "energy_force_nll",
            None,
            {"strategy": "energy_force_nll", "epochs": args.epochs},
        ),
        ("laplace", "mse", {"strategy": "laplace"}),
        ("random_heads", "mse", {"strategy": "random_heads"}),
        ("protocol", "laplace", finetune),
        ("finetune<-energy_nll", "energy_nll", finetune),
        ("deep_ensemble", None, {"strategy": "deep_ensemble", "epochs": args.epochs}),
    ]


def needed(args, wanted: set[str]) -> set[str]:
    """The wanted stages and the stages they build on."""
    parents = {name: parent for name, parent, _ in stages(args)}
    result = set()
    for name in wanted:
        while name is not None:
            result.add(name)
            name = parents[name]
    return result


def folder_name(name: str) -> str:
    return name.replace("<-", "-from-")


def subset(data: str, frames: int | None, root: Path) -> str:
    """``data``, or a random subset of ``frames`` of its frames (seed 0) written
    into ``root``."""
    if frames is None:
        return data
    structures = ase.io.read(data, ":")
    if frames >= len(structures):
        return data
    keep = sorted(np.random.default_rng(0).permutation(len(structures))[:frames])
    path = root / f"{Path(data).stem}-{frames}.xyz"
    if not path.exists():  # the same content every time: reusable stages stay valid
        ase.io.write(str(path), [structures[i] for i in keep])
    return str(path)


def run_repeat(args, root: Path, run: set[str]) -> dict:
    """Train (or reuse) the stages of one repeat; their test-set metrics."""
    results: dict = {}
    for name, parent, overrides in stages(args):
        if name not in run:
            continue
        folder = root / folder_name(name)
        if parent is not None:
            overrides = {
                **overrides,
                "init_from": str(root / folder_name(parent) / "model.ckpt"),
            }
        members = args.deep_members if name == "deep_ensemble" else args.members
        config = make_config(args, **overrides)
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, num_members=members)
        )
        metrics = run_stage(config, folder, args.reuse)
        own = metrics["train_seconds"]
        total = own + (results[parent]["total_seconds"] if parent else 0.0)
        epochs = metrics["epochs"] + (results[parent]["total_epochs"] if parent else 0)
        if name == "deep_ensemble":
            epochs = members * args.epochs
        results[name] = {
            "own_seconds": own,
            "total_seconds": total,
            "total_epochs": epochs,
            "median_epoch_seconds": metrics["median_epoch_seconds"],
            "calibration": metrics["calibration"],
            **test_metrics(config, folder, getattr(args, "recalibrate", False)),
        }
        print(f"  done {name}: {own:.0f} s", flush=True)
    return results


def row(r: dict) -> dict[str, float]:
    """The table's values of one strategy in one repeat."""
    cal = r["calibrated"]
    return {
        "seconds": r["total_seconds"],
        "epochs": float(r["total_epochs"]),
        "E_rmse": get(cal, "energy", "rmse"),
        "F_rmse": get(cal, "forces", "rmse"),
        "E_rll": get(cal, "energy", "rll"),
        "F_rll": get(cal, "forces", "rll"),
        "alpha_E": r["calibration"]["alpha_energy"],
        "alpha_F": r["calibration"]["alpha_forces"],
        "test_alpha_E": get(cal, "energy", "alpha"),
        "test_alpha_F": get(cal, "forces", "alpha"),
        "E_ma": get(cal, "energy", "miscalibration_area"),
        "F_ma": get(cal, "forces", "miscalibration_area"),
    }


def cell(mean: float, std: float, digits: int) -> str:
    if mean != mean:  # NaN: no uncertainty (a one-member model)
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--epochs", type=int, default=40, help="epochs from scratch")
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument(
        "--deep-members",
        type=int,
        default=4,
        help="models in the deep ensemble (each trained from scratch)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="repeat r trains with seed and split seed `--seed` + r",
    )
    parser.add_argument(
        "--frames", type=int, help="a random subset of this many frames of --data"
    )
    parser.add_argument(
        "--strategies",
        default=",".join(ALL),
        help=f"comma-separated strategies to report (of {', '.join(ALL)}); the "
        "stages they build on run too",
    )
    parser.add_argument("--skip", default="", help="comma-separated stages to skip")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", required=True, help="folder for all runs")
    parser.add_argument("--reuse", action="store_true", help="reuse finished stages")
    parser.add_argument(
        "--recalibrate",
        action="store_true",
        help="refit each model's calibration on its validation set with this "
        "version's code before scoring (with --reuse, stages whose configuration "
        "still matches keep their weights; a changed or added key retrains)",
    )
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.output)
    root.mkdir(parents=True, exist_ok=True)
    wanted = [s for s in args.strategies.split(",") if s]
    unknown = set(wanted) - set(ALL)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; known: {', '.join(ALL)}")
    skip = set(filter(None, args.skip.split(",")))
    wanted = [s for s in ALL if s in wanted and s not in skip]
    run = needed(args, set(wanted))
    data = subset(args.data, args.frames, root)

    repeats = []
    for r in range(args.repeats):
        rep = copy.copy(args)
        rep.data = data
        rep.seed = rep.split_seed = args.seed + r
        print(f"repeat {r}: seed {rep.seed}, split seed {rep.split_seed}", flush=True)
        results = run_repeat(rep, root / f"repeat-{r}", run)
        repeats.append(
            {
                "seed": rep.seed,
                "split_seed": rep.split_seed,
                "sizes": next(iter(results.values()))["sizes"],
                "rows": {name: row(results[name]) for name in wanted},
                "results": {name: results[name] for name in wanted},
            }
        )
        for name in wanted:
            values = repeats[-1]["rows"][name]
            print(
                f"  {name:<22}"
                + " ".join(f"{key}={value:.4g}" for key, value in values.items()),
                flush=True,
            )

    statistics = {
        name: {
            key: dict(
                zip(
                    ("mean", "std"),
                    mean_std([rep["rows"][name][key] for rep in repeats]),
                    strict=True,
                )
            )
            for key in COLUMNS
        }
        for name in wanted
    }
    sizes = [rep["sizes"] for rep in repeats]
    where = commit()
    print(
        f"\n{Path(args.data).name} ({len(ase.io.read(data, ':'))} frames): split "
        f"{sizes[0]} (train/valid/test), {args.repeats} repeats (seeds "
        f"{args.seed}..{args.seed + args.repeats - 1}), M = {args.members}, "
        f"{args.epochs} epochs, fine-tune {args.finetune_epochs}, "
        f"{args.threads} threads, commit {where}; mean ± std over the repeats\n"
    )
    header = ["strategy"] + [
        f"{title} [{unit}]" if unit else title for title, unit, _ in COLUMNS.values()
    ]
    print("| " + " | ".join(header) + " |")
    print("| --- |" + " ---: |" * len(COLUMNS))
    for name in wanted:
        stats = statistics[name]
        cells = [
            cell(stats[key]["mean"], stats[key]["std"], digits)
            for key, (_, _, digits) in COLUMNS.items()
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as fd:
            json.dump(
                finite_or_none(
                    {
                        "args": vars(args),
                        "commit": where,
                        "frames": len(ase.io.read(data, ":")),
                        "strategies": wanted,
                        "repeats": repeats,
                        "statistics": statistics,
                    }
                ),
                fd,
                indent=2,
                allow_nan=False,
            )
    summary = [
        f"{name} F_RLL={statistics[name]['F_rll']['mean']:.1f}"
        f"±{statistics[name]['F_rll']['std']:.1f} "
        f"t={statistics[name]['seconds']['mean']:.0f}s"
        for name in wanted
    ]
    print(f"protocols: repeats={args.repeats} " + "; ".join(summary))


if __name__ == "__main__":
    main()
