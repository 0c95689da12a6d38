"""Several independent backbones side by side: a deep ensemble as one model.

Member ``k`` of a deep ensemble has its own backbone; stacking their features and
giving the heads a block-diagonal weight matrix (member ``k`` reads only block ``k``)
turns ``N`` independently trained models into one model (the kind ``stacked``,
:py:class:`~shallow_ensemble.model.StackedEnsemble`, which also rebuilds it from
checkpoints) that exports, calibrates and runs in engines like a shallow ensemble.
"""

from typing import List

import torch

from ._base import Backbone


class StackedBackbone(Backbone):
    """Concatenated features of several backbones with the same types and cutoff.

    :param backbones: the member backbones
    """

    def __init__(self, backbones: List[Backbone]) -> None:
        super().__init__()
        if len(backbones) == 0:
            raise ValueError("`backbones` is empty but needs at least one backbone")
        first = backbones[0]
        for other in backbones[1:]:
            if other.atomic_types != first.atomic_types or other.cutoff != first.cutoff:
                raise ValueError("stacked backbones must share atomic types and cutoff")
        self.backbones = torch.nn.ModuleList(backbones)
        self.atomic_types = list(first.atomic_types)
        self.cutoff = float(first.cutoff)
        self.block_size = int(first.feature_size)
        self.feature_size = self.block_size * len(backbones)

    def forward(
        self,
        vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        species: torch.Tensor,
    ) -> torch.Tensor:
        features: List[torch.Tensor] = []
        for backbone in self.backbones:
            features.append(backbone(vectors, centers, neighbors, species))
        return torch.cat(features, dim=-1)

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
        total = None
        for i, backbone in enumerate(self.backbones):
            assert isinstance(backbone, Backbone), "a StackedBackbone holds backbones"
            block = cotangents[..., i * self.block_size : (i + 1) * self.block_size]
            grads = backbone.vectors_vjp(
                vectors, centers, neighbors, species, block, create_graph
            )
            total = grads if total is None else total + grads
        assert total is not None, "__init__ checks that there are backbones"
        return total
