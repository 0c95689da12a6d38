"""Real spherical harmonics in plain TorchScript.

The exported models evaluate spherical harmonics with this module instead of
sphericart's compiled operator: sphericart-torch 2.0 registers the backward of its
operator from Python only, so an engine that loads the model without importing
``sphericart.torch`` (LAMMPS, the C++ API, i-PI or ASE in a fresh process) would get
silently wrong forces. Plain torch operations have exact gradients of every order in
every engine, and need no compiled extension. The values are those of sphericart
(real harmonics, ``m = -l..l`` within each ``l``); a test checks that they agree.

The recurrences act on the unit vector ``(x, y, z)``: associated Legendre
polynomials divided by ``(1 - z^2)^{m/2}`` in ``z``, times ``Re/Im (x + iy)^m``.
"""

import math
from typing import List, Tuple

import torch


def _normalization(ell: int, m: int) -> float:
    norm = math.sqrt(
        (2 * ell + 1)
        / (4 * math.pi)
        * math.factorial(ell - m)
        / math.factorial(ell + m)
    )
    return norm if m == 0 else math.sqrt(2.0) * norm


class SphericalHarmonics(torch.nn.Module):
    """Real spherical harmonics ``Y_lm(R / |R|)`` for ``l <= l_max``.

    :param l_max: largest degree

    >>> sh = SphericalHarmonics(2)
    >>> sh(torch.tensor([[0.0, 0.0, 2.0]], dtype=torch.float64)).shape
    torch.Size([1, 9])
    """

    def __init__(self, l_max: int) -> None:
        super().__init__()
        if l_max < 0:
            raise ValueError(f"`l_max` is {l_max} but must be non-negative")
        self.l_max = int(l_max)
        norms: List[float] = []
        for ell in range(self.l_max + 1):
            for m in range(-ell, ell + 1):
                norms.append(_normalization(ell, abs(m)))
        self.norms = norms

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        """:param vectors: ``(n, 3)``; :return: ``(n, (l_max + 1)^2)``"""
        r = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
        unit = vectors / r
        x = unit[:, 0]
        y = unit[:, 1]
        z = unit[:, 2]
        ones = torch.ones_like(z)
        # cos_m, sin_m: Re and Im of (x + i y)^m
        cos_m: List[torch.Tensor] = [ones]
        sin_m: List[torch.Tensor] = [torch.zeros_like(z)]
        for m in range(1, self.l_max + 1):
            cos_m.append(x * cos_m[m - 1] - y * sin_m[m - 1])
            sin_m.append(x * sin_m[m - 1] + y * cos_m[m - 1])
        # q[l][m] = P_l^m(z) / (1 - z^2)^{m/2}, without the Condon-Shortley phase
        q: List[List[torch.Tensor]] = []
        for ell in range(self.l_max + 1):
            row: List[torch.Tensor] = []
            for m in range(ell + 1):
                if m == ell:
                    value = ones if ell == 0 else (2 * ell - 1) * q[ell - 1][ell - 1]
                elif m == ell - 1:
                    value = (2 * m + 1) * z * q[ell - 1][m]
                else:
                    value = (
                        (2 * ell - 1) * z * q[ell - 1][m]
                        - (ell + m - 1) * q[ell - 2][m]
                    ) / (ell - m)
                row.append(value)
            q.append(row)
        columns: List[torch.Tensor] = []
        index = 0
        for ell in range(self.l_max + 1):
            for m in range(-ell, ell + 1):
                if m < 0:
                    value = q[ell][-m] * sin_m[-m]
                elif m == 0:
                    value = q[ell][0]
                else:
                    value = q[ell][m] * cos_m[m]
                columns.append(self.norms[index] * value)
                index += 1
        return torch.stack(columns, dim=-1)

    @torch.jit.unused
    def compute_with_gradients(
        self, vectors: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Values ``(n, K)`` and analytic gradients w.r.t. ``vectors`` ``(n, 3, K)``.

        The polynomials :math:`P(u)` in the unit vector are differentiated term by
        term, then projected onto the sphere:
        :math:`dY/dR = (\\nabla_u P - u (u \\cdot \\nabla_u P)) / r`.
        Used for the explicit pair Jacobian in training (eager only).
        """
        r = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
        unit = vectors / r
        x, y, z = unit[:, 0], unit[:, 1], unit[:, 2]
        ones = torch.ones_like(z)
        zeros = torch.zeros_like(z)
        cos_m, sin_m = [ones], [zeros]
        for m in range(1, self.l_max + 1):
            cos_m.append(x * cos_m[m - 1] - y * sin_m[m - 1])
            sin_m.append(x * sin_m[m - 1] + y * cos_m[m - 1])
        q: List[List[torch.Tensor]] = []
        dq: List[List[torch.Tensor]] = []
        for ell in range(self.l_max + 1):
            row, drow = [], []
            for m in range(ell + 1):
                if m == ell:
                    value = ones if ell == 0 else (2 * ell - 1) * q[ell - 1][ell - 1]
                    derivative = zeros
                elif m == ell - 1:
                    value = (2 * m + 1) * z * q[ell - 1][m]
                    derivative = (2 * m + 1) * (q[ell - 1][m] + z * dq[ell - 1][m])
                else:
                    value = (
                        (2 * ell - 1) * z * q[ell - 1][m]
                        - (ell + m - 1) * q[ell - 2][m]
                    ) / (ell - m)
                    derivative = (
                        (2 * ell - 1) * (q[ell - 1][m] + z * dq[ell - 1][m])
                        - (ell + m - 1) * dq[ell - 2][m]
                    ) / (ell - m)
                row.append(value)
                drow.append(derivative)
            q.append(row)
            dq.append(drow)
        values, gradients = [], []
        index = 0
        for ell in range(self.l_max + 1):
            for m in range(-ell, ell + 1):
                a = abs(m)
                if m < 0:  # q * Im (x + iy)^a
                    phi, dphi_dx, dphi_dy = sin_m[a], a * sin_m[a - 1], a * cos_m[a - 1]
                elif m == 0:
                    phi, dphi_dx, dphi_dy = ones, zeros, zeros
                else:  # q * Re (x + iy)^a
                    phi, dphi_dx, dphi_dy = (
                        cos_m[a],
                        a * cos_m[a - 1],
                        -a * sin_m[a - 1],
                    )
                norm = self.norms[index]
                values.append(norm * q[ell][a] * phi)
                gradients.append(
                    norm
                    * torch.stack(
                        [q[ell][a] * dphi_dx, q[ell][a] * dphi_dy, dq[ell][a] * phi],
                        dim=-1,
                    )
                )
                index += 1
        grad_u = torch.stack(gradients, dim=-1)  # (n, 3, K)
        radial = (unit.unsqueeze(-1) * grad_u).sum(dim=1, keepdim=True)
        grad_r = (grad_u - unit.unsqueeze(-1) * radial) / r.unsqueeze(-1)
        return torch.stack(values, dim=-1), grad_r
