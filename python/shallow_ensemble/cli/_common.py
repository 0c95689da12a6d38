"""Helpers shared by the subcommands: metric tables, the options of the commands
that run a model."""

import argparse
from typing import Any


UNITS = {
    "energy": "eV",
    "energy_per_atom": "eV/atom",
    "forces": "eV/A",
    "stress": "eV/A^3",
}


def format_metrics(report: dict[str, Any], title: str = "") -> str:
    """A small fixed-width table: one row per quantity (and per element for the
    forces), one column per metric.

    Below it, one line per quantity with components without ensemble spread (see
    :py:func:`~shallow_ensemble.calibration.predictions.evaluate_predictions`).
    """
    columns = ["rmse", "mae", "nll", "rll", "miscalibration_area", "alpha"]
    header = f"{'':<26}" + "".join(f"{c[:12]:>13}" for c in columns)
    lines = [title] if title else []
    lines.append(header)
    notes = []
    for name, quantity, values in _rows(report):
        label = f"{name} [{UNITS.get(quantity, '')}]"
        cells = "".join(
            f"{values[c]:>13.4g}" if c in values else f"{'-':>13}" for c in columns
        )
        lines.append(f"{label:<26}{cells}")
        notes += _zero_spread_note(name, values, UNITS.get(quantity, ""))
    return "\n".join(lines + notes)


def _rows(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(row name, quantity, metrics) of a report, one row per element for
    ``forces_by_element``."""
    rows = []
    for name, values in report.items():
        if name == "forces_by_element":
            rows += [(f"forces {symbol}", "forces", v) for symbol, v in values.items()]
        else:
            rows.append((name, name, values))
    return rows


def _zero_spread_note(name: str, values: dict[str, Any], unit: str) -> list[str]:
    """A line on the values without ensemble spread, if there are any."""
    n_zero = values.get("n_zero_spread", 0)
    if not n_zero:
        return []
    if n_zero == values.get("n") and "alpha" not in values:
        return [
            f"{name}: no ensemble spread on any of the {n_zero} values (the members "
            "all agree): no uncertainty metrics"
        ]
    if values.get("n_scored", 0) >= values["n"]:
        return [
            f"{name}: {n_zero} of {values['n']} values without ensemble spread: their "
            "uncertainty is the noise floor"
        ]
    return [
        f"{name}: {n_zero} of {values['n']} values without ensemble spread (std <= "
        f"{values['zero_spread_threshold']:.3g} {unit}) left out of the uncertainty "
        "metrics"
    ]


def format_calibration(calibration: dict[str, Any]) -> str:
    """The calibration factors and noise floors of a run, on one line."""
    parts = [f"{k} = {v:.3f}" for k, v in calibration.items() if k.startswith("alpha")]
    for key, unit in (("sigma0_energy", "eV/atom"), ("sigma0_atom", "eV")):
        if calibration.get(key, 0.0) > 0:
            parts.append(f"{key} = {calibration[key]:.3g} {unit}")
    forces = calibration.get("sigma0_forces", {})
    if any(value > 0 for value in forces.values()):
        floors = ", ".join(f"{s} {v:.3g}" for s, v in forces.items() if v > 0)
        parts.append(f"sigma0_forces = {floors} eV/A")
    parts += [
        f"{k} = {v:.3g}"
        for k, v in calibration.items()
        if k.startswith("floor_scale") and v != 1.0
    ]
    return ", ".join(parts)


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
