"""The backbone contract: systems (as a pair graph) to per-atom last-layer features."""

from typing import TYPE_CHECKING, Any, Dict, List, TypeVar

import torch


if TYPE_CHECKING:
    from ..config import ModelConfig

B = TypeVar("B", bound="Backbone")


class Backbone(torch.nn.Module):
    """Maps a graph of atoms and neighbour pairs to per-atom last-layer features.

    A backbone receives the same inputs whether it runs in training (pairs built from
    positions and cell shifts) or inside an exported metatomic model (pairs read from
    the engine's neighbour list), so that both give identical numbers:

    - ``vectors``: pair vectors :math:`R_{ij} = r_j - r_i` (+ cell shift), shape
      ``(n_pairs, 3)``, in angstrom. Full neighbour list: ``(i, j)`` and ``(j, i)``;
    - ``centers`` and ``neighbors``: atom indices of each pair, shape ``(n_pairs,)``;
    - ``species``: index of each atom's type in :py:attr:`atomic_types`, shape
      ``(n_atoms,)``.

    It returns features of shape ``(n_atoms, feature_size)``. Implementations must be
    smooth functions of ``vectors`` (also where a pair crosses :py:attr:`cutoff`:
    pairs beyond it may be given and must contribute nothing), invariant to rotations
    and permutations, and scriptable with TorchScript. They set :py:attr:`cutoff`,
    :py:attr:`atomic_types` (sorted) and :py:attr:`feature_size`, and implement
    :py:meth:`hypers` (the keyword arguments that rebuild them, for checkpoints) and,
    to be trained from scratch, :py:meth:`from_config`.

    :py:meth:`vectors_vjp` gives, for ``n_members`` cotangents at once, the gradient of
    ``sum_i cotangent[k, i] . features[i]`` with respect to the pair vectors. The
    default uses batched autograd; backbones override it with a cheaper route.
    """

    cutoff: float
    atomic_types: List[int]
    feature_size: int

    def forward(
        self,
        vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        species: torch.Tensor,
    ) -> torch.Tensor:
        raise NotImplementedError

    def hypers(self) -> Dict[str, Any]:
        """Keyword arguments of the constructor that rebuild this backbone (plain
        Python values), for :py:meth:`from_hypers`."""
        raise NotImplementedError

    @classmethod
    def from_hypers(cls: type[B], hypers: Dict[str, Any]) -> B:
        """The backbone of :py:meth:`hypers` (untrained, ready to load a state)."""
        return cls(**hypers)

    @classmethod
    def from_config(
        cls: type[B], model_config: "ModelConfig", atomic_types: List[int]
    ) -> B:
        """A fresh backbone from the ``model`` section of the configuration."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a config")

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
        """Gradients of ``sum_i cotangents[k, i] . features[i]`` w.r.t. ``vectors``.

        :param cotangents: shape ``(n_members, n_atoms, feature_size)``
        :param create_graph: keep the graph, to differentiate the result again (for
            force losses)
        :return: shape ``(n_members, n_pairs, 3)``
        """
        vectors = vectors.detach().requires_grad_(True)
        with torch.enable_grad():
            features = self.forward(vectors, centers, neighbors, species)
            (grads,) = torch.autograd.grad(
                features,
                vectors,
                grad_outputs=cotangents,
                is_grads_batched=True,
                create_graph=create_graph,
            )
        return grads

    @torch.jit.unused
    def fit_normalization(
        self,
        graphs: List[List[torch.Tensor]],
    ) -> None:
        """Fit any data-dependent normalisation on training graphs (optional)."""
        return None
