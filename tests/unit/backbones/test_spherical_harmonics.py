"""The TorchScript real spherical harmonics used inside exported models."""

import math
import subprocess
import sys

import numpy as np
import torch

from shallow_ensemble.backbones.spherical_harmonics import SphericalHarmonics


def test_degree_one_closed_form():
    vectors = torch.randn(50, 3, dtype=torch.float64)
    values = SphericalHarmonics(1)(vectors)
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    c1 = math.sqrt(3 / (4 * math.pi))
    torch.testing.assert_close(
        values[:, 0], torch.full((50,), 0.5 / math.sqrt(math.pi), dtype=torch.float64)
    )
    torch.testing.assert_close(values[:, 1:], c1 * unit[:, [1, 2, 0]])


def test_orthonormal_on_the_sphere():
    """Gauss-Legendre in cos(theta) x uniform phi integrates them exactly."""
    l_max = 5
    nodes, weights = np.polynomial.legendre.leggauss(l_max + 2)
    n_phi = 2 * l_max + 2
    phi = 2 * np.pi * np.arange(n_phi) / n_phi
    cos_t, ph = np.meshgrid(nodes, phi, indexing="ij")
    sin_t = np.sqrt(1 - cos_t**2)
    points = np.stack([sin_t * np.cos(ph), sin_t * np.sin(ph), cos_t], axis=-1)
    w = (weights[:, None] * np.full(n_phi, 2 * np.pi / n_phi)[None, :]).reshape(-1)
    values = SphericalHarmonics(l_max)(torch.tensor(points.reshape(-1, 3)))
    gram = values.T @ (torch.tensor(w).unsqueeze(1) * values)
    torch.testing.assert_close(
        gram, torch.eye(gram.shape[0], dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_analytic_gradients_match_autograd():
    module = SphericalHarmonics(4)
    vectors = 3 * torch.randn(30, 3, dtype=torch.float64, requires_grad=True)
    values, gradients = module.compute_with_gradients(vectors.detach())
    torch.testing.assert_close(values, module(vectors).detach())
    for k in (0, 3, 11, 24):
        (grad,) = torch.autograd.grad(module(vectors)[:, k].sum(), vectors)
        torch.testing.assert_close(gradients[:, :, k], grad)


def test_scripted_equals_eager():
    module = SphericalHarmonics(6)
    vectors = torch.randn(20, 3, dtype=torch.float64)
    torch.testing.assert_close(
        torch.jit.script(module)(vectors), module(vectors), rtol=0, atol=0
    )


def test_same_values_as_sphericart():
    """Checked in a subprocess: loading sphericart's library in this process would
    make later exports record it as an extension."""
    script = (
        "import torch, sphericart.torch\n"
        "from shallow_ensemble.backbones import spherical_harmonics as sh\n"
        "v = torch.randn(500, 3, dtype=torch.float64, generator="
        "torch.Generator().manual_seed(0))\n"
        "ours = sh.SphericalHarmonics(6)(v)\n"
        "theirs = sphericart.torch.SphericalHarmonics(6).compute(v)\n"
        "print(float((ours - theirs).abs().max()))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert float(run.stdout.strip().splitlines()[-1]) < 1e-12
