"""The one training loop, and :py:func:`train`, which runs the stages of a preset.

Every ``training.strategy`` is a list of stages (:py:mod:`.presets`); each stage
obtains its model (its start), runs the loop (:py:func:`_run_epochs`) unless it
trains nothing, calibrates the model and writes its folder. Nothing here prints:
progress bars are shown with ``progress=True``, and messages go to the
``logging`` logger of this module.
"""

import csv
import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..calibration.predictions import (
    evaluate_predictions,
    fit_calibration,
    predict_dataset,
)
from ..config import Config
from ..data import GraphDataset, batch_indices, collate
from ..errors import ShallowEnsembleError
from ..model import EnsembleModel
from .checkpoints import (
    checkpoint_cutoff,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from .datasets import load_datasets
from .distributed import Workers, init_workers
from .presets import preset_stages, stage_subfolders
from .rundir import atomic_write, prepare_outdir, write_json
from .stages import BUILDS_ON_A_MODEL, Context, Objective, Stage, start_model


logger = logging.getLogger(__name__)


class TrainingError(ShallowEnsembleError, RuntimeError):
    """Training cannot start or continue as asked."""


@dataclass
class TrainResult:
    """What a training run produced.

    ``train_seconds`` counts the epochs and, for strategies that build their model
    from others (``laplace``, ``deep_ensemble``, ...), the time that took; the
    starting checkpoint's own training is not included. For a preset of several
    stages, ``info["stages"]`` has the cost of each (when they write sub-folders).
    """

    model: EnsembleModel
    checkpoint: Path
    history: list[dict[str, float]]
    calibration: dict[str, float]
    metrics: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def _lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    if schedule == "constant":
        return 1.0
    progress = epoch / max(epochs, 1)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def _validation_loss(
    model: EnsembleModel,
    objective: Objective,
    dataset: GraphDataset,
    batch_size: int,
    epoch: int,
    workers: Workers,
) -> tuple[float, dict[str, float]]:
    """Validation loss, weighted by structures; batches shared among processes."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    total, weight = 0.0, 0
    parts: dict[str, float] = {}
    batches = batch_indices(len(dataset), batch_size, shuffle=False)
    for indices in workers.shard(batches):
        batch = collate([dataset[i] for i in indices]).to(device=device, dtype=dtype)
        result = objective.loss(model, batch, epoch)
        total += float(result.total.detach()) * batch.n_systems
        weight += batch.n_systems
        for key, value in result.parts.items():
            parts[key] = parts.get(key, 0.0) + value * batch.n_systems
    if workers.distributed:
        gathered = workers.all_gather((total, weight, parts))
        total = sum(g[0] for g in gathered)
        weight = sum(g[1] for g in gathered)
        parts = {k: sum(g[2].get(k, 0.0) for g in gathered) for k in gathered[0][2]}
    return total / weight, {k: v / weight for k, v in parts.items()}


def _train_step(
    model: EnsembleModel,
    objective: Objective,
    dataset: GraphDataset,
    indices: list[int],
    epoch: int,
    workers: Workers,
    dtype: torch.dtype,
) -> float:
    """Loss and gradients of one global batch (this process's share of it).

    :return: the global batch's loss times its number of structures (for the log)
    """
    device = next(model.parameters()).device
    mine = workers.shard(indices)
    total, finite, parts = torch.zeros(()), True, {}
    if mine:
        batch = collate([dataset[i] for i in mine]).to(device=device, dtype=dtype)
        result = objective.loss(model, batch, epoch)
        atoms_share = sum(dataset[i].n_atoms for i in mine) / sum(
            dataset[i].n_atoms for i in indices
        )
        local = result.weighted(len(mine) / len(indices), atoms_share)
        finite, parts = bool(torch.isfinite(local)), result.parts
        if finite:
            local.backward()
        total = local.detach().cpu() * len(indices)
    # one reduction tells every process the summed loss and whether any failed
    stats = workers.all_reduce(
        torch.stack([total.to(torch.float64), torch.tensor(float(not finite))])
    )
    if float(stats[1]) > 0:
        where = ""
        if not finite:
            sources = [dataset.sources[i] for i in mine]
            where = f" in the batch of {', '.join(sources)}: {parts}"
        raise TrainingError(
            f"non-finite loss at epoch {epoch + 1}{where}; check these structures, "
            "or lower `training.learning_rate` or raise `training.warmup_epochs`"
        )
    workers.sum_gradients([p for p in model.parameters() if p.requires_grad])
    return float(stats[0])


def _write_log(path: Path, history: list[dict[str, float]]) -> None:
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fd:
            writer = csv.DictWriter(fd, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)

    atomic_write(path, write)


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
        raise TrainingError("`training.device` is 'cuda' but CUDA is not available")
    stages = preset_stages(config)
    workers = init_workers(device)
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
            self.datasets[cutoff] = load_datasets(self.config, cutoff)
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
        result.model if ran_last and result is not None else load_model(path),
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
        model = load_model(outdir / "last.ckpt")
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
        history, elapsed = _run_epochs(
            model, objective, context, state, init_seconds, run.on_epoch_end
        )
    elif workers.is_main:
        save_checkpoint(outdir / "best.ckpt", model, {"epoch": -1})
    if not workers.is_main:
        workers.barrier()  # rank 0 calibrates and writes model.ckpt
        return _written_result(outdir, history)
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


def _written_result(outdir: Path, history: list[dict[str, float]]) -> TrainResult:
    """The result rank 0 wrote, for the other processes."""
    path = outdir / "model.ckpt"
    state = read_checkpoint(path)
    return TrainResult(
        load_model(path),
        path,
        history,
        state["calibration"],
        state["metrics"],
        state["train_seconds"],
        state["info"],
    )


def _finished_result(config: Config, stage: Stage, outdir: Path) -> TrainResult:
    """A finished stage, on ``resume``: checked against ``config``; its
    ``metrics.json`` is written again if it is missing (a kill between the two)."""
    path = outdir / "model.ckpt"
    state = read_checkpoint(path)
    _check_same_run(state, config, stage, path)
    history = _read_log(outdir / "log.csv")
    if not (outdir / "metrics.json").exists():
        write_json(outdir / "metrics.json", run_summary(state))
    return _written_result(outdir, history)


def _read_log(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with open(path, newline="") as fd:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fd)]


def _run_epochs(
    model: EnsembleModel,
    objective: Objective,
    context: Context,
    state: dict[str, Any],
    init_seconds: float,
    on_epoch_end: Callable[[int], None] | None,
) -> tuple[list[dict[str, float]], float]:
    """The loop over epochs: one optimiser, per-epoch checkpoints and logs."""
    config, outdir, workers = context.config, context.outdir, context.workers
    stage = context.stage
    t = config.training
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(stage.seed)
    optimizer = torch.optim.Adam(
        objective.param_groups(model), weight_decay=t.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: _lr_factor(t.lr_schedule, e, stage.epochs)
    )
    history: list[dict[str, float]] = state.get("history", [])
    best = state.get("best", math.inf)
    best_epoch: int | None = state.get("best_epoch")
    start_epoch = state.get("epoch", -1) + 1
    elapsed = state.get("train_seconds", init_seconds)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if workers.is_main:
            logger.info(
                "resuming '%s' at epoch %d/%d", outdir, start_epoch + 1, stage.epochs
            )
    objective.prepare(model)
    train_set, valid_set = context.datasets["train"], context.datasets["valid"]

    epochs = tqdm(
        range(start_epoch, stage.epochs),
        desc=f"train {stage.name}",
        unit="epoch",
        disable=not context.progress,
        initial=start_epoch,
        total=stage.epochs,
    )
    for epoch in epochs:
        start = time.perf_counter()
        model.train()
        train_loss = 0.0
        for indices in batch_indices(len(train_set), t.batch_size, True, generator):
            optimizer.zero_grad(set_to_none=True)
            train_loss += _train_step(
                model, objective, train_set, indices, epoch, workers, dtype
            )
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            objective.after_step(model)
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch used
        scheduler.step()
        epoch_seconds = time.perf_counter() - start
        elapsed += epoch_seconds

        model.eval()
        valid_loss, parts = _validation_loss(
            model, objective, valid_set, t.batch_size, epoch, workers
        )
        row = {
            "epoch": epoch + 1,
            "seconds": round(epoch_seconds, 3),
            "lr": lr,
            "train_loss": train_loss / len(train_set),
            "valid_loss": valid_loss,
            **{f"valid_{k}": v for k, v in parts.items()},
        }
        history.append(row)
        epochs.set_postfix(train=f"{row['train_loss']:.4g}", valid=f"{valid_loss:.4g}")

        # warm-up (MSE) and probabilistic losses are not comparable: the best
        # epoch is chosen among epochs of the current phase only
        phase_changed = best_epoch is not None and objective.in_warmup(
            best_epoch
        ) != objective.in_warmup(epoch)
        if best_epoch is None or phase_changed:
            best, best_epoch = math.inf, None
        is_best = best_epoch is None or valid_loss < best
        if is_best:
            best, best_epoch = valid_loss, epoch
        if workers.is_main:
            _write_log(outdir / "log.csv", history)
            if is_best:
                save_checkpoint(outdir / "best.ckpt", model, {"epoch": epoch})
            save_checkpoint(
                outdir / "last.ckpt",
                model,
                {
                    "config": config.to_dict(),
                    "stage": stage.to_dict(),
                    "epoch": epoch,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "history": history,
                    "best": best,
                    "best_epoch": best_epoch,
                    "train_seconds": elapsed,
                    "init_seconds": init_seconds,
                    "info": context.info,
                },
            )
        workers.barrier()  # the checkpoints are written before anyone goes on
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    return history, elapsed


def finalize(
    config: Config,
    outdir: Path,
    datasets: dict[str, GraphDataset],
    elapsed: float,
    history: list[dict[str, float]],
    device: torch.device,
    dtype: torch.dtype,
    calibrate: bool = True,
    info: dict[str, Any] | None = None,
    stage: Stage | None = None,
) -> TrainResult:
    """Reload the best model, calibrate it on validation data, write model.ckpt
    (with the configuration and the ``stage`` that made it)."""
    model = load_model(outdir / "best.ckpt").to(device=device, dtype=dtype)
    model.eval()
    batch_size = config.training.batch_size
    predictions = predict_dataset(model, datasets["valid"], batch_size)
    metrics = {"valid_uncalibrated": evaluate_predictions(predictions)}
    calibration = {"alpha_energy": 1.0, "alpha_forces": 1.0, "alpha_atom": 1.0}
    if calibrate and config.calibration.enabled:
        calibration = fit_calibration(predictions)
        for key, value in calibration.items():
            getattr(model, key).fill_(value)
        calibrated = predictions.calibrated(
            calibration["alpha_energy"], calibration["alpha_forces"]
        )
        metrics["valid_calibrated"] = evaluate_predictions(calibrated)
    if "test" in datasets:
        test = predict_dataset(model, datasets["test"], batch_size)
        test = test.calibrated(calibration["alpha_energy"], calibration["alpha_forces"])
        metrics["test"] = evaluate_predictions(test)
    info = dict(info or {})
    best_state = read_checkpoint(outdir / "best.ckpt")
    best_epoch = best_state["epoch"] + 1 if best_state["epoch"] >= 0 else None
    payload = {
        "config": config.to_dict(),
        "stage": None if stage is None else stage.to_dict(),
        "calibration": calibration,
        "metrics": metrics,
        "train_seconds": elapsed,
        "epochs": len(history),
        "best_epoch": best_epoch,
        "info": info,
    }
    # metrics.json first: model.ckpt is written last and marks a finished run
    write_json(outdir / "metrics.json", run_summary(payload))
    path = outdir / "model.ckpt"
    save_checkpoint(path, model, payload)
    return TrainResult(model, path, history, calibration, metrics, elapsed, info)


def run_summary(payload: dict[str, Any]) -> dict[str, Any]:
    """The content of ``metrics.json``, from a finished run's ``model.ckpt``.

    ``best_epoch`` is the selected epoch, numbered as in ``log.csv`` (``null`` for
    stages that train no epochs); ``strategy`` is the name of the stage.
    """
    stage = payload.get("stage")
    return {
        "strategy": (
            payload["config"]["training"]["strategy"]
            if stage is None
            else stage["name"]
        ),
        "train_seconds": payload["train_seconds"],
        "epochs": payload["epochs"],
        "best_epoch": payload.get("best_epoch"),
        "calibration": payload["calibration"],
        **payload["info"],
        **payload["metrics"],
    }
