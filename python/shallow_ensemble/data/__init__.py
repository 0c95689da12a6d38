"""Reading, validating, batching and splitting reference data.

:func:`read_structures` turns an extended XYZ file into validated
:class:`Structure` objects (rejecting, among others, atoms closer than
:data:`MIN_DISTANCE`), :class:`GraphDataset` computes their neighbour lists once,
:func:`iterate_batches` yields :class:`Batch` objects for training, and
:func:`train_valid_test` makes reproducible random splits.
"""

from .atomic_types import atomic_types_of, check_atomic_types
from .collate import Batch, batch_indices, collate, iterate_batches
from .dataset import Graph, GraphDataset, build_graph
from .geometry import MIN_DISTANCE
from .readers import DataError, Structure, read_structures
from .splits import split_indices, train_valid_test


__all__ = [
    "MIN_DISTANCE",
    "Batch",
    "DataError",
    "Graph",
    "GraphDataset",
    "Structure",
    "atomic_types_of",
    "batch_indices",
    "build_graph",
    "check_atomic_types",
    "collate",
    "iterate_batches",
    "read_structures",
    "split_indices",
    "train_valid_test",
]
