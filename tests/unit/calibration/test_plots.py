import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shallow_ensemble
from shallow_ensemble.calibration import plots


DTYPE = torch.float64


def _data(n: int = 300):
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(n, dtype=DTYPE, generator=generator)
    std = torch.exp(torch.randn(n, dtype=DTYPE, generator=generator))
    y_true = mean + std * torch.randn(n, dtype=DTYPE, generator=generator)
    y_true[0] = mean[0]  # a zero error must not break the log axes
    return y_true, mean, std


def _axes():
    figure_module = pytest.importorskip("matplotlib.figure")
    return figure_module.Figure().subplots()


def test_save_report(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "energy.png"
    plots.save_report(str(path), "energy", *_data(), unit="eV")
    assert path.exists()
    assert path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_report_accepts_path_and_float32(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "forces.png"
    y_true, mean, std = (t.to(torch.float32).reshape(100, 3) for t in _data())
    plots.save_report(path, "forces", y_true, mean, std, unit="eV/Å")
    assert path.stat().st_size > 0


def test_plot_functions_draw_and_return_axes():
    y_true, mean, std = _data()
    ax = _axes()
    assert plots.plot_parity(ax, y_true, mean, std, "energy", "eV") is ax
    assert ax.get_xlabel() == "reference energy [eV]"

    ax = _axes()
    assert plots.plot_error_vs_sigma(ax, y_true, mean, std, "energy", "eV") is ax
    assert ax.get_xscale() == ax.get_yscale() == "log"
    # the zero error is left out of the scatter
    assert len(ax.collections[0].get_offsets()) == len(y_true) - 1
    assert len(ax.get_lines()) == 3  # |e| = 1, 2, 3 sigma

    ax = _axes()
    assert plots.plot_calibration_curve(ax, y_true, mean, std, n_bins=7) is ax
    binned, ideal = ax.get_lines()
    assert len(binned.get_xdata()) == 7
    assert ax.get_xscale() == ax.get_yscale() == "log"


def test_missing_matplotlib_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    message = r"plots need matplotlib: pip install shallow-ensemble\[plots\]"
    with pytest.raises(ImportError, match=message):
        plots.save_report("unused.png", "energy", *_data(), unit="eV")


def test_import_does_not_import_matplotlib():
    python_dir = Path(shallow_ensemble.__file__).parent.parent
    code = (
        "import sys\n"
        "import shallow_ensemble.calibration\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'\n"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        env={**os.environ, "PYTHONPATH": str(python_dir)},
        timeout=120,
    )


def _panels(monkeypatch):
    """Run with ``Figure.savefig`` recording the figure; return its axes."""
    figure_module = pytest.importorskip("matplotlib.figure")
    saved = []
    original = figure_module.Figure.savefig

    def record(self, path, **kwargs):
        saved.append(self)
        return original(self, path, **kwargs)

    monkeypatch.setattr(figure_module.Figure, "savefig", record)
    return saved


def test_save_report_leaves_zero_spread_out_of_uncertainty_panels(
    tmp_path, monkeypatch
):
    saved = _panels(monkeypatch)
    y_true, mean, std = _data()
    std[[3, 10, 20]] = 0.0  # e.g. the forces on an atom without neighbours
    y_true[[3, 10, 20]] = mean[[3, 10, 20]] + 1.0
    path = tmp_path / "forces.png"
    drawn = plots.save_report(path, "forces", y_true, mean, std, unit="eV/Å")
    assert drawn == "3 components without spread only in the parity plot"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (figure,) = saved
    parity, error, _ = figure.axes
    # all 300 points in the parity plot, 297 in error vs std (one has a zero error)
    assert len(parity.lines[0].get_xdata()) == 300
    assert len(error.collections[0].get_offsets()) == 297 - 1
    title = figure.get_suptitle()
    assert "n = 297, 3 without spread left out" in title
    keep = std > 0
    alpha = plots.metrics.alpha(y_true[keep], mean[keep], std[keep])
    assert f"alpha = {alpha:.3g}" in title
    assert f"RMSE = {plots.metrics.rmse(y_true, mean):.4g} eV/Å" in title


@pytest.mark.parametrize(
    "spread, expected",
    [
        (None, "parity only: one-member model, no uncertainty"),
        (0.0, "parity only: no ensemble spread on any component"),
    ],
)
def test_save_report_without_uncertainty_draws_the_parity_plot(
    tmp_path, monkeypatch, spread, expected
):
    saved = _panels(monkeypatch)
    y_true, mean, std = _data()
    std = None if spread is None else torch.full_like(std, spread)
    path = tmp_path / "energy.png"
    assert plots.save_report(path, "energy", y_true, mean, std, unit="eV") == expected
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (figure,) = saved
    (parity,) = figure.axes
    assert len(parity.lines[0].get_xdata()) == 300
    assert not parity.containers[0].has_yerr
    rmse = plots.metrics.rmse(y_true, mean)
    assert figure.get_suptitle() == f"energy: RMSE = {rmse:.4g} eV"


def test_plot_parity_rejects_negative_std():
    y_true, mean, std = _data()
    std[0] = -1.0
    with pytest.raises(ValueError, match="`std` has entries < 0"):
        plots.plot_parity(_axes(), y_true, mean, std)
