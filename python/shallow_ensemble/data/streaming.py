"""Datasets larger than memory: frames read from a cache, neighbour lists per batch.

The in-memory :class:`~shallow_ensemble.data.GraphDataset` holds the neighbour list of
every structure (about 360 KB for a 192-atom water frame). A
:class:`StreamingDataset` holds none: a first pass over the extended XYZ file
(:func:`build_frame_cache`) validates every frame with the same checks as
:func:`~shallow_ensemble.data.read_structures` and writes its arrays once into a
:class:`FrameCache` folder (flat binary files: positions, numbers, forces; small
per-frame arrays: cell, pbc, energy, ...). Graphs are then built on demand, by the same
:func:`~shallow_ensemble.data.build_graph` from the same
:class:`~shallow_ensemble.data.Structure` values, so training gives the same result as
with the in-memory dataset; :func:`load_batches` builds the batches of an epoch,
optionally in worker processes while the model trains.

The per-atom arrays are read with ``os.pread`` (not memory-mapped): the operating
system's page cache keeps them at hand without counting in the training process's
resident memory.
"""

import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from .collate import Batch, collate
from .dataset import PROGRESS_THRESHOLD, Graph, GraphDataset, build_graph
from .readers import (
    DataError,
    Structure,
    _check_file,
    _to_structure,
    read_structures,
)


#: version of the cache layout; a cache of another version is written again
CACHE_VERSION = 1

#: per-atom fields of :class:`Structure`: dtype and shape of one atom's value
PER_ATOM: dict[str, tuple[str, tuple[int, ...]]] = {
    "numbers": ("int64", ()),
    "positions": ("float64", (3,)),
    "forces": ("float64", (3,)),
}


def _per_frame_fields() -> list[str]:
    """Fields of :class:`Structure` stored once per frame (all the others but
    ``source``): fields added to :class:`Structure` are cached with no change here."""
    return [
        f.name
        for f in dataclasses.fields(Structure)
        if f.name not in PER_ATOM and f.name != "source"
    ]


