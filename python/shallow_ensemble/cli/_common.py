"""Helpers shared by the subcommands: printing metric tables."""


def format_metrics(report: dict[str, dict[str, float]], title: str = "") -> str:
    """A small fixed-width table: one row per quantity, one column per metric."""
    columns = ["rmse", "mae", "nll", "rll", "miscalibration_area", "alpha"]
    header = f"{'':<26}" + "".join(f"{c[:12]:>13}" for c in columns)
    lines = [title] if title else []
    lines.append(header)
    units = {"energy": "eV", "energy_per_atom": "eV/atom", "forces": "eV/A"}
    for name, values in report.items():
        label = f"{name} [{units.get(name, '')}]"
        cells = "".join(
            f"{values[c]:>13.4g}" if c in values else f"{'-':>13}" for c in columns
        )
        lines.append(f"{label:<26}{cells}")
    return "\n".join(lines)
