"""Streaming datasets: the frame cache gives back exactly the structures that
``read_structures`` reads, bad frames are named by file and frame, and training from a
streaming dataset (with or without worker processes) gives the in-memory result."""

import csv
import dataclasses
import os
import shutil
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch

from conftest import ETHANOL, SILICON, tiny_config
from shallow_ensemble.config import ConfigError, config_from_dict
from shallow_ensemble.data import DataError, GraphDataset, read_structures
from shallow_ensemble.data.streaming import (
    FrameCache,
    StreamingDataset,
    build_frame_cache,
    count_atoms,
    load_batches,
)
from shallow_ensemble.training import train
from shallow_ensemble.training.checkpoints import read_checkpoint
from shallow_ensemble.training.datasets import load_datasets


DATA = Path(__file__).resolve().parents[2] / "data"


def assert_same_structure(a, b):
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if x is None or y is None:
            assert x is None and y is None, field.name
        elif isinstance(x, np.ndarray):
            assert x.dtype == np.asarray(y).dtype, field.name
            np.testing.assert_array_equal(x, y, err_msg=field.name)
        else:
            assert x == y, field.name


@pytest.mark.parametrize("path", [ETHANOL, SILICON])
def test_cache_gives_back_the_structures(tmp_path, path):
    structures = read_structures(path)
    cache = build_frame_cache(path, tmp_path, {}, progress=False)
    assert len(cache) == len(structures)
    for index in (0, 1, len(structures) // 2, len(structures) - 1):
        assert_same_structure(cache.structure(index), structures[index])
    # frames of any size: the atom offsets are right all the way through
    assert cache.n_atoms.tolist() == [s.n_atoms for s in structures]


def test_optional_fields_and_stress_survive_the_cache(tmp_path):
    frames = ase.io.read(SILICON, ":4")
    frames[1].calc = None  # no energy nor forces on frame 1
    frames[2].info["stress"] = np.arange(6, dtype=float) * 0.01  # a stress on frame 2
    path = tmp_path / "mixed.xyz"
    ase.io.write(path, frames, format="extxyz")
    options = {"require_energy": False, "require_forces": False}
    structures = read_structures(path, **options)
    cache = build_frame_cache(path, tmp_path / "cache", options, progress=False)
    for index, structure in enumerate(structures):
        assert_same_structure(cache.structure(index), structure)
    assert cache.structure(1).energy is None and cache.structure(1).forces is None
    if hasattr(structures[2], "stress"):  # with the stress reader
        assert cache.structure(2).stress is not None
        assert cache.structure(0).stress is None


def test_streaming_graphs_are_the_in_memory_graphs(tmp_path):
    structures = read_structures(SILICON)[:20]
    in_memory = GraphDataset(structures, cutoff=4.0, progress=False)
    cache = build_frame_cache(SILICON, tmp_path, {}, progress=False)
    streaming = StreamingDataset(cache, 4.0, indices=range(20))
    assert len(streaming) == 20
    assert list(streaming.sources) == in_memory.sources
    assert count_atoms(streaming, [3, 5]) == count_atoms(in_memory, [3, 5]) > 0
    for index in (0, 7, 19):
        a, b = streaming[index], in_memory[index]
        for field in dataclasses.fields(a):
            x, y = getattr(a, field.name), getattr(b, field.name)
            assert (x is None and y is None) or torch.equal(x, y), field.name
    # batches built by worker processes are the same batches, in the same order
    batches = [[4, 1, 7], [], [0, 2]]
    streaming.num_workers = 2
    loaded = list(load_batches(streaming, batches))
    expected = list(load_batches(in_memory, batches))
    assert loaded[1] is None and expected[1] is None
    for a, b in ((loaded[0], expected[0]), (loaded[2], expected[2])):
        assert a is not None and b is not None
        assert torch.equal(a.positions, b.positions)
        assert torch.equal(a.centers, b.centers)
        assert torch.equal(a.forces, b.forces)


def test_cache_is_reused_and_rewritten_when_the_file_changes(tmp_path):
    path = tmp_path / "ethanol.xyz"
    ase.io.write(path, ase.io.read(ETHANOL, ":5"), format="extxyz")
    first = build_frame_cache(path, tmp_path / "cache", {}, progress=False)
    again = build_frame_cache(path, tmp_path / "cache", {}, progress=False)
    assert again.folder == first.folder
    other_keys = build_frame_cache(
        path, tmp_path / "cache", {"require_forces": False}, progress=False
    )
    assert other_keys.folder != first.folder
    ase.io.write(path, ase.io.read(ETHANOL, ":7"), format="extxyz")
    changed = build_frame_cache(path, tmp_path / "cache", {}, progress=False)
    assert changed.folder != first.folder and len(changed) == 7
    # no temporary folders left behind
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "name, frame, message",
    [
        ("nan_positions.xyz", None, "positions contain NaN"),
        ("nan_forces.xyz", None, "forces `forces` contain NaN"),
        ("missing_energy.xyz", None, "no energy under key `energy`"),
        ("overlapping_atoms.xyz", None, "closer than"),
        ("not_xyz.xyz", 1, "could not be parsed as extended XYZ"),
        ("truncated.xyz", None, "could not be parsed as extended XYZ"),
        ("empty.xyz", None, "contains no frames"),
    ],
)
def test_bad_frames_are_named_as_by_read_structures(tmp_path, name, frame, message):
    path = DATA / name
    with pytest.raises(DataError) as expected:
        read_structures(path)
    with pytest.raises(DataError, match=message) as error:
        build_frame_cache(path, tmp_path, {}, progress=False)
    text = str(error.value)
    assert str(path) in text
    if "frame" in str(expected.value):
        # the same file and frame as the in-memory reader names
        where = str(expected.value).split(":")[0]
        assert text.startswith(where), (text, str(expected.value))
    if frame is not None:
        assert f"frame {frame} (0-based)" in text
    assert not [p for p in tmp_path.iterdir()], "no partial cache"


