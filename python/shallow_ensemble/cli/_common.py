"""Helpers shared by the subcommands: metric tables, the options of the commands
that run a model."""

import argparse


def format_metrics(report: dict[str, dict[str, float]], title: str = "") -> str:
    """A small fixed-width table: one row per quantity, one column per metric.

    Below it, one line per quantity with components without ensemble spread (left
    out of the uncertainty metrics, see
    :py:func:`~shallow_ensemble.calibration.predictions.evaluate_predictions`).
    """
    columns = ["rmse", "mae", "nll", "rll", "miscalibration_area", "alpha"]
    header = f"{'':<26}" + "".join(f"{c[:12]:>13}" for c in columns)
    lines = [title] if title else []
    lines.append(header)
    units = {
        "energy": "eV",
        "energy_per_atom": "eV/atom",
        "forces": "eV/A",
        "stress": "eV/A^3",
    }
    notes = []
    for name, values in report.items():
        label = f"{name} [{units.get(name, '')}]"
        cells = "".join(
            f"{values[c]:>13.4g}" if c in values else f"{'-':>13}" for c in columns
        )
        lines.append(f"{label:<26}{cells}")
        n_zero = values.get("n_zero_spread", 0)
        if n_zero == values.get("n"):
            notes.append(
                f"{name}: no ensemble spread on any of the {n_zero} values (the "
                "members all agree): no uncertainty metrics"
            )
        elif n_zero:
            notes.append(
                f"{name}: {n_zero} of {values['n']} values without ensemble spread "
                f"(std <= {values['zero_spread_threshold']:.3g} "
                f"{units.get(name, '')}) left out of the uncertainty metrics"
            )
    return "\n".join(lines + notes)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that run a checkpoint or an exported model on
    structures: ``--batch-size``, ``--extensions`` and ``--debug``."""
    parser.add_argument(
        "--batch-size", type=int, default=8, help="structures per batch"
    )
    parser.add_argument(
        "--extensions",
        help="extensions folder of an exported model (default: "
        "'extensions' next to it)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
