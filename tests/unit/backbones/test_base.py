"""The generic member-force route of the Backbone contract (batched autograd)."""

import torch

from shallow_ensemble.backbones import Backbone


class PairSum(Backbone):
    """A smooth toy backbone: features from a sum of Gaussians of pair distances."""

    def __init__(self) -> None:
        super().__init__()
        self.cutoff = 3.0
        self.atomic_types = [1]
        self.feature_size = 4
        self.widths = torch.nn.Parameter(torch.tensor([0.5, 1.0, 1.5, 2.0]))

    def forward(self, vectors, centers, neighbors, species):
        r2 = (vectors**2).sum(dim=-1, keepdim=True)
        pair = torch.exp(-r2 / self.widths**2)
        out = torch.zeros((species.shape[0], 4), dtype=vectors.dtype)
        return torch.tanh(out.index_add(0, centers, pair))


def test_default_vjp_equals_a_loop_over_members():
    torch.manual_seed(0)
    backbone = PairSum().double()
    positions = torch.randn(6, 3, dtype=torch.float64)
    centers, neighbors = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    mask = centers != neighbors
    centers, neighbors = centers[mask], neighbors[mask]
    vectors = (positions[neighbors] - positions[centers]).requires_grad_(True)
    species = torch.zeros(6, dtype=torch.long)
    cotangents = torch.randn(5, 6, 4, dtype=torch.float64)

    batched = backbone.vectors_vjp(vectors, centers, neighbors, species, cotangents)
    features = backbone(vectors, centers, neighbors, species)
    loop = torch.stack(
        [
            torch.autograd.grad((features * c).sum(), vectors, retain_graph=True)[0]
            for c in cotangents
        ]
    )
    torch.testing.assert_close(batched, loop)
