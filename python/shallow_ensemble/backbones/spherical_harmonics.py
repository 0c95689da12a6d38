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

    q_index: torch.Tensor
    phi_index: torch.Tensor

    def __init__(self, l_max: int) -> None:
        super().__init__()
        if l_max < 0:
            raise ValueError(f"`l_max` is {l_max} but must be non-negative")
        self.l_max = int(l_max)
        # column k = (l, m): its normalisation, the column of q[l][|m|] among the
        # (l, m >= 0) polynomials, and the column of its azimuthal factor among
        # (sin_{l_max} .. sin_1, 1, cos_1 .. cos_{l_max})
        norms: List[float] = []
        q_index: List[int] = []
        phi_index: List[int] = []
        for ell in range(self.l_max + 1):
            for m in range(-ell, ell + 1):
                norms.append(_normalization(ell, abs(m)))
                q_index.append(ell * (ell + 1) // 2 + abs(m))
                phi_index.append(self.l_max + m)
        # a list, not a buffer, that .to(float32) would round for good
        self.norms = norms
        self.register_buffer("q_index", torch.tensor(q_index), persistent=False)
        self.register_buffer("phi_index", torch.tensor(phi_index), persistent=False)

    def _norms(self, like: torch.Tensor) -> torch.Tensor:
        """The normalisations as a tensor. Not ``torch.tensor(self.norms)``, which
        rounds through float32 in TorchScript."""
        parts: List[torch.Tensor] = []
        for value in self.norms:
            parts.append(torch.full([1], value, dtype=like.dtype, device=like.device))
        return torch.cat(parts)

    def _azimuthal(self, x: torch.Tensor, y: torch.Tensor) -> List[torch.Tensor]:
        """``cos_m, sin_m`` = Re and Im of ``(x + i y)^m``, ``m = 0..l_max``."""
        cos_m: List[torch.Tensor] = [torch.ones_like(x)]
        sin_m: List[torch.Tensor] = [torch.zeros_like(x)]
        for m in range(1, self.l_max + 1):
            cos_m.append(x * cos_m[m - 1] - y * sin_m[m - 1])
            sin_m.append(x * sin_m[m - 1] + y * cos_m[m - 1])
        return cos_m + sin_m

    def _legendre(
        self, z: torch.Tensor, with_derivative: bool
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``q[l][m] = P_l^m(z) / (1 - z^2)^{m/2}`` (no Condon-Shortley phase) for
        ``m = 0..l``, as columns ``l (l + 1) / 2 + m``, and their ``z`` derivatives
        (zeros unless ``with_derivative``); one vectorised step per ``l``."""
        z = z.unsqueeze(-1)
        rows: List[torch.Tensor] = [torch.ones_like(z)]
        drows: List[torch.Tensor] = [torch.zeros_like(z)]
        for ell in range(1, self.l_max + 1):
            prev, dprev = rows[ell - 1], drows[ell - 1]
            top = prev[:, ell - 1 :]  # q[l-1][l-1]
            dtop = dprev[:, ell - 1 :]
            parts = [(2 * ell - 1) * z * top, (2 * ell - 1) * top]  # m = l-1, l
            dparts = [(2 * ell - 1) * (top + z * dtop), torch.zeros_like(top)]
            if ell >= 2:  # m = 0 .. l-2, from q[l-1] and q[l-2]
                m = torch.arange(ell - 1, dtype=z.dtype, device=z.device)
                a, b, c = prev[:, : ell - 1], rows[ell - 2], 2 * ell - 1
                low = (c * z * a - (ell + m - 1) * b) / (ell - m)
                parts.insert(0, low)
                if with_derivative:
                    da, db = dprev[:, : ell - 1], drows[ell - 2]
                    dlow = (c * (a + z * da) - (ell + m - 1) * db) / (ell - m)
                    dparts.insert(0, dlow)
                else:
                    dparts.insert(0, torch.zeros_like(low))
            rows.append(torch.cat(parts, dim=-1))
            drows.append(torch.cat(dparts, dim=-1))
        return torch.cat(rows, dim=-1), torch.cat(drows, dim=-1)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        """:param vectors: ``(n, 3)``; :return: ``(n, (l_max + 1)^2)``"""
        r = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
        unit = vectors / r
        trig = self._azimuthal(unit[:, 0], unit[:, 1])
        L = self.l_max
        columns: List[torch.Tensor] = []
        for a in range(L, 0, -1):
            columns.append(trig[L + 1 + a])  # sin_a
        for a in range(L + 1):
            columns.append(trig[a])  # cos_a
        phi = torch.stack(columns, dim=-1)
        q, _ = self._legendre(unit[:, 2], False)
        norms = self._norms(vectors)
        return (
            norms
            * q.index_select(1, self.q_index)
            * phi.index_select(1, self.phi_index)
        )

    @torch.jit.unused
    def compute_with_gradients(
        self, vectors: torch.Tensor, pairs_last: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Values ``(n, K)`` and analytic gradients w.r.t. ``vectors`` ``(n, 3, K)``.

        The polynomials :math:`P(u)` in the unit vector are differentiated term by
        term, then projected onto the sphere:
        :math:`dY/dR = (\\nabla_u P - u (u \\cdot \\nabla_u P)) / r`.
        Used for the explicit pair Jacobian in training (eager only).

        :param pairs_last: return ``(K, n)`` and ``(K, 3, n)`` instead (the same
            numbers, laid out for products that run along the pairs)
        """
        r = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
        unit = vectors / r
        L = self.l_max
        trig = self._azimuthal(unit[:, 0], unit[:, 1])
        cos_m, sin_m = trig[: L + 1], trig[L + 1 :]
        zeros = torch.zeros_like(unit[:, 0])
        # azimuthal factors and their x, y derivatives, columns sin_L..sin_1, 1,
        # cos_1..cos_L: d Re(x+iy)^a = a (Re, -Im)(x+iy)^(a-1), d Im = a (Im, Re)
        phi = torch.stack(sin_m[:0:-1] + cos_m, dim=-1)
        dphi_dx = torch.stack(
            [a * sin_m[a - 1] for a in range(L, 0, -1)]
            + [zeros]
            + [a * cos_m[a - 1] for a in range(1, L + 1)],
            dim=-1,
        )
        dphi_dy = torch.stack(
            [a * cos_m[a - 1] for a in range(L, 0, -1)]
            + [zeros]
            + [-a * sin_m[a - 1] for a in range(1, L + 1)],
            dim=-1,
        )
        q, dq = self._legendre(unit[:, 2], True)
        norms = self._norms(vectors)
        if pairs_last:
            norms = norms.unsqueeze(-1)
            q = norms * q.t().index_select(0, self.q_index)
            dq = norms * dq.t().index_select(0, self.q_index)
            phi, dphi_dx, dphi_dy = (
                t.t().index_select(0, self.phi_index) for t in (phi, dphi_dx, dphi_dy)
            )
            grad_u = torch.stack([q * dphi_dx, q * dphi_dy, dq * phi], dim=1)
            unit = unit.t()  # (3, n)
            radial = (grad_u * unit).sum(dim=1, keepdim=True)  # (K, 1, n)
            return q * phi, (grad_u - unit * radial) / r.t()
        q = norms * q.index_select(1, self.q_index)
        dq = norms * dq.index_select(1, self.q_index)
        phi, dphi_dx, dphi_dy = (
            t.index_select(1, self.phi_index) for t in (phi, dphi_dx, dphi_dy)
        )
        grad_u = torch.stack([q * dphi_dx, q * dphi_dy, dq * phi], dim=1)  # (n, 3, K)
        radial = (unit.unsqueeze(-1) * grad_u).sum(dim=1, keepdim=True)
        grad_r = (grad_u - unit.unsqueeze(-1) * radial) / r.unsqueeze(-1)
        return q * phi, grad_r