class FrameCache:
    """The validated frames of one extended XYZ file, stored in a folder.

    Written by :func:`build_frame_cache`; reading a frame costs a few system calls.

    :param folder: the cache folder (with ``meta.json``)
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        #: an object that must live as long as the cache (e.g. its temporary folder)
        self.owner: object | None = None
        with open(self.folder / "meta.json") as fd:
            self.meta: dict[str, Any] = json.load(fd)
        self.path: str = self.meta["source"]
        self.offsets: npt.NDArray[np.int64] = np.load(self.folder / "offsets.npy")
        self.n_atoms: npt.NDArray[np.int64] = np.diff(self.offsets)
        self._frame: dict[str, tuple[str, Any, Any]] = {}
        for name, kind in self.meta["per_frame"].items():
            values = np.load(self.folder / f"{name}.npy") if kind != "none" else None
            mask_path = self.folder / f"{name}.mask.npy"
            mask = np.load(mask_path) if mask_path.exists() else None
            self._frame[name] = (kind, values, mask)
        self._atom: dict[str, tuple[int, np.dtype, tuple[int, ...], Any]] = {}
        for name, (dtype, shape) in PER_ATOM.items():
            path = self.folder / f"{name}.bin"
            if not path.exists():
                continue
            descriptor = os.open(path, os.O_RDONLY)
            mask_path = self.folder / f"{name}.mask.npy"
            mask = np.load(mask_path) if mask_path.exists() else None
            self._atom[name] = (descriptor, np.dtype(dtype), shape, mask)
        self._closer = weakref.finalize(
            self, _close, [v[0] for v in self._atom.values()]
        )

    def __reduce__(self) -> tuple[type, tuple[str]]:
        # worker processes started without fork open the folder again
        return (FrameCache, (str(self.folder),))

    def __len__(self) -> int:
        return int(self.n_atoms.shape[0])

    def source(self, index: int) -> str:
        """Where frame ``index`` comes from, ``"path:frame"``, as in
        :attr:`Structure.source`."""
        return f"{self.path}:{index}"

    def numbers(self, index: int) -> npt.NDArray[np.int64]:
        """Atomic numbers of frame ``index``."""
        return self._read_atoms("numbers", index)

    def structure(self, index: int) -> Structure:
        """Frame ``index`` as the :class:`Structure` that
        :func:`~shallow_ensemble.data.read_structures` gives for it."""
        values: dict[str, Any] = {}
        for name, (kind, array, mask) in self._frame.items():
            if kind == "none" or (mask is not None and not mask[index]):
                values[name] = None
            elif kind == "float":
                values[name] = float(array[index])
            else:
                values[name] = np.array(array[index])
        for name in PER_ATOM:
            if name not in self._atom:
                values[name] = None
                continue
            mask = self._atom[name][3]
            absent = mask is not None and not mask[index]
            values[name] = None if absent else self._read_atoms(name, index)
        return Structure(**values, source=self.source(index))

    def _read_atoms(self, name: str, index: int) -> np.ndarray:
        fd, dtype, shape, _ = self._atom[name]
        per_atom = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        start, count = int(self.offsets[index]), int(self.n_atoms[index])
        data = os.pread(fd, count * per_atom, start * per_atom)
        return np.frombuffer(bytearray(data), dtype=dtype).reshape(count, *shape)


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def build_frame_cache(
    path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    options: dict[str, Any],
    *,
    origin: str | None = None,
    progress: bool = True,
) -> FrameCache:
    """Validate every frame of ``path`` and store it in a cache folder under ``root``.

    A cache written before for the same file (same size and modification time) and
    the same ``options`` is reused. A new cache is written into a temporary folder
    renamed when complete, so an interrupted pass leaves no partial cache.

    :param path: extended XYZ file
    :param root: folder holding the caches (created if needed)
    :param options: the keyword arguments of
        :func:`~shallow_ensemble.data.read_structures` (``energy_key``,
        ``forces_key``, ...), applied to every frame
    :param origin: where ``path`` was given, for the message of a missing file
    :param progress: show a progress bar (for more than
        :data:`~shallow_ensemble.data.dataset.PROGRESS_THRESHOLD` frames)
    :return: the cache
    :raises DataError: naming the file and frame (0-based) of the first invalid
        frame, with the same messages as
        :func:`~shallow_ensemble.data.read_structures`
    """
    options = reader_options(options)
    filename = os.path.abspath(os.fspath(path))
    _check_file(os.fspath(path), origin)
    stat = os.stat(filename)
    key = {
        "version": CACHE_VERSION,
        "source": filename,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "options": options,
        "fields": [f.name for f in dataclasses.fields(Structure)],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    root = Path(root)
    folder = root / f"{Path(filename).name}-{digest[:16]}"
    if (folder / "meta.json").exists():
        return FrameCache(folder)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder.name}-"))
    try:
        _write_cache(filename, tmp, options, key, progress)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process wrote the same cache meanwhile
            if not (folder / "meta.json").exists():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FrameCache(folder)


def reader_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` completed with the defaults of
    :func:`~shallow_ensemble.data.read_structures` (all but ``path`` and
    ``origin``).

    :raises TypeError: if an option is not an argument of ``read_structures``
    """
    parameters = inspect.signature(read_structures).parameters
    defaults = {
        name: parameter.default
        for name, parameter in parameters.items()
        if name not in ("path", "origin")
    }
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(
            f"`{unknown[0]}` is not an option of read_structures: {', '.join(defaults)}"
        )
    return {**defaults, **options}


def _write_cache(
    filename: str,
    folder: Path,
    options: dict[str, Any],
    key: dict[str, Any],
    progress: bool,
) -> None:
    """The first pass: validate every frame and write its arrays into ``folder``."""
    n_frames = count_frames(filename)
    files = {name: open(folder / f"{name}.bin", "wb") for name in PER_ATOM}
    masks: dict[str, list[bool]] = {name: [] for name in PER_ATOM}
    per_frame: dict[str, list[Any]] = {name: [] for name in _per_frame_fields()}
    n_atoms: list[int] = []
    bar = tqdm(
        total=n_frames,
        desc=f"validating {os.path.basename(filename)}",
        unit="frame",
        disable=not progress or n_frames <= PROGRESS_THRESHOLD,
    )
    try:
        for structure in _iter_structures(filename, options):
            n_atoms.append(structure.n_atoms)
            for name, (dtype, shape) in PER_ATOM.items():
                value = getattr(structure, name)
                masks[name].append(value is not None)
                if value is None:
                    value = np.zeros((structure.n_atoms, *shape))
                files[name].write(np.ascontiguousarray(value, dtype=dtype).tobytes())
            for name, values in per_frame.items():
                values.append(getattr(structure, name))
            bar.update()
    finally:
        bar.close()
        for file in files.values():
            file.close()
    offsets = np.concatenate([[0], np.cumsum(n_atoms, dtype=np.int64)])
    np.save(folder / "offsets.npy", offsets.astype(np.int64))
    for name, mask in masks.items():
        if not any(mask):
            os.remove(folder / f"{name}.bin")
        elif not all(mask):
            np.save(folder / f"{name}.mask.npy", np.array(mask, dtype=np.bool_))
    kinds = {name: _save_per_frame(folder, name, v) for name, v in per_frame.items()}
    meta = {**key, "n_frames": len(n_atoms), "per_frame": kinds}
    with open(folder / "meta.json", "w") as fd:
        json.dump(meta, fd, indent=1)


