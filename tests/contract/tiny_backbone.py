"""A new backbone, registered as the model kind ``pair_gaussians`` through the public
API only: a :py:class:`~shallow_ensemble.backbones.Backbone` (features, hypers, how
to build it from the configuration) and a four-line kind. Training, checkpoints,
Laplace heads, calibration, export and engines then work with no other change.
"""

import math
from typing import Any

import torch

from shallow_ensemble.backbones import Backbone
from shallow_ensemble.kinds import register_kind
from shallow_ensemble.model import BackboneEnsemble


class PairGaussians(Backbone):
    """Per-atom features: tanh of sums of Gaussians of the neighbour distances,
    smoothly switched off at the cutoff (smooth, invariant, scriptable)."""

    def __init__(self, atomic_types: list[int], cutoff: float, widths: list[float]):
        super().__init__()
        self.atomic_types = sorted(atomic_types)
        self.cutoff = float(cutoff)
        self.feature_size = len(widths)
        self.widths = torch.nn.Parameter(torch.tensor(widths))

    def forward(
        self,
        vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        species: torch.Tensor,
    ) -> torch.Tensor:
        r = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
        switch = 0.5 + 0.5 * torch.cos(math.pi * torch.clamp(r / self.cutoff, max=1.0))
        pairs = torch.exp(-((r / self.widths) ** 2)) * switch
        features = pairs.new_zeros((species.shape[0], self.feature_size))
        return torch.tanh(features.index_add(0, centers, pairs))

    def hypers(self) -> dict[str, Any]:
        widths = self.widths.tolist()
        return {
            "atomic_types": self.atomic_types,
            "cutoff": self.cutoff,
            "widths": widths,
        }

    @classmethod
    def from_config(cls, model_config, atomic_types: list[int]) -> "PairGaussians":
        return cls(atomic_types, model_config.cutoff, [0.7, 1.2, 1.8, 2.5])


@register_kind
class PairGaussiansModel(BackboneEnsemble):
    kind = "pair_gaussians"
    backbone_class = PairGaussians
