"""Checkpoints: written atomically, readable without the training configuration.

A checkpoint stores the model's kind and hyper-parameters
(``hypers = {"kind": ..., **model.hypers()}``, see :py:mod:`shallow_ensemble.kinds`),
its state dict, its dtype and its cutoff, plus whatever training state the trainer
adds. The format has a version: checkpoints written by older versions are upgraded
when read (:py:data:`UPGRADES`), so every checkpoint ever written keeps loading.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import ShallowEnsembleError
from ..kinds import FLOOR_SCALES, NUM_ELEMENTS, ModelKind, get_kind
from .rundir import atomic_write


class CheckpointError(ShallowEnsembleError, ValueError):
    """A file is not a readable shallow-ensemble checkpoint."""


FORMAT = "shallow-ensemble-checkpoint"
VERSION = 3


def model_hypers(model: ModelKind) -> dict[str, Any]:
    """Everything needed to rebuild ``model`` before loading its state: its kind's
    name and hyper-parameters."""
    return {"kind": model.kind, **model.hypers()}


def build_model(hypers: dict[str, Any]) -> ModelKind:
    """Build an (untrained) model from :py:func:`model_hypers`."""
    hypers = dict(hypers)
    kind = get_kind(hypers.pop("kind"))
    return kind.from_hypers(hypers)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file, then rename: never a half-written file."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(
    path: str | Path, model: ModelKind, extra: dict[str, Any] | None = None
) -> None:
    """Save a model (kind, hypers, weights, calibration) and optional training
    state."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "hypers": model_hypers(model),
        "cutoff": float(model.cutoff),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    payload.update(extra or {})
    atomic_save(payload, path)


# ------------------------------------------------------------------- upgrades --
def _upgrade_1_to_2(payload: dict[str, Any]) -> dict[str, Any]:
    """Version 1 named a backbone (``soap_bpnn``, ``stacked_soap_bpnn`` or
    ``metatomic``) with its hypers beside the number of members; version 2 names
    the model kind and stores the cutoff. The wrapped metatomic model's head lost
    its (unused) composition baseline and the model its type lookup."""
    old = payload["hypers"]
    backbone, members = old.get("backbone"), int(old["num_members"])
    hypers = old["backbone_hypers"]
    state = dict(payload["state_dict"])
    if backbone == "soap_bpnn":
        new = {"kind": "soap_bpnn", "backbone": hypers, "num_members": members}
        cutoff = float(hypers["cutoff"])
    elif backbone == "stacked_soap_bpnn":
        new = {
            "kind": "stacked",
            "member_kind": "soap_bpnn",
            "backbones": hypers,
            "num_members": members,
        }
        cutoff = max(float(h["cutoff"]) for h in hypers)
    elif backbone == "metatomic":
        new = {
            "kind": "metatomic",
            "model_bytes": hypers["model_bytes"],
            "features_output": hypers["features_output"],
            "feature_size": int(hypers["feature_size"]),
            "num_members": members,
        }
        cutoff = float(hypers["cutoff"])
        state.pop("type_to_index", None)
        state.pop("head.composition", None)
    else:
        raise CheckpointError(f"unknown backbone '{backbone}' in checkpoint")
    return {
        **payload,
        "version": 2,
        "hypers": new,
        "cutoff": cutoff,
        "state_dict": state,
    }


def _upgrade_2_to_3(payload: dict[str, Any]) -> dict[str, Any]:
    """Version 3 adds the noise floors (buffers ``sigma0_energy``, ``sigma0_atom``
    and ``sigma0_forces``, zero in older models, and their scales, one); the
    calibration dictionary gets the same keys."""
    state = dict(payload["state_dict"])
    zero = torch.zeros_like(state["alpha_energy"])
    state["sigma0_energy"] = zero
    state["sigma0_atom"] = zero.clone()
    state["sigma0_forces"] = zero.new_zeros(NUM_ELEMENTS)
    for name in FLOOR_SCALES:
        state[name] = torch.ones_like(zero)
    upgraded = {**payload, "version": 3, "state_dict": state}
    if isinstance(payload.get("calibration"), dict):
        from ..calibration.predictions import uncalibrated

        upgraded["calibration"] = {**uncalibrated(), **payload["calibration"]}
    return upgraded


#: ``UPGRADES[v]`` turns a version-``v`` checkpoint into a version ``v + 1`` one
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    1: _upgrade_1_to_2,
    2: _upgrade_2_to_3,
}


def upgrade_checkpoint(payload: dict[str, Any], source: str = "") -> dict[str, Any]:
    """A checkpoint dictionary of any version, upgraded to :py:data:`VERSION`."""
    version = payload.get("version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"'{source}' has no valid checkpoint version")
    if version > VERSION:
        raise CheckpointError(
            f"'{source}' is a version-{version} checkpoint, written by a newer "
            f"shallow-ensemble (this one reads versions up to {VERSION}): upgrade "
            "the package"
        )
    while payload["version"] < VERSION:
        payload = UPGRADES[payload["version"]](payload)
    return payload


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint dictionary (upgraded to the current version), with a clear
    error for other files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for corrupt files
        raise CheckpointError(
            f"'{path}' is not a readable checkpoint ({type(error).__name__}: {error})"
        )
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"'{path}' is not a shallow-ensemble checkpoint (exported .pt models are "
            "read with metatomic.torch.load_atomistic_model)"
        )
    return upgrade_checkpoint(payload, str(path))


def checkpoint_cutoff(path: str | Path) -> float:
    """The cutoff of the model stored in a checkpoint, without building it."""
    return float(read_checkpoint(path)["cutoff"])


def load_model(path: str | Path) -> ModelKind:
    """Rebuild the model stored in a checkpoint (in its training dtype)."""
    return model_from_checkpoint(read_checkpoint(path))


def model_from_checkpoint(payload: dict[str, Any]) -> ModelKind:
    """Rebuild the model of a checkpoint dictionary read by
    :py:func:`read_checkpoint` (in its training dtype)."""
    model = build_model(payload["hypers"])
    # convert first: loading float64 weights into float32 parameters would round them
    model = model.to(getattr(torch, payload.get("dtype", "float64")))
    model.load_state_dict(payload["state_dict"])
    return model
