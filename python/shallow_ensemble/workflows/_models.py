"""Models of the workflows: checkpoints, exported models, exporting."""

import os
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from ..kinds import ModelKind


PathLike = str | os.PathLike[str]


def is_torchscript(path: PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (an exported model) rather than a
    ``torch.save`` file (a checkpoint), without loading it.

    :raises FileNotFoundError: if ``path`` is not a file
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"model file '{path}' does not exist")
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def load_model(path: PathLike) -> "ModelKind":
    """Rebuild the model stored in a checkpoint (``model.ckpt`` from ``train``), in
    its training dtype, with its calibration factors.

    This reads checkpoints only. An exported model (``model.pt`` from
    :py:func:`~shallow_ensemble.export.export_model` or ``shallow-ensemble export``)
    is a metatomic TorchScript model: load it with
    ``metatomic.torch.load_atomistic_model(path)`` (or
    :py:func:`shallow_ensemble.export.predict.load_exported`, which also finds an
    ``extensions/`` folder beside it), run it with any metatomic engine, or evaluate
    it with :py:func:`evaluate_model`, which takes either kind of file.
    """
    from ..training.checkpoints import load_model as load_checkpoint

    return load_checkpoint(Path(path))


def export_checkpoint(
    checkpoint: PathLike, output: PathLike = "model.pt", *, dtype: str = "float64"
) -> Path:
    """Export the model of a checkpoint as a metatomic model; return its path.

    :param checkpoint: ``model.ckpt`` written by ``train``
    :param output: the exported file; its folder is created if needed
    :param dtype: ``"float64"`` or ``"float32"``
    :raises IsADirectoryError: if ``output`` is a folder
    :raises OutputError: if ``output``'s folder cannot be created or written
    """
    from ..export import export_model
    from ..training.rundir import check_outdir

    target = Path(output)
    if target.is_dir():
        raise IsADirectoryError(21, "the output is a directory", str(target))
    check_outdir(target.parent)
    return export_model(load_model(checkpoint), target, dtype=dtype)


def is_main_process() -> bool:
    """Whether this process reports results: always, except on the ranks other than
    0 of a ``torchrun`` (``torch.distributed``) run."""

    if "torch.distributed" not in sys.modules:
        return True  # nothing can have initialized it
    import torch.distributed as dist

    return not (dist.is_initialized() and dist.get_rank() != 0)
