"""``shallow-ensemble select MODEL CANDIDATES.xyz -n N -o picked.xyz``.

The work is done by :py:func:`shallow_ensemble.workflows.selection.select_structures`.
"""

import argparse
from pathlib import Path

from ..workflows.selection import UNCERTAINTIES, select_structures
from ._common import add_model_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "select",
        help="pick the candidate structures with the largest uncertainty",
        description="Rank the structures of an extended XYZ file by the calibrated "
        "uncertainty of a checkpoint (.ckpt) or an exported model (.pt) and write "
        "the N most uncertain ones (to label them and retrain: active learning), "
        "with their uncertainties in the frames' info.",
    )
    parser.add_argument(
        "model", help="model.ckpt from `train` or model.pt from `export`"
    )
    parser.add_argument("candidates", help="extended XYZ file of candidate structures")
    parser.add_argument("-n", type=int, required=True, help="how many to select")
    parser.add_argument("-o", "--output", required=True, help="extended XYZ output")
    parser.add_argument(
        "--by",
        choices=list(UNCERTAINTIES),
        default="max_force",
        help="uncertainty to rank by: largest or mean per-atom force std (eV/A), "
        "or energy std per atom (eV/atom) (default: max_force)",
    )
    parser.add_argument(
        "--diversity",
        action="store_true",
        help="spread the selection in the model's last-layer feature space "
        "(uncertainty-weighted farthest-point sampling), so that near-identical "
        "frames are not all picked",
    )
    add_model_options(parser)


def run(args: argparse.Namespace) -> int:
    if Path(args.output).is_dir():  # fail before the model runs
        raise IsADirectoryError(21, "the output is a directory", args.output)
    result = select_structures(
        args.model,
        args.candidates,
        args.n,
        uncertainty=args.by,
        diversity=args.diversity,
        batch_size=args.batch_size,
        extensions=args.extensions,
    )
    n_candidates = len(result.sigmas[args.by])
    how = f"by {args.by}" + (" with diversity" if args.diversity else "")
    print(
        f"selected {len(result.selected)} of {n_candidates} structures of "
        f"{args.candidates}, {how}:"
    )
    print(result.table())
    print(f"wrote {result.write(args.output)}")
    return 0
