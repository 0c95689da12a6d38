"""Shallow-ensemble heads: ``n_members`` linear read-outs of shared atom features.

:py:class:`LinearHeads` holds what every head has (the member weights and biases, the
fixed energy scale, member cotangents, replacing the members); the two heads add it
to different per-atom terms, each with its own ``forward``:

- :py:class:`ShallowEnsembleHead`: a per-type composition baseline (models trained
  here);
- :py:class:`ResidualEnsembleHead`: the per-atom energy of a wrapped model (the
  wrapped model's energy is the ensemble mean).
"""

import torch


class LinearHeads(torch.nn.Module):
    """``n_members`` scaled linear read-outs ``s (w_k . f_i + b_k)`` of per-atom
    features (no ``forward``: the heads below add them to a per-atom term).

    :param feature_size: size of the per-atom features
    :param num_members: number of ensemble members ``M`` (1 for a deterministic model)
    """

    energy_scale: torch.Tensor

    def __init__(self, feature_size: int, num_members: int) -> None:
        super().__init__()
        if num_members < 1:
            raise ValueError(
                f"`num_members` is {num_members} but must be a positive integer"
            )
        self.num_members = int(num_members)
        self.feature_size = int(feature_size)
        self.weight = torch.nn.Parameter(
            torch.randn(num_members, feature_size) / feature_size**0.5
        )
        self.bias = torch.nn.Parameter(torch.zeros(num_members))
        self.register_buffer("energy_scale", torch.ones(()))

    def deltas(self, features: torch.Tensor) -> torch.Tensor:
        """``s (w_k . f_i + b_k)``, ``(n_atoms, n_members)``, eV."""
        return self.energy_scale * (features @ self.weight.T + self.bias)

    def member_cotangents(self) -> torch.Tensor:
        """Gradient of each member's energy w.r.t. one atom's features, ``(M, F)``."""
        return self.energy_scale * self.weight

    @torch.jit.unused
    def set_members(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Replace the heads (e.g. by samples from a posterior), changing ``M``."""
        if weight.ndim != 2 or weight.shape[1] != self.feature_size:
            raise ValueError(
                f"`weight` has shape {tuple(weight.shape)} but must be "
                f"(n_members, {self.feature_size})"
            )
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"`bias` has shape {tuple(bias.shape)} but must be ({weight.shape[0]},)"
            )
        device, dtype = self.weight.device, self.weight.dtype
        self.weight = torch.nn.Parameter(weight.detach().to(device, dtype).clone())
        self.bias = torch.nn.Parameter(bias.detach().to(device, dtype).clone())
        self.num_members = int(weight.shape[0])


class ShallowEnsembleHead(LinearHeads):
    """``n_members`` linear heads and a per-type composition baseline.

    Member ``k`` gives the per-atom energy
    :math:`e_{ik} = s\\,(w_k \\cdot f_i + b_k) + c_{Z_i}`, where :math:`s` is a fixed
    energy scale (set from the training data) and :math:`c_Z` the composition
    baseline (least squares on the training energies); both are shared by all members,
    so the ensemble spread comes from the heads alone.

    :param feature_size: size of the per-atom features
    :param num_members: number of ensemble members ``M`` (1 for a deterministic model)
    :param n_types: number of atomic types (rows of the composition baseline)

    >>> head = ShallowEnsembleHead(feature_size=8, num_members=4, n_types=2)
    >>> head(torch.ones(3, 8), torch.tensor([0, 1, 1])).shape
    torch.Size([3, 4])
    """

    composition: torch.Tensor

    def __init__(self, feature_size: int, num_members: int, n_types: int) -> None:
        super().__init__(feature_size, num_members)
        self.register_buffer("composition", torch.zeros(n_types))

    def forward(self, features: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """Per-atom member energies.

        :param features: ``(n_atoms, feature_size)``
        :param species: type index of each atom, ``(n_atoms,)``
        :return: ``(n_atoms, n_members)``, eV
        """
        energies = self.deltas(features)
        return energies + self.composition.index_select(0, species).unsqueeze(-1)


class ResidualEnsembleHead(LinearHeads):
    """Member deviations added to a base per-atom energy.

    ``e_ik = base_i + s (w_k . f_i + b_k)``; the weights start at zero (a single
    member equal to the base model). There is no composition baseline: the base
    energy already contains the wrapped model's own.

    >>> head = ResidualEnsembleHead(feature_size=8, num_members=4)
    >>> head(torch.ones(3, 8), torch.tensor([1.0, 2.0, 3.0]))[:, 0].tolist()
    [1.0, 2.0, 3.0]
    """

    def __init__(self, feature_size: int, num_members: int) -> None:
        super().__init__(feature_size, num_members)
        with torch.no_grad():
            self.weight.zero_()

    def forward(self, features: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Per-atom member energies ``(n_atoms, n_members)`` from features and base
        energies ``(n_atoms,)``."""
        return base.unsqueeze(-1) + self.deltas(features)
