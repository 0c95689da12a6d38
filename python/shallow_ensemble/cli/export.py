"""``shallow-ensemble export MODEL.ckpt -o model.pt``.

The work is done by :py:func:`shallow_ensemble.workflows.export_checkpoint`.
"""

import argparse

from .. import workflows


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint as a metatomic model",
        description="Write a TorchScript metatomic model (energy, energy_uncertainty, "
        "energy_ensemble) for LAMMPS, i-PI, ASE and C++. The file is self-contained: "
        "no compiled extension is needed to run it.",
    )
    parser.add_argument("checkpoint", help="model.ckpt written by `train`")
    parser.add_argument("-o", "--output", default="model.pt", help="exported file")
    parser.add_argument(
        "--dtype",
        default="float64",
        choices=["float64", "float32"],
        help="precision of the exported model (default float64)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    path = workflows.export_checkpoint(args.checkpoint, args.output, dtype=args.dtype)
    print(f"wrote {path}")
    return 0
