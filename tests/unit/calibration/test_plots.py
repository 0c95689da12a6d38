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
