"""``shallow-ensemble train CONFIG.yaml -o OUTDIR [--set section.key=value ...]``.

The work is done by :py:func:`shallow_ensemble.config.load_config` and
:py:func:`shallow_ensemble.training.train`.
"""

import argparse

from .. import workflows
from ..config import load_config
from ._common import format_calibration, format_metrics


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train and calibrate a shallow ensemble",
        description="Train a model as described by CONFIG, keep the best epoch on "
        "the validation set, calibrate it, and write OUTDIR/model.ckpt.",
    )
    parser.add_argument("config", help="YAML configuration file")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a configuration value, e.g. --set training.epochs=10",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted training"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="start again in an existing OUTDIR"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    from ..training import train

    config = load_config(args.config, args.overrides)
    result = train(config, args.output, resume=args.resume, overwrite=args.overwrite)
    if not workflows.is_main_process():
        return 0  # under torchrun, rank 0 reports
    print(f"trained in {result.train_seconds:.1f} s, {len(result.history)} epochs")
    print(f"calibration on validation: {format_calibration(result.calibration)}")
    for name, report in result.metrics.items():
        print(format_metrics(report, title=f"\n{name.replace('_', ' ')}:"))
    print(f"\nwrote {result.checkpoint}")
    return 0