def _save_per_frame(folder: Path, name: str, values: list[Any]) -> str:
    """Store one per-frame field; its kind: ``float``, ``array`` or ``none``."""
    present = [v for v in values if v is not None]
    if not present:
        return "none"
    kind = "float" if isinstance(present[0], float) else "array"
    template = np.asarray(present[0])
    stacked = np.stack(
        [np.zeros_like(template) if v is None else np.asarray(v) for v in values]
    )
    np.save(folder / f"{name}.npy", stacked)
    if len(present) < len(values):
        mask = np.array([v is not None for v in values], dtype=np.bool_)
        np.save(folder / f"{name}.mask.npy", mask)
    return kind


def count_frames(filename: str) -> int:
    """Number of frames of an extended XYZ file, from its headers alone.

    :raises DataError: naming the frame whose header (number of atoms) is invalid
    """
    frame = 0
    with open(filename, encoding="utf-8", errors="replace") as file:
        line = file.readline()
        while line.strip() != "":
            try:
                n_atoms = int(line)
            except ValueError:
                n_atoms = -1
            if n_atoms < 0:
                raise DataError(
                    f"{filename}, frame {frame} (0-based): could not be parsed as "
                    f"extended XYZ: the first line of a frame must be its number of "
                    f"atoms, not {line.strip()!r}"
                )
            for _ in range(n_atoms + 1):
                file.readline()
            line = file.readline()
            while line.lstrip().startswith("VEC"):
                line = file.readline()
            frame += 1
    if frame == 0:
        raise DataError(
            f"{filename}: the file contains no frames; it must hold at least one "
            "extended XYZ frame"
        )
    return frame


def _iter_structures(filename: str, options: dict[str, Any]) -> Iterator[Structure]:
    """Validated structures of ``filename``, read one frame at a time."""
    frames = ase.io.iread(filename, ":", format="extxyz")
    index = 0
    while True:
        try:
            atoms = next(frames)
        except StopIteration:
            return
        except Exception as error:  # ASE raises many different exception types
            raise DataError(
                f"{filename}, frame {index} (0-based): could not be parsed as "
                f"extended XYZ: {error}"
            ) from error
        where = f"{filename}, frame {index} (0-based)"
        yield _to_structure(atoms, where, f"{filename}:{index}", **options)
        index += 1


class _LazyGraphs(Sequence[Graph]):
    """The graphs of a :class:`StreamingDataset`, built when asked for."""

    def __init__(self, dataset: "StreamingDataset") -> None:
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._dataset[i] for i in range(len(self))[index]]
        return self._dataset[index]


class _Sources(Sequence[str]):
    """``path:frame`` of each structure of a :class:`StreamingDataset`."""

    def __init__(self, cache: FrameCache, indices: npt.NDArray[np.int64]) -> None:
        self._cache, self._indices = cache, indices

    def __len__(self) -> int:
        return int(self._indices.shape[0])

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        return self._cache.source(int(self._indices[index]))


