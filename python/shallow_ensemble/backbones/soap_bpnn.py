"""SOAP-BPNN backbone: SOAP power spectrum + one MLP per element.

The architecture of the DPOSE reference work (Kellner & Ceriotti, MLST 2024) and of
metatrain's SOAP-BPNN. The density expansion uses the Laplacian-eigenstate radial basis
of torch-spex (splined, built in float64), real spherical harmonics in plain
TorchScript (:py:mod:`.spherical_harmonics`) and one-hot neighbour species channels.

Member forces take an explicit route: the per-member cotangents are pulled back through
the MLPs and the power spectrum by hand (one matrix product per layer for all members),
then contracted with the explicit pair Jacobian of the density expansion, which is
computed once and shared by all members (see :py:meth:`SoapBpnn.vectors_vjp`).
"""

import math
from typing import TYPE_CHECKING, Any, Dict, List, Tuple

import torch

from ._base import Backbone
from .spherical_harmonics import SphericalHarmonics


if TYPE_CHECKING:
    from ..config import ModelConfig


BLOCK = 8
"""Pairs per block in the member-force route: pairs are grouped by (centre,
neighbour type) slot into blocks of this size, the last one of each slot padded."""


def _spline_tables(
    cutoff: float, max_radial: int, max_angular: int
) -> Tuple[List[int], torch.Tensor, torch.Tensor, float]:
    """Build the Laplacian-eigenstate spline tables in float64 with torch-spex."""
    from spex.radial.physical import LaplacianEigenstates

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        radial = LaplacianEigenstates(
            cutoff=cutoff, max_radial=max_radial, max_angular=max_angular, trim=True
        )
    finally:
        torch.set_default_dtype(default)
    spliner = radial.spliner
    return (
        [int(n) for n in radial.n_per_l],
        spliner.spline_values.to(torch.float64),
        spliner.spline_derivatives.to(torch.float64),
        float(spliner.spline_spacing),
    )


