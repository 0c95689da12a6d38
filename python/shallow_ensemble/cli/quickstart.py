"""``shallow-ensemble quickstart``: the whole workflow on bundled ethanol data.

Train (joint energy + force NLL) -> calibrate on validation -> metrics on a held-out
test split -> export a metatomic model -> ASE molecular dynamics with the exported
model, printing the energy and its uncertainty as it goes.
"""

import argparse
from typing import TYPE_CHECKING

from .. import workflows
from ._common import format_calibration, format_metrics


if TYPE_CHECKING:
    from ..training import TrainResult


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="train, calibrate, export and run MD on bundled ethanol data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-o", "--output", default="quickstart-run", help="output folder"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous run in the output folder",
    )
    parser.add_argument("--steps", type=int, default=200, help="MD steps")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value of the quickstart configuration",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    # the stage titles and "wrote model.pt" are logged by run_quickstart
    workflows.run_quickstart(
        args.output,
        steps=args.steps,
        overrides=args.overrides,
        overwrite=args.overwrite,
        on_trained=print_training,
        on_md_step=print_md_step,
    )
    return 0


def print_training(result: "TrainResult") -> None:
    print(f"trained {len(result.history)} epochs in {result.train_seconds:.1f} s")
    print(f"calibration: {format_calibration(result.calibration)}")
    for name in ("valid_uncalibrated", "valid_calibrated", "test"):
        if name in result.metrics:
            print(
                format_metrics(
                    result.metrics[name], title=f"\n{name.replace('_', ' ')}:"
                )
            )


def print_md_step(step: workflows.MDStep) -> None:
    if step.step == 0:
        print(
            f"{'step':>6}{'E_pot [eV]':>16}{'sigma_E [eV]':>15}"
            f"{'max sigma_i':>14}{'T [K]':>9}"
        )
    print(
        f"{step.step:>6}{step.energy:>16.4f}{step.sigma:>15.4f}"
        f"{step.max_sigma_atom:>14.4f}{step.temperature:>9.1f}"
    )
