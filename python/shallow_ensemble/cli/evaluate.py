"""``shallow-ensemble evaluate MODEL DATA.xyz [--json out.json] [--plots DIR]``.

The work is done by :py:func:`shallow_ensemble.workflows.evaluate_model`.
"""

import argparse

from .. import workflows
from ._common import add_model_options, format_metrics


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="accuracy and calibration metrics of a model on a dataset",
        description="Evaluate a checkpoint (.ckpt) or an exported model (.pt) on an "
        "extended XYZ file: RMSE, MAE, NLL, RLL, miscalibration area and alpha for "
        "energies (per structure) and force components, with optional plots.",
    )
    parser.add_argument(
        "model", help="model.ckpt from `train` or model.pt from `export`"
    )
    parser.add_argument("data", help="extended XYZ file with reference energies/forces")
    parser.add_argument("--json", help="write the metrics to this JSON file")
    parser.add_argument("--plots", help="write parity/calibration PNGs to this folder")
    parser.add_argument("--energy-key", default="energy", help="energy key in the file")
    parser.add_argument("--forces-key", default="forces", help="forces key in the file")
    parser.add_argument("--no-forces", action="store_true", help="skip forces")
    add_model_options(parser)


def run(args: argparse.Namespace) -> int:
    # bad output paths fail before the model runs
    workflows.check_evaluation_outputs(args.json, args.plots)
    result = workflows.evaluate_model(
        args.model,
        args.data,
        energy_key=args.energy_key,
        forces_key=args.forces_key,
        forces=not args.no_forces,
        batch_size=args.batch_size,
        extensions=args.extensions,
    )
    print(format_metrics(result.report, title=f"{args.model} on {args.data}:"))
    if args.json:
        print(f"wrote {result.write_json(args.json)}")
    if args.plots:
        for path, drawn in result.write_plots(args.plots):
            print(f"wrote {path} ({drawn})")
    return 0