class SoapBpnn(Backbone):
    """SOAP power spectrum features followed by per-element MLPs.

    :param atomic_types: atomic numbers the model handles
    :param cutoff: radial cutoff, angstrom
    :param cutoff_width: width of the smooth cosine switching region, angstrom
    :param max_radial: largest radial index at ``l = 0`` (basis trimmed for higher
        ``l`` by Laplacian eigenvalue, as in torch-spex)
    :param max_angular: largest spherical harmonics degree
    :param hidden_sizes: widths of the MLP layers; the last one is the feature size
        seen by the ensemble heads

    >>> backbone = SoapBpnn([1, 8], cutoff=4.0, max_radial=4, max_angular=3)
    >>> backbone.feature_size
    64
    """

    spline_values: torch.Tensor
    spline_derivatives: torch.Tensor
    feature_shift: torch.Tensor
    feature_scale: torch.Tensor

    def __init__(
        self,
        atomic_types: List[int],
        cutoff: float = 5.0,
        cutoff_width: float = 0.5,
        max_radial: int = 6,
        max_angular: int = 4,
        hidden_sizes: List[int] = [128, 64],  # noqa: B006 (TorchScript needs a list)
    ) -> None:
        super().__init__()
        if len(atomic_types) == 0:
            raise ValueError("`atomic_types` is empty but must name at least one type")
        if not 0 < cutoff_width < cutoff:
            raise ValueError(
                f"`cutoff_width` is {cutoff_width} but must be in (0, cutoff={cutoff})"
            )
        if len(hidden_sizes) == 0:
            raise ValueError("`hidden_sizes` is empty but needs at least one layer")
        self._hypers = {
            "atomic_types": [int(t) for t in atomic_types],
            "cutoff": float(cutoff),
            "cutoff_width": float(cutoff_width),
            "max_radial": int(max_radial),
            "max_angular": int(max_angular),
            "hidden_sizes": [int(h) for h in hidden_sizes],
        }
        self.atomic_types = sorted(int(t) for t in atomic_types)
        self.cutoff = float(cutoff)
        self.cutoff_width = float(cutoff_width)
        self.max_angular = int(max_angular)
        self.n_types = len(self.atomic_types)

        n_per_l, values, derivatives, spacing = _spline_tables(
            cutoff, max_radial, max_angular
        )
        self.n_per_l = n_per_l
        self.spline_spacing = spacing
        self.register_buffer("spline_values", values)
        self.register_buffer("spline_derivatives", derivatives)
        self.spherical_harmonics = SphericalHarmonics(self.max_angular)

        sizes = [(n * self.n_types) ** 2 for n in n_per_l]
        self.descriptor_size = sum(sizes)
        self.register_buffer("feature_shift", torch.zeros(self.descriptor_size))
        self.register_buffer("feature_scale", torch.ones(self.descriptor_size))

        self.feature_size = int(hidden_sizes[-1])
        self.chunk_elements = 2**26
        """Member forces are computed for as many members at once as keep their
        largest intermediate (atoms x descriptor + padded pairs x 3, per member) below
        this many numbers (256 MiB in float32); lower it for very large systems."""
        self.member_chunk = 0
        """Members per chunk for member forces; 0 chooses from ``chunk_elements``."""
        self.mlps = torch.nn.ModuleList(
            [
                self._make_mlp(self.descriptor_size, hidden_sizes)
                for _ in self.atomic_types
            ]
        )

    def hypers(self) -> Dict[str, Any]:
        return {
            key: list(value) if isinstance(value, list) else value
            for key, value in self._hypers.items()
        }

    @classmethod
    def from_config(
        cls, model_config: "ModelConfig", atomic_types: List[int]
    ) -> "SoapBpnn":
        m = model_config
        return cls(
            atomic_types,
            cutoff=m.cutoff,
            cutoff_width=m.cutoff_width,
            max_radial=m.max_radial,
            max_angular=m.max_angular,
            hidden_sizes=list(m.hidden_sizes),
        )

    @staticmethod
    def _make_mlp(n_in: int, hidden_sizes: List[int]) -> torch.nn.Sequential:
        layers: List[torch.nn.Module] = []
        for n_out in hidden_sizes:
            layers.append(torch.nn.Linear(n_in, n_out))
            layers.append(torch.nn.SiLU())
            n_in = n_out
        return torch.nn.Sequential(*layers)

    # ---------------------------------------------------------------- pair level --
    def _radial(self, r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Radial basis times cutoff function, and its derivative, ``(n_pairs, Q)``."""
        h = self.spline_spacing
        x = torch.clamp(r, min=0.0, max=self.cutoff)
        n = torch.floor(x / h).to(torch.long)
        n = torch.clamp(n, max=self.spline_values.shape[0] - 2)
        t = ((x - n * h) / h).unsqueeze(-1)
        p0 = self.spline_values.index_select(0, n)
        p1 = self.spline_values.index_select(0, n + 1)
        m0 = self.spline_derivatives.index_select(0, n) * h
        m1 = self.spline_derivatives.index_select(0, n + 1) * h
        t2 = t * t
        t3 = t2 * t
        values = (
            (2 * t3 - 3 * t2 + 1) * p0
            + (t3 - 2 * t2 + t) * m0
            + (-2 * t3 + 3 * t2) * p1
            + (t3 - t2) * m1
        )
        dvalues = (
            (6 * t2 - 6 * t) * p0
            + (3 * t2 - 4 * t + 1) * m0
            + (-6 * t2 + 6 * t) * p1
            + (3 * t2 - 2 * t) * m1
        ) / h

        onset = self.cutoff - self.cutoff_width
        arg = math.pi * (r - onset) / self.cutoff_width
        inside = r < onset
        beyond = r >= self.cutoff
        fc = torch.where(inside, torch.ones_like(r), 0.5 * (1.0 + torch.cos(arg)))
        fc = torch.where(beyond, torch.zeros_like(r), fc)
        dfc = -0.5 * math.pi / self.cutoff_width * torch.sin(arg)
        dfc = torch.where(inside | beyond, torch.zeros_like(r), dfc)
        fc = fc.unsqueeze(-1)
        dfc = dfc.unsqueeze(-1)
        return values * fc, dvalues * fc + values * dfc

    def _density(
        self,
        vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        species: torch.Tensor,
    ) -> List[torch.Tensor]:
        """Density expansion per ``l``: ``(n_atoms, 2l+1, n_l, n_types)``."""
        n_atoms = species.shape[0]
        r = torch.linalg.vector_norm(vectors, dim=-1)
        radial, _ = self._radial(r)
        sph = self.spherical_harmonics(vectors)
        slot = centers * self.n_types + species.index_select(0, neighbors)
        density: List[torch.Tensor] = []
        q0 = 0
        for ell, n_l in enumerate(self.n_per_l):
            m = 2 * ell + 1
            y_l = sph[:, ell * ell : ell * ell + m]
            r_l = radial[:, q0 : q0 + n_l]
            pair = y_l.unsqueeze(-1) * r_l.unsqueeze(-2)
            c = torch.zeros(
                (n_atoms * self.n_types, m, n_l), dtype=pair.dtype, device=pair.device
            )
            c = c.index_add(0, slot, pair)
            c = c.reshape(n_atoms, self.n_types, m, n_l).permute(0, 2, 3, 1)
            density.append(c)
            q0 += n_l
        return density

    # --------------------------------------------------------------- atom level --
    def _power_spectrum(self, density: List[torch.Tensor]) -> torch.Tensor:
        """Invariant power spectrum, shape ``(..., n_atoms, descriptor_size)``."""
        blocks: List[torch.Tensor] = []
        for ell, c in enumerate(density):
            c = c.flatten(-2)
            ps = torch.einsum("...mq,...mr->...qr", c, c) / math.sqrt(2 * ell + 1)
            blocks.append(ps.flatten(-2))
        return torch.cat(blocks, dim=-1)

    def _mlp(self, descriptor: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """Per-element MLPs on ``(..., n_atoms, descriptor_size)``."""
        descriptor = (descriptor - self.feature_shift) * self.feature_scale
        shape = descriptor.shape[:-1] + (self.feature_size,)
        out = torch.zeros(shape, dtype=descriptor.dtype, device=descriptor.device)
        for i_type, mlp in enumerate(self.mlps):
            idx = torch.nonzero(species == i_type).reshape(-1)
            x = descriptor.index_select(descriptor.dim() - 2, idx)
            out = out.index_copy(out.dim() - 2, idx, mlp(x))
        return out

    def forward(
        self,
        vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        species: torch.Tensor,
    ) -> torch.Tensor:
        density = self._density(vectors, centers, neighbors, species)
        return self._mlp(self._power_spectrum(density), species)

    # ---------------------------------------------------------- member forces --
    @torch.jit.unused
    def vectors_vjp(
        self,
        vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        species: torch.Tensor,
        cotangents: torch.Tensor,
        create_graph: bool = False,
    ) -> torch.Tensor:
        """Pair-vector gradients for all members at once (see :py:class:`Backbone`).

        Cost: one forward pass of power spectrum and MLPs, an explicit backward pass
        of them for all members at once (a matrix product per layer, the cost that
        grows with ``M``), and one contraction per ``l`` with the pair Jacobian of
        the density, which all members share. No loop over members, no autograd
        graph unless ``create_graph``.
        """
        # group the pairs by density slot (center atom, neighbour type) in blocks of
        # BLOCK pairs, padded with vectors beyond the cutoff (whose radial functions
        # and Jacobian are zero), so that batched matmuls over blocks build the
        # density and contract the Jacobian with the members' cotangents
        n_members = cotangents.shape[0]
        n_slots = species.shape[0] * self.n_types
        slot = centers * self.n_types + species.index_select(0, neighbors)
        order = torch.argsort(slot, stable=True)
        sorted_slot = slot.index_select(0, order)
        counts = torch.bincount(slot, minlength=n_slots)
        blocks = (counts + BLOCK - 1) // BLOCK
        first_block = torch.cumsum(blocks, 0) - blocks
        block_slot = torch.repeat_interleave(
            torch.arange(n_slots, device=slot.device), blocks
        )
        rank = torch.arange(slot.shape[0], device=slot.device) - (
            torch.cumsum(counts, 0) - counts
        ).index_select(0, sorted_slot)
        dense_index = first_block.index_select(0, sorted_slot) * BLOCK + rank
        n_blocks = block_slot.shape[0]

        with torch.no_grad():
            padded = vectors.new_zeros((n_blocks * BLOCK, 3))
            padded[:, 0] = 2.0 * self.cutoff
            padded.index_copy_(0, dense_index, vectors.detach().index_select(0, order))
            density, jacobians = self._block_density_and_jacobians(
                padded, block_slot, n_slots
            )

        # members in chunks, so that large systems fit in memory; the density and
        # its Jacobian are shared by all chunks
        chunk = self.member_chunk
        if chunk <= 0:
            per_member = species.shape[0] * self.descriptor_size + n_blocks * BLOCK * 3
            chunk = self.chunk_elements // max(per_member, 1)
        chunk = max(1, min(n_members, chunk))
        results: List[torch.Tensor] = []
        for start in range(0, n_members, chunk):
            with torch.set_grad_enabled(create_graph):
                # per l: (n_slots, (m, n), chunk), differentiable in the parameters
                density_cotangents = self._density_cotangents(
                    density, species, cotangents[start : start + chunk]
                )
            result = torch.zeros(0)
            for ell, jacobian in enumerate(jacobians):
                cotangent = density_cotangents[ell].index_select(0, block_slot)
                if ell == 0:
                    result = torch.bmm(jacobian, cotangent)
                else:
                    result = torch.baddbmm(result, jacobian, cotangent)
            results.append(result)
        result = torch.cat(results, dim=-1).reshape(n_blocks * BLOCK, 3, n_members)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.shape[0], device=order.device)
        grads = result.index_select(0, dense_index.index_select(0, inverse))
        return grads.permute(2, 0, 1)

    def _density_cotangents(
        self,
        density: List[torch.Tensor],
        species: torch.Tensor,
        cotangents: torch.Tensor,
    ) -> List[torch.Tensor]:
        """Backward pass of the MLPs and the power spectrum, for all members.

        :param density: per ``l``, ``(n_atoms, 2l+1, n_l, n_types)``
        :param cotangents: ``(n_members, n_atoms, feature_size)``
        :return: per ``l``, the members' cotangents of the density,
            ``(n_atoms * n_types, (2l+1) * n_l, n_members)`` (slot-major)
        """
        n_members, n_atoms = cotangents.shape[0], species.shape[0]
        x = (self._power_spectrum(density) - self.feature_shift) * self.feature_scale
        grad_descriptor = x.new_zeros((n_members, n_atoms, self.descriptor_size))
        for i_type, mlp in enumerate(self.mlps):
            assert isinstance(mlp, torch.nn.Sequential), "built by _make_mlp"
            idx = torch.nonzero(species == i_type).reshape(-1)
            h = x.index_select(0, idx)
            layers, pre_activations = [], []
            for module in mlp:
                h = module(h)
                if isinstance(module, torch.nn.Linear):
                    layers.append(module)
                    pre_activations.append(h)
                else:
                    assert isinstance(module, torch.nn.SiLU), "SiLU' is hard-coded"
            u = cotangents.index_select(1, idx)
            for i_layer in range(len(layers) - 1, -1, -1):
                z = pre_activations[i_layer]
                sigmoid = torch.sigmoid(z)
                u = u * (sigmoid * (1.0 + z * (1.0 - sigmoid)))  # SiLU'
                weight = layers[i_layer].weight
                if i_layer == 0:  # through the standardisation too
                    weight = weight * self.feature_scale
                u = u @ weight
            grad_descriptor.index_copy_(1, idx, u)

        cotangents_per_l: List[torch.Tensor] = []
        k0 = 0
        for ell, c in enumerate(density):
            _, m, n_l, n_types = c.shape
            q = n_l * n_types
            g = grad_descriptor[..., k0 : k0 + q * q].reshape(n_members, n_atoms, q, q)
            g = (g + g.transpose(-1, -2)) / math.sqrt(2 * ell + 1)
            dc = torch.matmul(c.reshape(n_atoms, m, q), g)  # (M, atoms, m, q)
            dc = dc.reshape(n_members, n_atoms, m, n_l, n_types)
            cotangents_per_l.append(
                dc.permute(1, 4, 2, 3, 0).reshape(n_atoms * n_types, m * n_l, -1)
            )
            k0 += q * q
        return cotangents_per_l

    def _block_density_and_jacobians(
        self, vectors: torch.Tensor, block_slot: torch.Tensor, n_slots: int
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Density and pair Jacobians from pairs laid out in blocks of one slot each.

        :param vectors: ``(n_blocks * BLOCK, 3)``, each block holding pairs of one
            (centre, neighbour type) slot, padded with vectors beyond the cutoff
        :param block_slot: ``(n_blocks,)``, the slot of each block
        :return: per ``l``, the density ``(n_atoms, 2l+1, n_l, n_types)`` as
            :py:meth:`_density` gives it, and the derivative of each pair's density
            contribution, ``(n_blocks, BLOCK * 3, (2l+1) * n_l)``
        """
        n_blocks = block_slot.shape[0]
        n_atoms = n_slots // self.n_types
        r = torch.linalg.vector_norm(vectors, dim=-1)
        radial, dradial = self._radial(r)
        sph, dsph = self.spherical_harmonics.compute_with_gradients(vectors)
        unit = vectors / r.unsqueeze(-1)
        density: List[torch.Tensor] = []
        jacobians: List[torch.Tensor] = []
        q0 = 0
        for ell, n_l in enumerate(self.n_per_l):
            m = 2 * ell + 1
            y = sph[:, ell * ell : ell * ell + m]
            dy = dsph[:, :, ell * ell : ell * ell + m]
            rad = radial[:, q0 : q0 + n_l]
            drad = dradial[:, q0 : q0 + n_l]
            # c[slot, m, n] = sum over the slot's pairs of Y_m R_n
            c = torch.bmm(
                y.reshape(n_blocks, BLOCK, m).transpose(1, 2),
                rad.reshape(n_blocks, BLOCK, n_l),
            )
            c = c.new_zeros((n_slots, m, n_l)).index_add_(0, block_slot, c)
            density.append(c.reshape(n_atoms, self.n_types, m, n_l).permute(0, 2, 3, 1))
            # d/dR [R_n(r) Y_m(R)] = dY_m/dR R_n(r) + r_hat Y_m R_n'(r)
            block = dy.unsqueeze(-1) * rad.reshape(-1, 1, 1, n_l)
            block.addcmul_(
                (unit.unsqueeze(-1) * y.unsqueeze(1)).unsqueeze(-1),
                drad.reshape(-1, 1, 1, n_l),
            )
            jacobians.append(block.reshape(n_blocks, BLOCK * 3, m * n_l))
            q0 += n_l
        return density, jacobians

    @torch.jit.unused
    def fit_normalization(self, graphs: List[List[torch.Tensor]]) -> None:
        """Standardise the power spectrum features on training graphs.

        :param graphs: ``[vectors, centers, neighbors, species]`` of a few structures
        """
        with torch.no_grad():
            descriptors = [
                self._power_spectrum(self._density(*graph)) for graph in graphs
            ]
            all_desc = torch.cat(descriptors, dim=0)
            self.feature_shift.copy_(all_desc.mean(dim=0))
            std = all_desc.std(dim=0) if all_desc.shape[0] > 1 else all_desc.abs()
            scale = 1.0 / torch.clamp(std, min=1e-6 * float(std.max()) + 1e-12)
            self.feature_scale.copy_(scale)
