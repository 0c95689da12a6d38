"""Checkpoints: written atomically, readable without the training configuration."""

from pathlib import Path
from typing import Any

import torch

from ..backbones import SoapBpnn, StackedBackbone
from ..backbones.metatomic_model import MetatomicModelBackbone
from ..errors import ShallowEnsembleError
from ..extended import ExtendedModel
from ..model import EnsembleModel
from .rundir import atomic_write


class CheckpointError(ShallowEnsembleError, ValueError):
    """A file is not a readable shallow-ensemble checkpoint."""


FORMAT = "shallow-ensemble-checkpoint"
VERSION = 1


def model_hypers(model: EnsembleModel) -> dict[str, Any]:
    """Everything needed to rebuild ``model`` before loading its state."""
    backbone = model.backbone
    if isinstance(backbone, MetatomicModelBackbone):
        return {
            "backbone": "metatomic",
            "backbone_hypers": {
                "cutoff": backbone.cutoff,
                "features_output": backbone.features_output,
                "feature_size": backbone.feature_size,
                "model_bytes": backbone.source,
            },
            "num_members": model.num_members,
        }
    if isinstance(backbone, StackedBackbone):
        return {
            "backbone": "stacked_soap_bpnn",
            "backbone_hypers": [dict(b.hypers) for b in backbone.backbones],
            "num_members": model.num_members,
        }
    if not isinstance(backbone, SoapBpnn):
        raise TypeError(f"cannot checkpoint backbone {type(backbone).__name__}")
    return {
        "backbone": "soap_bpnn",
        "backbone_hypers": dict(backbone.hypers),
        "num_members": model.num_members,
    }


def build_model(hypers: dict[str, Any]) -> EnsembleModel:
    """Build an (untrained) model from :py:func:`model_hypers`."""
    kind = hypers.get("backbone")
    if kind == "metatomic":
        h = hypers["backbone_hypers"]
        wrapped = MetatomicModelBackbone.from_bytes(
            h["model_bytes"], h["features_output"]
        )
        return ExtendedModel(wrapped, int(hypers["num_members"]), h["feature_size"])
    if kind == "soap_bpnn":
        backbone = SoapBpnn(**hypers["backbone_hypers"])
    elif kind == "stacked_soap_bpnn":
        backbone = StackedBackbone([SoapBpnn(**h) for h in hypers["backbone_hypers"]])
    else:
        raise CheckpointError(f"unknown backbone '{kind}' in checkpoint")
    return EnsembleModel(backbone, num_members=int(hypers["num_members"]))


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file, then rename: never a half-written file."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(
    path: str | Path, model: EnsembleModel, extra: dict[str, Any] | None = None
) -> None:
    """Save a model (hypers, weights, calibration) and optional training state."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "hypers": model_hypers(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    payload.update(extra or {})
    atomic_save(payload, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint dictionary, with a clear error for other files."""
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
    return payload


def checkpoint_cutoff(path: str | Path) -> float:
    """The cutoff of the model stored in a checkpoint, without building it."""
    hypers = read_checkpoint(path)["hypers"]["backbone_hypers"]
    if isinstance(hypers, list):
        return max(float(h["cutoff"]) for h in hypers)
    return float(hypers["cutoff"])


def load_model(path: str | Path) -> EnsembleModel:
    """Rebuild the model stored in a checkpoint (in its training dtype)."""
    payload = read_checkpoint(path)
    model = build_model(payload["hypers"])
    # convert first: loading float64 weights into float32 parameters would round them
    model = model.to(getattr(torch, payload.get("dtype", "float64")))
    model.head.set_members(
        payload["state_dict"]["head.weight"], payload["state_dict"]["head.bias"]
    )
    model.load_state_dict(payload["state_dict"])
    return model
