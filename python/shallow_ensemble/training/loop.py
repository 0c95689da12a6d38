"""The one training loop: epochs of optimiser steps, validation, best-epoch
selection and per-epoch checkpoints, for the model and objective of one stage."""

import csv
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import Batch, GraphDataset, batch_indices, collate
from ..data.streaming import count_atoms, load_batches
from ..errors import TrainingError
from ..kinds import ModelKind
from .checkpoints import save_checkpoint
from .distributed import Workers
from .rundir import atomic_write
from .stages import Context, Objective


logger = logging.getLogger(__name__)


def _lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    if schedule == "constant":
        return 1.0
    progress = epoch / max(epochs, 1)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def _validation_loss(
    model: ModelKind,
    objective: Objective,
    dataset: GraphDataset,
    batch_size: int,
    epoch: int,
    workers: Workers,
) -> tuple[float, dict[str, float]]:
    """Validation loss, weighted by structures; batches shared among processes.

    The sums stay on the model's device until the end (one copy to the host per
    epoch, not one per batch).
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    total = torch.zeros((), dtype=torch.float64, device=device)
    weight = 0
    sums: dict[str, torch.Tensor] = {}
    batches = batch_indices(len(dataset), batch_size, shuffle=False)
    for loaded in load_batches(dataset, workers.shard(batches)):
        assert loaded is not None, "a validation batch has structures"
        batch = loaded.to(device=device, dtype=dtype)
        result = objective.loss(model, batch, epoch, z2=True)
        total = total + result.total.detach().to(torch.float64) * batch.n_systems
        weight += batch.n_systems
        for key, part in result.parts.items():
            value = torch.as_tensor(part, dtype=torch.float64, device=device)
            value = value * batch.n_systems
            sums[key] = sums[key] + value if key in sums else value
    host = torch.stack([total, *sums.values()]).tolist()  # the one synchronisation
    total_value, parts = host[0], dict(zip(sums, host[1:], strict=True))
    if workers.distributed:
        gathered = workers.all_gather((total_value, weight, parts))
        total_value = sum(g[0] for g in gathered)
        weight = sum(g[1] for g in gathered)
        parts = {k: sum(g[2].get(k, 0.0) for g in gathered) for k in gathered[0][2]}
    return total_value / weight, {k: v / weight for k, v in parts.items()}


@dataclass
class _Step:
    """What one optimiser step leaves for the end of the epoch, on the device:
    nothing here is copied to the host while the epoch runs."""

    #: ``(2,)`` float64, summed over processes: the global batch's loss times its
    #: number of structures, and the number of processes whose loss was not finite
    stats: torch.Tensor
    #: this process's structures and loss parts (to name them if not finite)
    sources: list[str]
    parts: dict[str, torch.Tensor]
    finite: torch.Tensor


def _train_step(
    model: ModelKind,
    objective: Objective,
    dataset: GraphDataset,
    indices: list[int],
    epoch: int,
    workers: Workers,
    dtype: torch.dtype,
    device: torch.device,
    loaded: Batch | None = None,
) -> _Step:
    """Loss and gradients of one global batch (this process's share of it).

    No host synchronisation: the batch is moved to ``device`` once, and the loss
    and its finiteness stay there (:py:func:`_check_epoch` reads them after the
    epoch). A non-finite loss still back-propagates (the parameters become NaN),
    and the epoch's check stops the run before its checkpoints are written.
    """
    mine = workers.shard(indices)
    local_stats = torch.zeros(2, dtype=torch.float64, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    parts: dict[str, torch.Tensor] = {}
    if mine:
        if loaded is None:
            loaded = collate([dataset[i] for i in mine])
        batch = loaded.to(device=device, dtype=dtype)
        result = objective.loss(model, batch, epoch)
        atoms_share = count_atoms(dataset, mine) / count_atoms(dataset, indices)
        local = result.weighted(len(mine) / len(indices), atoms_share)
        local.backward()
        finite, parts = torch.isfinite(local.detach()), result.parts
        local_stats = torch.stack(
            [
                local.detach().to(torch.float64) * len(indices),
                (~finite).to(torch.float64),
            ]
        )
    # one reduction tells every process the summed loss and whether any failed
    stats = workers.all_reduce(local_stats)
    workers.sum_gradients([p for p in model.parameters() if p.requires_grad])
    return _Step(stats, [dataset.sources[i] for i in mine], parts, finite)


def _check_epoch(steps: list[_Step], epoch: int) -> float:
    """The epoch's summed training loss (one copy to the host); stops the run at
    its first non-finite loss, naming this process's structures of that batch.

    :raises TrainingError: if a loss of the epoch was not finite
    """
    if not steps:
        return 0.0
    stats = torch.stack([step.stats for step in steps]).cpu()
    failed = torch.nonzero(stats[:, 1] > 0).reshape(-1).tolist()
    if failed:
        step = steps[failed[0]]
        where = ""
        if not bool(step.finite):
            parts = {k: float(v) for k, v in step.parts.items()}
            where = f" in the batch of {', '.join(step.sources)}: {parts}"
        raise TrainingError(
            f"non-finite loss at epoch {epoch + 1}{where}; check these structures, "
            "or lower `training.learning_rate` or raise `training.warmup_epochs`"
        )
    return float(stats[:, 0].sum())


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


def run_epochs(
    model: ModelKind,
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
    device = next(model.parameters()).device
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
        steps: list[_Step] = []
        batches = batch_indices(len(train_set), t.batch_size, True, generator)
        # this process's share of each batch, built ahead by workers if streaming
        shares = load_batches(train_set, [workers.shard(b) for b in batches])
        for indices, loaded in zip(batches, shares, strict=True):
            optimizer.zero_grad(set_to_none=True)
            steps.append(
                _train_step(
                    model,
                    objective,
                    train_set,
                    indices,
                    epoch,
                    workers,
                    dtype,
                    device,
                    loaded=loaded,
                )
            )
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            objective.after_step(model)
        train_loss = _check_epoch(steps, epoch)  # the epoch's one synchronisation
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
        score = objective.selection_score(valid_loss, parts, epoch)
        is_best = best_epoch is None or score < best
        if is_best:
            best, best_epoch = score, epoch
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
