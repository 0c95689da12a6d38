"""SOAP-BPNN backbone: SOAP power spectrum + one MLP per element.

The architecture of the DPOSE reference work (Kellner & Ceriotti, MLST 2024) and of
metatrain's SOAP-BPNN. The density expansion uses the Laplacian-eigenstate radial basis
of torch-spex (splined, built in float64), real spherical harmonics in plain
TorchScript (:py:mod:`.spherical_harmonics`) and one-hot neighbour species channels.

Member forces take an explicit route: the per-member cotangents are pulled back through
the MLPs by hand (one matrix product per layer for all members), through the first
layer and the power spectrum at once by a per-atom matrix built once for all members,
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


BLOCK_MAJOR_MEMBERS = 32
"""From this many members on (or with ``create_graph``), the member-force route
copies the pair Jacobian block by block for one matrix product per block; below, it
takes one product per Cartesian component on strided views (no copy)."""


FOLD_MEMBERS = 8
"""From this many members on, the member-force route folds the first layer and the
power spectrum into one matrix per atom (built once, about the cost of a few
members); below, it pulls each member back through them."""


def _cat(tensors: List[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat`` without the copy of a single tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


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
        self.chunk_elements = 2**22
        """Member forces are computed for as many atoms at once as keep their
        pull-back operators and pair Jacobian, and for as many members at once as
        keep the per-member intermediates, below this many numbers each (16 MiB in
        float32: temporaries that the allocator reuses instead of mapping fresh
        pages at every call)."""
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

        Cost, shared by all members: the density and its pair Jacobian, one forward
        pass of power spectrum and MLPs, and per atom the matrix ``K`` that maps the
        first layer's cotangent to the density's (:py:meth:`_pullback_operators`).
        Per member: the backward pass of the layers after the first, one product
        with ``K`` and one contraction with the Jacobian. No loop over members, no
        autograd graph unless ``create_graph``.
        """
        # group the pairs by density slot (center atom, neighbour type) in blocks of
        # BLOCK pairs, padded with vectors beyond the cutoff (whose radial functions
        # and Jacobian are zero), so that batched matmuls over blocks build the
        # density and contract the Jacobian with the members' cotangents
        n_members, n_atoms = cotangents.shape[0], species.shape[0]
        n_slots = n_atoms * self.n_types
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
            density, factors = self._block_density(padded, block_slot, n_slots)
            descriptor = self._power_spectrum(density)
            descriptor = (descriptor - self.feature_shift) * self.feature_scale

        # atoms in chunks (the blocks of a range of atoms are contiguous), then
        # members in chunks, so that large systems fit in memory
        n_columns = sum((2 * ell + 1) * n for ell, n in enumerate(self.n_per_l))
        # the contraction with the Jacobian: few members take one product per
        # Cartesian component on strided views of it; many members, or a graph
        # (whose backward pass is another product), first copy it block by block
        block_major = create_graph or n_members >= BLOCK_MAJOR_MEMBERS
        fold = n_members >= FOLD_MEMBERS
        mlp = self.mlps[0]
        assert isinstance(mlp, torch.nn.Sequential), "built by _make_mlp"
        first = mlp[0]
        assert isinstance(first, torch.nn.Linear), "built by _make_mlp"
        n_hidden = first.out_features
        # per atom: the pull-back operator and the Jacobian of its pairs
        per_atom = n_columns * (
            self.n_types * n_hidden + 6 * BLOCK * (n_blocks // max(n_atoms, 1) + 1)
        )
        atom_chunk = max(1, min(n_atoms, self.chunk_elements // per_atom))
        block_start = first_block.tolist() + [n_blocks]
        results: List[torch.Tensor] = []
        for a0 in range(0, n_atoms, atom_chunk):
            a1 = min(n_atoms, a0 + atom_chunk)
            b0 = int(block_start[a0 * self.n_types])
            b1 = int(block_start[a1 * self.n_types])
            # the chunk's atoms sorted by type: the pull-back operators of a type
            # are one range of rows; blocks find their slot's row through `rows`
            by_type = torch.argsort(species[a0:a1], stable=True)
            position = torch.empty_like(by_type)
            position[by_type] = torch.arange(a1 - a0, device=by_type.device)
            local_slot = block_slot[b0:b1] - a0 * self.n_types
            rows = (
                position.index_select(0, local_slot // self.n_types) * self.n_types
                + local_slot % self.n_types
            )
            with torch.no_grad():
                pair_jacobian = self._pair_jacobian(factors, b0 * BLOCK, b1 * BLOCK)
            if block_major:  # (blocks, 3 * BLOCK, columns), a transposed copy
                pair_jacobian = (
                    pair_jacobian.reshape(n_columns, 3, b1 - b0, BLOCK)
                    .permute(2, 0, 1, 3)
                    .reshape(b1 - b0, n_columns, 3 * BLOCK)
                    .transpose(1, 2)
                )
            with torch.set_grad_enabled(create_graph):
                operators, layers = self._pullback_operators(
                    [c[a0:a1].index_select(0, by_type) for c in density],
                    descriptor[a0:a1].index_select(0, by_type),
                    species[a0:a1].index_select(0, by_type),
                    fold,
                )
            chunk = self.member_chunk
            if chunk <= 0:
                per_member = (a1 - a0) * (self.n_types * n_columns + n_hidden) + (
                    b1 - b0
                ) * (n_columns + 3 * BLOCK)
                chunk = self.chunk_elements // max(per_member, 1)
            chunk = max(1, min(n_members, chunk))
            member_results: List[torch.Tensor] = []
            for start in range(0, n_members, chunk):
                with torch.set_grad_enabled(create_graph):
                    pulled = self._pull_back(
                        layers,
                        cotangents[start : start + chunk, a0:a1].index_select(
                            1, by_type
                        ),
                    )  # (atoms, members, hidden)
                    slot_cotangents = self._slot_cotangents(
                        operators, pulled, fold
                    ).index_select(0, rows)  # (blocks, columns, members)
                    if block_major:  # (blocks, 3, BLOCK, members)
                        contracted = torch.bmm(pair_jacobian, slot_cotangents)
                        contracted = contracted.reshape(b1 - b0, 3, BLOCK, -1)
                    else:  # (blocks, BLOCK, 3, members)
                        contracted = torch.stack(
                            [
                                torch.bmm(
                                    pair_jacobian[:, x]
                                    .reshape(n_columns, b1 - b0, BLOCK)
                                    .permute(1, 2, 0),
                                    slot_cotangents,
                                )
                                for x in range(3)
                            ],
                            dim=2,
                        )
                    member_results.append(contracted)
            results.append(_cat(member_results, dim=-1))
        result = _cat(results, dim=0)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.shape[0], device=order.device)
        position = dense_index.index_select(0, inverse)
        if block_major:  # (pairs, 3, members)
            grads = result[position // BLOCK, :, position % BLOCK]
        else:
            grads = result.reshape(n_blocks * BLOCK, 3, n_members)
            grads = grads.index_select(0, position)
        return grads.permute(2, 0, 1)  # (members, pairs, 3), a view

    def _pullback_operators(
        self,
        density: List[torch.Tensor],
        descriptor: torch.Tensor,
        species: torch.Tensor,
        fold: bool = True,
    ) -> Tuple[
        List[List[torch.Tensor]], List[Tuple[List[torch.Tensor], List[torch.Tensor]]]
    ]:
        """What the members' backward pass through the MLPs and the power spectrum
        needs, built once for all members, for atoms sorted by type.

        The first layer and the power spectrum are linear in the cotangents, so their
        backward passes fold into one matrix per atom and ``l``:
        ``K[i, (m, t, n), h] = sum_a c_i[m, a] S[a, (n, t), h]``, where ``c`` is the
        density (``a`` runs over radial and neighbour-type channels) and ``S`` the
        first layer's weights (times the standardisation) on the power-spectrum
        block, symmetrised. A member then costs one product with ``K``
        (``types x columns x hidden`` per atom, over all ``l``) instead of one with
        the first layer (``hidden x descriptor``) followed by the power-spectrum
        backward pass; building ``K`` costs about as much as a few members.

        :param density: per ``l``, ``(n_atoms, 2l+1, n_l, n_types)``
        :param descriptor: the standardised power spectrum, ``(n_atoms, descriptor)``
        :param species: sorted
        :param fold: build ``K``; else give, per type, the first layer's weights
            and the density per ``l`` (for few members, where building ``K`` costs
            more than it saves)
        :return: per type present (in order), ``K`` per ``l``,
            ``(n, (2l+1) * n_types * n_l, hidden)``; and per type present the
            activation derivatives of every layer and the weights of the layers
            after the first
        """
        counts = torch.bincount(species, minlength=len(self.mlps)).tolist()
        operators: List[List[torch.Tensor]] = []
        layers: List[Tuple[List[torch.Tensor], List[torch.Tensor]]] = []
        a0 = 0
        for i_type, mlp in enumerate(self.mlps):
            assert isinstance(mlp, torch.nn.Sequential), "built by _make_mlp"
            a1 = a0 + int(counts[i_type])
            if a1 == a0:
                continue
            h = descriptor[a0:a1]
            weights: List[torch.Tensor] = []
            derivatives: List[torch.Tensor] = []
            for module in mlp:
                h = module(h)
                if isinstance(module, torch.nn.Linear):
                    weights.append(module.weight)
                    sigmoid = torch.sigmoid(h)
                    derivatives.append(sigmoid * (1.0 + h * (1.0 - sigmoid)))  # SiLU'
                else:
                    assert isinstance(module, torch.nn.SiLU), "SiLU' is hard-coded"
            layers.append((derivatives, weights[1:]))
            first = weights[0] * self.feature_scale
            n_hidden = first.shape[0]
            if not fold:  # the first layer's weights and the density
                operators.append([first] + [c[a0:a1].flatten(-2) for c in density])
                a0 = a1
                continue
            per_l: List[torch.Tensor] = []
            k0 = 0
            for ell, c in enumerate(density):
                _, m, n_l, n_types = c.shape
                q = n_l * n_types
                w = first[:, k0 : k0 + q * q].reshape(n_hidden, q, q)
                w = (w + w.transpose(1, 2)) / math.sqrt(2 * ell + 1)
                # (a, (t, n, h)) for the output channel b = (n, t)
                w = w.reshape(n_hidden, q, n_l, n_types).permute(1, 3, 2, 0)
                operator = c[a0:a1].reshape(-1, q) @ w.reshape(q, -1)
                per_l.append(operator.reshape(a1 - a0, m * q, n_hidden))
                k0 += q * q
            operators.append(per_l)
            a0 = a1
        return operators, layers

    def _slot_cotangents(
        self, operators: List[List[torch.Tensor]], pulled: torch.Tensor, fold: bool
    ) -> torch.Tensor:
        """The members' cotangents of the density, slot-major.

        :param operators: from :py:meth:`_pullback_operators`
        :param pulled: from :py:meth:`_pull_back`, ``(n_atoms, n_members, hidden)``
        :return: ``(n_atoms * n_types, columns, n_members)``, columns ``(l, m, n)``
        """
        n_atoms, n_members = pulled.shape[0], pulled.shape[1]
        n_columns = sum((2 * ell + 1) * n for ell, n in enumerate(self.n_per_l))
        shape = (n_atoms, self.n_types, n_columns, n_members)
        in_place = not torch.is_grad_enabled()  # else differentiable cats
        result = pulled.new_empty(shape) if in_place else torch.empty(0)
        per_type: List[torch.Tensor] = []
        a0 = 0
        for per_l in operators:
            a1 = a0 + per_l[-1].shape[0]
            v = pulled[a0:a1].transpose(1, 2)  # (n, hidden, members)
            descriptor = torch.empty(0)
            if not fold:  # (n, members, descriptor)
                descriptor = pulled[a0:a1] @ per_l[0]
            parts: List[torch.Tensor] = []
            column, k0 = 0, 0
            for ell, n_l in enumerate(self.n_per_l):
                m, q = 2 * ell + 1, n_l * self.n_types
                if fold:
                    part = torch.bmm(per_l[ell], v).reshape(
                        a1 - a0, m, self.n_types, n_l, n_members
                    )
                    part = part.transpose(1, 2)  # (n, types, m, n_l, members)
                else:  # the power spectrum's backward pass, member by member
                    g = descriptor[..., k0 : k0 + q * q].reshape(-1, n_members, q, q)
                    g = (g + g.transpose(-1, -2)) / math.sqrt(2 * ell + 1)
                    part = torch.matmul(per_l[1 + ell].unsqueeze(1), g)
                    part = part.reshape(a1 - a0, n_members, m, n_l, self.n_types)
                    part = part.permute(0, 4, 2, 3, 1)
                    k0 += q * q
                if in_place:
                    target = result[a0:a1, :, column : column + m * n_l]
                    target.unflatten(2, (m, n_l)).copy_(part)
                else:
                    parts.append(part.reshape(a1 - a0, self.n_types, m * n_l, -1))
                column += m * n_l
            if not in_place:
                per_type.append(_cat(parts, dim=2))
            a0 = a1
        if not in_place:
            result = _cat(per_type, dim=0)
        return result.reshape(n_atoms * self.n_types, n_columns, n_members)

    @staticmethod
    def _pull_back(
        layers: List[Tuple[List[torch.Tensor], List[torch.Tensor]]],
        cotangents: torch.Tensor,
    ) -> torch.Tensor:
        """The members' cotangents of the first layer's outputs (pre-activation).

        :param layers: from :py:meth:`_pullback_operator`
        :param cotangents: ``(n_members, n_atoms, feature_size)``, atoms sorted by
            type
        :return: ``(n_atoms, n_members, hidden)``
        """
        pulled: List[torch.Tensor] = []
        a0 = 0
        for derivatives, weights in layers:
            a1 = a0 + derivatives[0].shape[0]
            u = cotangents[:, a0:a1].transpose(0, 1)  # (n, members, F)
            for i_layer in range(len(derivatives) - 1, 0, -1):
                u = (u * derivatives[i_layer].unsqueeze(1)) @ weights[i_layer - 1]
            pulled.append(u * derivatives[0].unsqueeze(1))
            a0 = a1
        return _cat(pulled, dim=0)

    def _block_density(
        self, vectors: torch.Tensor, block_slot: torch.Tensor, n_slots: int
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Density from pairs laid out in blocks of one slot each, and what the pair
        Jacobian is built from.

        :param vectors: ``(n_blocks * BLOCK, 3)``, each block holding pairs of one
            (centre, neighbour type) slot, padded with vectors beyond the cutoff
        :param block_slot: ``(n_blocks,)``, the slot of each block
        :return: per ``l``, the density ``(n_atoms, 2l+1, n_l, n_types)`` as
            :py:meth:`_density` gives it; and, pairs last, the spherical harmonics
            gradients ``(K, 3, pairs)``, the unit vector times the harmonics
            ``(K, 3, pairs)`` and the radial functions and their derivatives
            ``(Q, 1, pairs)``, for :py:meth:`_pair_jacobian`
        """
        n_blocks = block_slot.shape[0]
        n_atoms = n_slots // self.n_types
        r = torch.linalg.vector_norm(vectors, dim=-1)
        radial, dradial = self._radial(r)
        # (K, pairs) and (K, 3, pairs)
        sph, dsph = self.spherical_harmonics.compute_with_gradients(
            vectors, pairs_last=True
        )
        density: List[torch.Tensor] = []
        q0 = 0
        for ell, n_l in enumerate(self.n_per_l):
            m = 2 * ell + 1
            # c[slot, m, n] = sum over the slot's pairs of Y_m R_n
            c = torch.bmm(
                sph[ell * ell : ell * ell + m]
                .reshape(m, n_blocks, BLOCK)
                .transpose(0, 1),
                radial[:, q0 : q0 + n_l].reshape(n_blocks, BLOCK, n_l),
            )
            c = c.new_zeros((n_slots, m, n_l)).index_add_(0, block_slot, c)
            density.append(c.reshape(n_atoms, self.n_types, m, n_l).permute(0, 2, 3, 1))
            q0 += n_l
        unit = vectors / r.unsqueeze(-1)
        unit_sph = sph.unsqueeze(1) * unit.t()  # (K, 3, pairs)
        radial, dradial = radial.t().unsqueeze(1), dradial.t().unsqueeze(1)
        return density, [dsph, unit_sph, radial, dradial]

    def _pair_jacobian(
        self, factors: List[torch.Tensor], start: int, stop: int
    ) -> torch.Tensor:
        """The derivative of the density contributions of pairs ``start:stop``,
        ``(columns, 3, pairs)``, columns ``(l, m, n)``: built with the pairs last
        (long products) from :py:meth:`_block_density`'s factors."""
        dsph, unit_sph, radial, dradial = (f[..., start:stop] for f in factors)
        n_columns = sum((2 * ell + 1) * n for ell, n in enumerate(self.n_per_l))
        jacobian = dsph.new_empty((n_columns, 3, stop - start))
        q0, column = 0, 0
        for ell, n_l in enumerate(self.n_per_l):
            m = 2 * ell + 1
            # d/dR [R_n(r) Y_m(R)] = dY_m/dR R_n(r) + r_hat Y_m R_n'(r)
            block = jacobian[column : column + m * n_l].view(m, n_l, 3, stop - start)
            torch.mul(
                dsph[ell * ell : ell * ell + m].unsqueeze(1),
                radial[q0 : q0 + n_l],
                out=block,
            )
            block.addcmul_(
                unit_sph[ell * ell : ell * ell + m].unsqueeze(1),
                dradial[q0 : q0 + n_l],
            )
            q0 += n_l
            column += m * n_l
        return jacobian

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