def test_bad_frame_in_the_middle_is_named(tmp_path):
    frames = ase.io.read(ETHANOL, ":6")
    frames[4].positions[2] = np.nan
    path = tmp_path / "bad.xyz"
    ase.io.write(path, frames, format="extxyz")
    with pytest.raises(DataError, match=r"bad\.xyz, frame 4 \(0-based\).*atoms \[2\]"):
        build_frame_cache(path, tmp_path / "cache", {}, progress=False)


def _ethanol_files(folder: Path) -> None:
    frames = ase.io.read(ETHANOL, ":30")
    ase.io.write(folder / "train.xyz", frames[:24], format="extxyz")
    ase.io.write(folder / "valid.xyz", frames[24:], format="extxyz")


def _with_data(config, **data):
    return dataclasses.replace(config, data=dataclasses.replace(config.data, **data))


def _losses(folder: Path) -> list[dict[str, str]]:
    with open(folder / "log.csv") as fd:
        rows = list(csv.DictReader(fd))
    for row in rows:
        row.pop("seconds")
    return rows


@pytest.mark.parametrize("workers", [0, 1])
def test_streaming_training_equals_in_memory_training(tmp_path, workers):
    _ethanol_files(tmp_path)
    config = tiny_config(tmp_path, strategy="energy_force_nll")
    train(config, tmp_path / "memory", progress=False, calibrate=False)
    streaming = _with_data(
        config,
        streaming=True,
        num_workers=workers,
        cache_dir=str(tmp_path / "cache"),
    )
    train(streaming, tmp_path / "streaming", progress=False, calibrate=False)
    assert _losses(tmp_path / "streaming") == _losses(tmp_path / "memory")
    assert len(_losses(tmp_path / "memory")) == 2
    expected = read_checkpoint(tmp_path / "memory" / "last.ckpt")["state_dict"]
    state = read_checkpoint(tmp_path / "streaming" / "last.ckpt")["state_dict"]
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_fraction_splits_and_temporary_cache(tmp_path):
    _ethanol_files(tmp_path)
    config = _with_data(
        tiny_config(tmp_path), valid=0.25, test=str(tmp_path / "valid.xyz")
    )
    types, memory = load_datasets(config, progress=False)
    streaming_types, streaming = load_datasets(
        _with_data(config, streaming=True), progress=False
    )
    assert streaming_types == types == [1, 6, 8]
    assert list(streaming) == list(memory) == ["train", "valid", "test"]
    for name, dataset in streaming.items():
        assert isinstance(dataset, StreamingDataset)
        assert list(dataset.sources) == memory[name].sources
    folder = streaming["train"].cache.folder.parent
    assert folder.is_dir() and str(folder) != str(tmp_path / "cache")
    del streaming, dataset
    import gc

    gc.collect()
    assert not folder.exists(), "the temporary cache is removed with its datasets"


def test_unknown_element_in_valid_is_named(tmp_path):
    _ethanol_files(tmp_path)
    shutil.copy(DATA / "unknown_element.xyz", tmp_path / "valid.xyz")
    config = _with_data(tiny_config(tmp_path), streaming=True)
    with pytest.raises(DataError) as error:
        load_datasets(config, progress=False)
    assert "valid.xyz:" in str(error.value)


def test_streaming_options_need_streaming(tmp_path):
    raw = {"data": {"train": "t.xyz", "valid": 0.1, "num_workers": 2}}
    with pytest.raises(ConfigError, match="`data.num_workers` is 2 but"):
        config_from_dict(raw)
    raw["data"]["streaming"] = True
    raw["data"]["num_workers"] = -1
    with pytest.raises(ConfigError, match="`data.num_workers` is -1 but must be"):
        config_from_dict(raw)
    raw["data"]["num_workers"] = 1
    raw["data"]["cache_dir"] = "cache"
    config = config_from_dict(raw, base_dir=tmp_path)
    assert config.data.cache_dir == str((tmp_path / "cache").resolve())


def test_frame_cache_opens_again_in_another_process(tmp_path):
    import pickle

    cache = build_frame_cache(ETHANOL, tmp_path, {}, progress=False)
    copy = pickle.loads(pickle.dumps(cache))
    assert isinstance(copy, FrameCache) and copy.folder == cache.folder
    assert_same_structure(copy.structure(3), cache.structure(3))
    assert os.path.isdir(copy.folder)
