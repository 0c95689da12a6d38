"""The output folder of a run: checked before any work, never silently replaced.

A run folder holds ``model.ckpt`` (the finished, calibrated model), ``metrics.json``,
``best.ckpt``, ``last.ckpt`` (resumable state) and ``log.csv``, and for some
strategies sub-folders (protocol stages, deep-ensemble members). The rules:

- a folder that holds any of these is a *previous run*: writing into it needs
  ``resume`` (continue it) or ``overwrite`` (start again);
- ``overwrite`` removes the previous run's outputs before anything else, so an
  interrupted overwrite never leaves an old ``model.ckpt`` looking current;
- every file is written atomically (temporary file, then rename), with the
  permissions the user's umask gives ordinary files; temporaries left behind by a
  killed process are removed when the folder is used again.
"""

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ShallowEnsembleError


#: files a run writes in its folder
RUN_FILES = ("model.ckpt", "metrics.json", "best.ckpt", "last.ckpt", "log.csv")


class OutputError(ShallowEnsembleError, OSError):
    """An output path cannot be used as asked."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> None:
    """Write a file with ``write(temporary path)`` next to ``path``, then rename it
    over ``path``: readers see the old file or the new one, never a half-written
    one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Strict JSON (no NaN literals: non-finite numbers become ``null``), atomic."""
    text = json.dumps(_finite(data), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def clean_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporaries that an interrupted atomic write of a run file
    (:py:data:`RUN_FILES`) left in ``folder``; nothing else is touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [
        path
        for name in RUN_FILES
        for path in folder.glob(f".{name}.*.tmp")
        if path.is_file()
    ]
    for path in stale:
        path.unlink()
    return stale


def previous_run(outdir: Path, subfolders: tuple[str, ...] = ()) -> list[str]:
    """Names of the previous run's outputs found in ``outdir``."""
    found = [name for name in RUN_FILES if (outdir / name).exists()]
    found += [name for name in subfolders if (outdir / name).exists()]
    return found


def check_outdir(path: str | Path) -> Path:
    """Make sure ``path`` is (or can be created as) a writable folder, before any
    expensive work; one clear error otherwise."""
    outdir = Path(path)
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"output folder '{outdir}' is an existing file")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=outdir)
        probe.close()
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputError(f"cannot write to output folder '{outdir}': {reason}")
    return outdir


def prepare_outdir(
    path: str | Path,
    resume: bool,
    overwrite: bool,
    subfolders: tuple[str, ...] = (),
) -> Path:
    """Check the output folder; with ``overwrite``, remove the previous run.

    :param subfolders: sub-folders the run writes (removed on ``overwrite``)
    :raises OutputError: if the folder holds a previous run and neither ``resume``
        nor ``overwrite`` is given, or cannot be written
    """
    outdir = check_outdir(path)
    clean_temporaries(outdir)
    found = previous_run(outdir, subfolders)
    if found and not (resume or overwrite):
        raise OutputError(
            f"'{outdir}' already holds a run ({', '.join(found)}); pass --resume to "
            "continue it or --overwrite to replace it"
        )
    if overwrite and not resume:
        for name in found:
            target = outdir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
    return outdir