class StreamingDataset(GraphDataset):
    """Frames of a :class:`FrameCache` whose neighbour lists are built on access.

    A drop-in :class:`~shallow_ensemble.data.GraphDataset`: ``dataset[i]`` is the
    same :class:`~shallow_ensemble.data.Graph` (built by the same function from the
    same values), ``sources`` names the frames and ``graphs`` iterates over them, but
    nothing is kept in memory beyond a few numbers per frame.

    :param cache: the frames
    :param cutoff: neighbour-list cutoff radius, Å
    :param indices: the frames of ``cache`` in this dataset, in order (default: all)
    :param dtype: floating-point dtype of the graphs' float tensors
    :param num_workers: worker processes that :func:`load_batches` uses to build
        batches (0: in the calling process)

    >>> import tempfile
    >>> from importlib.resources import files
    >>> from shallow_ensemble.data import GraphDataset, read_structures
    >>> path = files("shallow_ensemble") / "resources" / "ethanol.xyz"
    >>> folder = tempfile.mkdtemp()
    >>> cache = build_frame_cache(path, folder, {}, progress=False)
    >>> dataset = StreamingDataset(cache, cutoff=5.0, indices=[0, 1, 2])
    >>> in_memory = GraphDataset(read_structures(str(path))[:3], cutoff=5.0)
    >>> bool((dataset[2].centers == in_memory[2].centers).all())
    True
    """

    def __init__(
        self,
        cache: FrameCache,
        cutoff: float,
        indices: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float64,
        num_workers: int = 0,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"`num_workers` is {num_workers} but must be at least 0")
        self.cache = cache
        self.cutoff = float(cutoff)
        self.dtype = dtype
        self.num_workers = num_workers
        if indices is None:
            self.indices = np.arange(len(cache), dtype=np.int64)
        else:
            self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self.n_atoms = cache.n_atoms[self.indices]
        self.sources = _Sources(cache, self.indices)
        self.graphs = _LazyGraphs(self)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, index: int) -> Graph:
        frame = int(self.indices[index])
        return build_graph(self.cache.structure(frame), self.cutoff, self.dtype)

    def numbers(self) -> Iterator[Any]:
        """Objects with the ``numbers`` and ``source`` of each frame, for
        :func:`~shallow_ensemble.data.check_atomic_types` (reads no positions)."""
        for frame in self.indices.tolist():
            yield _Numbers(self.cache.numbers(frame), self.cache.source(frame))

    def atomic_types(self) -> list[int]:
        """Sorted distinct atomic numbers of the frames."""
        found: set[int] = set()
        for item in self.numbers():
            found.update(np.unique(item.numbers).tolist())
        return sorted(found)


@dataclasses.dataclass
class _Numbers:
    numbers: npt.NDArray[np.int64]
    source: str


def count_atoms(dataset: GraphDataset, indices: Iterable[int]) -> int:
    """Total number of atoms of the structures ``indices`` of ``dataset`` (without
    building graphs for a :class:`StreamingDataset`)."""
    if isinstance(dataset, StreamingDataset):
        return int(dataset.n_atoms[list(indices)].sum())
    return sum(dataset[i].n_atoms for i in indices)


class _Batches(torch.utils.data.Dataset[Any]):
    """Batch ``k`` of a list of index lists (``None`` for an empty list); with
    ``pack``, as numpy arrays (:func:`_pack`)."""

    def __init__(
        self, dataset: GraphDataset, batches: Sequence[Sequence[int]], pack: bool
    ) -> None:
        self.dataset, self.batches, self.pack = dataset, batches, pack

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> Any:
        indices = self.batches[k]
        if len(indices) == 0:
            return None
        batch = collate([self.dataset[i] for i in indices])
        return _pack(batch) if self.pack else batch


def _pack(batch: Batch) -> dict[str, np.ndarray | None]:
    """A batch's tensors as numpy arrays: a worker process sends them pickled
    through its pipe, much faster for small batches than torch's shared memory
    (one shared segment per tensor)."""
    return {
        field.name: None if value is None else value.numpy()
        for field in dataclasses.fields(Batch)
        for value in [getattr(batch, field.name)]
    }


def _unpack(packed: dict[str, np.ndarray | None] | None) -> Batch | None:
    if packed is None:
        return None
    tensors: dict[str, Any] = {
        k: None if v is None else torch.from_numpy(v) for k, v in packed.items()
    }
    return Batch(**tensors)


def _identity(batch: Any) -> Any:
    return batch


def load_batches(
    dataset: GraphDataset, batches: Sequence[Sequence[int]]
) -> Iterator[Batch | None]:
    """The batches of ``batches`` (index lists), in order; ``None`` for an empty one.

    A :class:`StreamingDataset` with ``num_workers > 0`` builds them in that many
    worker processes (a :py:class:`torch.utils.data.DataLoader`, a few batches
    ahead) while the caller uses the earlier ones; otherwise they are built when the
    caller asks for them. Either way the batches are the same, and no random numbers
    are drawn from torch's global generator.

    :param dataset: the structures
    :param batches: indices of the structures of each batch
    :return: an iterator over the batches
    """
    workers = getattr(dataset, "num_workers", 0)
    if workers == 0 or len(batches) < 2:
        source = _Batches(dataset, batches, pack=False)
        return (source[k] for k in range(len(source)))
    source = _Batches(dataset, batches, pack=True)
    loader = torch.utils.data.DataLoader(
        source,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_identity,
        generator=torch.Generator(),  # the workers' seeds: not the global generator
    )
    return (_unpack(packed) for packed in loader)
