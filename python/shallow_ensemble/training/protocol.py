"""The recommended protocol in one run: a cheap ensemble, then a force-NLL fine-tune.

``mse`` training -> Laplace sampling of the heads -> full-model fine-tune with the joint
energy + force NLL -> calibration (or ``energy_nll`` -> fine-tune). With
``model.from_metatomic``, an exported model replaces the ``mse`` stage. Each stage is
one run of the training loop in ``OUTDIR/<n>-<stage>/``; the final model is copied to
``OUTDIR/model.ckpt`` and the cost of every stage is recorded in
``OUTDIR/metrics.json``.
"""

import dataclasses
import shutil
from pathlib import Path

from ..config import Config
from .checkpoints import load_model, read_checkpoint
from .rundir import atomic_write, prepare_outdir, write_json
from .trainer import TrainingError, TrainResult, run_summary, train


def protocol_stages(config: Config) -> list[tuple[str, Config]]:
    """The configurations of each stage of ``strategy: protocol``."""
    p = config.protocol
    t = config.training
    start = "from_metatomic" if config.model.from_metatomic is not None else p.first
    first = dataclasses.replace(t, strategy=start)
    stages = [(start, dataclasses.replace(config, training=first))]
    if start in ("mse", "from_metatomic"):
        laplace = dataclasses.replace(t, strategy="laplace")
        stages.append(("laplace", dataclasses.replace(config, training=laplace)))
    finetune = dataclasses.replace(
        t,
        strategy="finetune",
        epochs=p.finetune_epochs,
        warmup_epochs=0,
        learning_rate=p.finetune_learning_rate,
        heads_learning_rate=None,
        finetune_target=p.finetune_target,
    )
    stages.append(("finetune", dataclasses.replace(config, training=finetune)))
    return stages


def _stage_folders(config: Config) -> list[str]:
    return [f"{i}-{name}" for i, (name, _) in enumerate(protocol_stages(config), 1)]


def run_protocol(
    config: Config,
    outdir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Run every stage; on ``resume``, a finished stage (its ``model.ckpt``) is
    reused and an interrupted one continues.

    ``OUTDIR/metrics.json`` has the final stage's metrics, and under ``stages`` the
    seconds, epochs and selected epoch (``best_epoch``, as in that stage's
    ``log.csv``) of each stage.
    """
    outdir = prepare_outdir(outdir, resume, overwrite, tuple(_stage_folders(config)))
    previous: Path | None = None
    costs = {}
    result: TrainResult | None = None
    for (name, stage), folder_name in zip(
        protocol_stages(config), _stage_folders(config), strict=True
    ):
        if previous is not None:
            training = dataclasses.replace(stage.training, init_from=str(previous))
            stage = dataclasses.replace(stage, training=training)
        folder = outdir / folder_name
        if resume and (folder / "model.ckpt").exists():
            done = read_checkpoint(folder / "model.ckpt")
            if done.get("config") != stage.to_dict():
                raise TrainingError(
                    "cannot resume: the configuration differs from the one in "
                    f"'{folder / 'model.ckpt'}'"
                )
            costs[name] = _cost(done)
            previous = folder / "model.ckpt"
            continue
        print(f"protocol stage {folder_name}")
        stage_resume = resume and (folder / "last.ckpt").exists()
        result = train(
            stage,
            folder,
            resume=stage_resume,
            overwrite=not stage_resume,
            progress=progress,
        )
        costs[name] = _cost(read_checkpoint(result.checkpoint))
        previous = result.checkpoint

    assert previous is not None
    final = read_checkpoint(previous)
    summary = run_summary(final)
    summary["strategy"] = "protocol"
    summary["stages"] = costs
    summary["train_seconds"] = sum(c["seconds"] for c in costs.values())
    summary["epochs"] = sum(c["epochs"] for c in costs.values())
    summary.pop("best_epoch")  # one per stage
    write_json(outdir / "metrics.json", summary)
    atomic_write(outdir / "model.ckpt", lambda tmp: shutil.copyfile(previous, tmp))
    return TrainResult(
        result.model if result is not None else load_model(outdir / "model.ckpt"),
        outdir / "model.ckpt",
        result.history if result is not None else [],
        final["calibration"],
        final["metrics"],
        summary["train_seconds"],
        {**final["info"], "stages": costs},
    )


def _cost(payload: dict) -> dict:
    return {
        "seconds": payload["train_seconds"],
        "epochs": payload["epochs"],
        "best_epoch": payload.get("best_epoch"),
    }
