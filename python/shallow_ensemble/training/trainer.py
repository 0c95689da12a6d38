"""``train``, which runs the stages of a preset, each with the one training loop.

Every ``training.strategy`` is a list of stages (:py:mod:`.presets`); each stage
obtains its model (its start), runs the loop (:py:func:`.loop.run_epochs`) unless it
trains nothing, calibrates the model and writes its folder. Nothing here prints:
progress bars are shown with ``progress=True``, and messages go to the
``logging`` logger of this module.
"""

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..data import GraphDataset
from ..errors import TrainingError
from .checkpoints import (
    checkpoint_cutoff,
    model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from .datasets import load_datasets
from .distributed import Workers, init_workers
from .loop import run_epochs
from .presets import preset_stages, stage_subfolders
from .results import (
    TrainResult,
    finalize,
    read_log,
    run_summary,
    written_result,
)
from .rundir import atomic_write, prepare_outdir, write_json
from .stages import BUILDS_ON_A_MODEL, Context, Objective, Stage, start_model


logger = logging.getLogger(__name__)


def train(
    config: Config,
    outdir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    on_epoch_end: Callable[[int], None] | None = None,
    progress: bool = True,
    calibrate: bool = True,
) -> TrainResult:
    """Run the stages of ``config.training.strategy``; keep the best model on
    validation, calibrate it, write checkpoints.

    Writes ``OUTDIR/model.ckpt`` (best, calibrated), ``OUTDIR/last.ckpt`` (full
    training state after every epoch, for ``resume``), ``OUTDIR/log.csv`` and
    ``OUTDIR/metrics.json``. A preset of several stages writes them in the
    folder of each stage (``OUTDIR/1-mse/``, ... for ``protocol``,
    ``OUTDIR/members/NN/`` for the members of ``deep_ensemble``); the final model
    and ``metrics.json`` (with the cost and ``best_epoch`` of every stage under
    ``stages``) are then in ``OUTDIR``. On ``resume``, a finished stage (its
    ``model.ckpt``) is reused and an interrupted one continues.

    :param config: validated configuration
    :param outdir: output folder
    :param resume: continue from ``OUTDIR/last.ckpt`` (the stages' for a preset of
        several stages)
    :param overwrite: start again even if ``OUTDIR`` holds a training
    :param on_epoch_end: called with the epoch index (from 0, in its stage) after
        each epoch's checkpoint
    :param progress: show progress bars
    :param calibrate: fit the calibration factors of the final model (if
        ``config.calibration`` says so)
    """
    t = config.training
    device = torch.device(t.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(
            f"`training.device` is '{t.device}' but CUDA is not available to torch "
            f"{torch.__version__} (a CPU build, or no GPU visible)"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise TrainingError(
            f"`training.device` is '{t.device}' but only "
            f"{torch.cuda.device_count()} CUDA device(s) are visible"
        )
    stages = preset_stages(config)
    workers = init_workers(device)
    device = workers.device  # under torchrun with CUDA, the GPU of LOCAL_RANK
    outdir = Path(outdir)
    if workers.is_main:
        prepare_outdir(outdir, resume, overwrite, stage_subfolders(stages))
    workers.barrier()
    run = _Run(config, workers, device, progress and workers.is_main, on_epoch_end)
    if len(stages) == 1 and stages[0].folder == ".":
        stage = stages[0]
        return _run_stage(run, stage, outdir, resume, calibrate and stage.calibrate)
    return _run_stages(run, stages, outdir, resume, calibrate)


def run_protocol(
    config: Config,
    outdir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """The stages of ``strategy: protocol`` (:py:func:`train` runs them for that
    strategy; kept for callers of the former function)."""
    if config.training.strategy != "protocol":
        training = dataclasses.replace(config.training, strategy="protocol")
        config = dataclasses.replace(config, training=training)
    return train(config, outdir, resume=resume, overwrite=overwrite, progress=progress)


@dataclass
class _Run:
    """What every stage of one call to :py:func:`train` shares."""

    config: Config
    workers: Workers
    device: torch.device
    progress: bool
    on_epoch_end: Callable[[int], None] | None
    datasets: dict[float | None, tuple[list[int], dict[str, GraphDataset]]] = field(
        default_factory=dict
    )

    def load_datasets(
        self, cutoff: float | None
    ) -> tuple[list[int], dict[str, GraphDataset]]:
        """The datasets with neighbour lists of ``cutoff``, read once per run."""
        if cutoff not in self.datasets:
            self.datasets[cutoff] = load_datasets(self.config, cutoff, self.progress)
        return self.datasets[cutoff]


def _run_stages(
    run: _Run, stages: list[Stage], outdir: Path, resume: bool, calibrate: bool
) -> TrainResult:
    """Every stage in its folder, each starting from the ones before."""
    config, workers = run.config, run.workers
    previous: list[Path] = []
    costs: dict[str, dict[str, Any]] = {}
    result: TrainResult | None = None
    for index, stage in enumerate(stages):
        final = index == len(stages) - 1
        folder = outdir / stage.folder
        path = folder / "model.ckpt"
        if resume and path.exists():
            done = read_checkpoint(path)
            _check_same_run(done, config, stage, path)
            costs[stage.folder] = _cost(done)
            previous.append(path)
            if final and stage.folder == ".":
                result = _finished_result(config, stage, folder)
            continue
        stage_resume = resume and (folder / "last.ckpt").exists()
        if stage.folder != "." and workers.is_main:
            prepare_outdir(folder, stage_resume, not stage_resume)
        workers.barrier()
        logger.info(
            "stage %d/%d: %s in '%s'%s",
            index + 1,
            len(stages),
            stage.name,
            folder,
            " (resumed)" if stage_resume else "",
        )
        stage_calibrate = stage.calibrate and (calibrate or not final)
        result = _run_stage(run, stage, folder, stage_resume, stage_calibrate, previous)
        costs[stage.folder] = _cost(read_checkpoint(result.checkpoint))
        previous.append(result.checkpoint)

    if stages[-1].folder == ".":
        assert result is not None, "the final stage ran or was reused"
        return result
    # the final model is the last stage's, copied into OUTDIR with a summary
    ran_last = result is not None and result.checkpoint == previous[-1]
    final_state = read_checkpoint(previous[-1])
    per_stage = {stage.name: costs[stage.folder] for stage in stages}
    summary = run_summary(final_state)
    summary["strategy"] = config.training.strategy
    summary["stages"] = per_stage
    summary["train_seconds"] = sum(c["seconds"] for c in per_stage.values())
    summary["epochs"] = sum(c["epochs"] for c in per_stage.values())
    summary.pop("best_epoch")  # one per stage
    path = outdir / "model.ckpt"
    if workers.is_main:
        write_json(outdir / "metrics.json", summary)
        atomic_write(path, lambda tmp: shutil.copyfile(previous[-1], tmp))
    workers.barrier()
    return TrainResult(
        result.model
        if ran_last and result is not None
        else model_from_checkpoint(final_state),
        path,
        result.history if ran_last and result is not None else [],
        final_state["calibration"],
        final_state["metrics"],
        summary["train_seconds"],
        {**final_state["info"], "stages": per_stage},
    )


def _cost(payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "seconds": payload["train_seconds"],
        "epochs": payload["epochs"],
        "best_epoch": payload.get("best_epoch"),
    }


def _check_same_run(
    payload: dict[str, Any], config: Config, stage: Stage, path: Path
) -> None:
    """A run continues only with the configuration (and stage) it was started
    with."""
    if (
        payload.get("config") != config.to_dict()
        or payload.get("stage") != stage.to_dict()
    ):
        raise TrainingError(
            f"cannot resume: the configuration differs from the one in '{path}'"
        )


def _run_stage(
    run: _Run,
    stage: Stage,
    outdir: Path,
    resume: bool,
    calibrate: bool,
    previous: list[Path] | None = None,
) -> TrainResult:
    """One stage in ``outdir`` (prepared): start, epochs, calibration.

    :param previous: the models of the earlier stages of the run
    """
    config, workers, device = run.config, run.workers, run.device
    t = config.training
    dtype = getattr(torch, t.dtype)
    previous = list(previous or [])
    if resume and stage.trains and not (outdir / "last.ckpt").exists():
        raise TrainingError(f"cannot resume: '{outdir / 'last.ckpt'}' does not exist")
    if resume and not stage.trains and (outdir / "model.ckpt").exists():
        return _finished_result(config, stage, outdir)

    source: str | Path | None = t.init_from
    if previous and stage.start in BUILDS_ON_A_MODEL:
        source = previous[-1]
    cutoff = None if source is None else checkpoint_cutoff(source)
    types, datasets = run.load_datasets(cutoff)
    if len(datasets["train"]) < workers.world_size:
        raise TrainingError(
            f"{len(datasets['train'])} training structures cannot be shared among "
            f"{workers.world_size} processes"
        )
    torch.manual_seed(stage.seed)
    context = Context(
        config,
        stage,
        datasets,
        types,
        outdir,
        run.progress,
        workers=workers,
        source=source,
        previous=previous,
    )
    state: dict[str, Any] = {}
    start = time.perf_counter()
    if resume and stage.trains:
        state = read_checkpoint(outdir / "last.ckpt")
        _check_same_run(state, config, stage, outdir / "last.ckpt")
        model = model_from_checkpoint(state)
        context.info = state.get("info", {})
    else:
        model = start_model(context)
    model = model.to(device=device, dtype=dtype)
    workers.broadcast_parameters(model)
    init_seconds = state.get(
        "init_seconds", time.perf_counter() - start + context.inherited_seconds
    )

    history: list[dict[str, float]] = []
    elapsed = init_seconds
    if stage.trains:
        objective = Objective(stage, t)
        history, elapsed = run_epochs(
            model, objective, context, state, init_seconds, run.on_epoch_end
        )
    elif workers.is_main:
        save_checkpoint(outdir / "best.ckpt", model, {"epoch": -1})
    if not workers.is_main:
        workers.barrier()  # rank 0 calibrates and writes model.ckpt
        return written_result(outdir, history)
    result = finalize(
        config,
        outdir,
        datasets,
        elapsed,
        history,
        device,
        dtype,
        calibrate,
        context.info,
        stage,
    )
    workers.barrier()
    return result


def _finished_result(config: Config, stage: Stage, outdir: Path) -> TrainResult:
    """A finished stage, on ``resume``: checked against ``config``; its
    ``metrics.json`` is written again if it is missing (a kill between the two)."""
    path = outdir / "model.ckpt"
    state = read_checkpoint(path)
    _check_same_run(state, config, stage, path)
    history = read_log(outdir / "log.csv")
    if not (outdir / "metrics.json").exists():
        write_json(outdir / "metrics.json", run_summary(state))
    return written_result(outdir, history)
