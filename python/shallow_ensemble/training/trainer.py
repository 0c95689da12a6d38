"""The one training loop, shared by every strategy."""

import csv
import math
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
from .rundir import atomic_write, prepare_outdir, write_json
from .strategies import Context, Strategy, get_strategy


class TrainingError(ShallowEnsembleError, RuntimeError):
    """Training cannot start or continue as asked."""


@dataclass
class TrainResult:
    """What a training run produced.

    ``train_seconds`` counts the epochs and, for strategies that build their model
    from others (``laplace``, ``deep_ensemble``, ...), the time that took; the
    starting checkpoint's own training is not included.
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
    strategy: Strategy,
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
        result = strategy.loss(model, batch, epoch)
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
    strategy: Strategy,
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
        result = strategy.loss(model, batch, epoch)
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
    """Train, keep the best model on validation, calibrate it, write checkpoints.

    Writes ``OUTDIR/model.ckpt`` (best, calibrated), ``OUTDIR/last.ckpt`` (full
    training state after every epoch, for ``resume``), ``OUTDIR/log.csv`` and
    ``OUTDIR/metrics.json``.

    :param config: validated configuration
    :param outdir: output folder
    :param resume: continue from ``OUTDIR/last.ckpt``
    :param overwrite: start again even if ``OUTDIR`` holds a training
    :param on_epoch_end: called with the epoch index after each epoch's checkpoint
    :param progress: show progress bars
    :param calibrate: fit the calibration factors (if ``config.calibration`` says so)
    """
    if config.training.strategy == "protocol":
        from .protocol import run_protocol

        return run_protocol(config, outdir, resume, overwrite, progress)
    t = config.training
    device = torch.device(t.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("`training.device` is 'cuda' but CUDA is not available")
    dtype = getattr(torch, t.dtype)
    strategy = get_strategy(t)
    workers = init_workers(device)
    outdir = Path(outdir)
    if workers.is_main:
        prepare_outdir(outdir, resume, overwrite, strategy.subfolders)
    workers.barrier()
    if resume and strategy.trains and not (outdir / "last.ckpt").exists():
        raise TrainingError(f"cannot resume: '{outdir / 'last.ckpt'}' does not exist")
    if resume and not strategy.trains and (outdir / "model.ckpt").exists():
        return _finished_result(config, outdir)

    cutoff = None if t.init_from is None else checkpoint_cutoff(t.init_from)
    types, datasets = load_datasets(config, cutoff)
    if len(datasets["train"]) < workers.world_size:
        raise TrainingError(
            f"{len(datasets['train'])} training structures cannot be shared among "
            f"{workers.world_size} processes"
        )
    torch.manual_seed(t.seed)
    progress = progress and workers.is_main
    context = Context(
        config, datasets, types, outdir, progress, workers=workers, resume=resume
    )
    state: dict[str, Any] = {}
    start = time.perf_counter()
    if resume and strategy.trains:
        state = read_checkpoint(outdir / "last.ckpt")
        if state.get("config") != config.to_dict():
            raise TrainingError(
                "cannot resume: the configuration differs from the one in "
                f"'{outdir / 'last.ckpt'}'"
            )
        model = load_model(outdir / "last.ckpt")
        context.info = state.get("info", {})
    else:
        model = strategy.initialize(context)
    model = model.to(device=device, dtype=dtype)
    workers.broadcast_parameters(model)
    init_seconds = state.get("init_seconds", time.perf_counter() - start)

    history: list[dict[str, float]] = []
    elapsed = init_seconds
    if strategy.trains:
        history, elapsed = _run_epochs(
            model, strategy, context, state, init_seconds, on_epoch_end
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


def _finished_result(config: Config, outdir: Path) -> TrainResult:
    """A finished run, on ``resume``: checked against ``config``; its
    ``metrics.json`` is written again if it is missing (a kill between the two)."""
    path = outdir / "model.ckpt"
    state = read_checkpoint(path)
    if state.get("config") != config.to_dict():
        raise TrainingError(
            f"cannot resume: the configuration differs from the one in '{path}'"
        )
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
    strategy: Strategy,
    context: Context,
    state: dict[str, Any],
    init_seconds: float,
    on_epoch_end: Callable[[int], None] | None,
) -> tuple[list[dict[str, float]], float]:
    """The loop over epochs: one optimiser, per-epoch checkpoints and logs."""
    config, outdir, workers = context.config, context.outdir, context.workers
    t = config.training
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(t.seed)
    optimizer = torch.optim.Adam(
        strategy.param_groups(model), weight_decay=t.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: _lr_factor(t.lr_schedule, e, t.epochs)
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
            print(f"resuming '{outdir}' at epoch {start_epoch + 1}/{t.epochs}")
    strategy.prepare(model)
    train_set, valid_set = context.datasets["train"], context.datasets["valid"]

    epochs = tqdm(
        range(start_epoch, t.epochs),
        desc=f"train {strategy.name}",
        unit="epoch",
        disable=not context.progress,
        initial=start_epoch,
        total=t.epochs,
    )
    for epoch in epochs:
        start = time.perf_counter()
        model.train()
        train_loss = 0.0
        for indices in batch_indices(len(train_set), t.batch_size, True, generator):
            optimizer.zero_grad(set_to_none=True)
            train_loss += _train_step(
                model, strategy, train_set, indices, epoch, workers, dtype
            )
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            strategy.after_step(model)
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch used
        scheduler.step()
        epoch_seconds = time.perf_counter() - start
        elapsed += epoch_seconds

        model.eval()
        valid_loss, parts = _validation_loss(
            model, strategy, valid_set, t.batch_size, epoch, workers
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
        if best_epoch is None or strategy.in_warmup(best_epoch) != strategy.in_warmup(
            epoch
        ):
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
) -> TrainResult:
    """Reload the best model, calibrate it on validation data, write model.ckpt."""
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
    strategies that train no epochs).
    """
    return {
        "strategy": payload["config"]["training"]["strategy"],
        "train_seconds": payload["train_seconds"],
        "epochs": payload["epochs"],
        "best_epoch": payload.get("best_epoch"),
        "calibration": payload["calibration"],
        **payload["info"],
        **payload["metrics"],
    }
