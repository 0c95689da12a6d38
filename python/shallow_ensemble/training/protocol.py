"""The recommended protocol in one run: a cheap ensemble, then a force-NLL fine-tune.

``mse`` training -> Laplace sampling of the heads -> full-model fine-tune with the joint
energy + force NLL -> calibration (or ``energy_nll`` -> fine-tune). With
``model.from_metatomic``, an exported model replaces the ``mse`` stage. Each stage is
one run of the training loop in ``OUTDIR/<n>-<stage>/``; the final model is copied to
``OUTDIR/model.ckpt`` and the cost of every stage is recorded in
``OUTDIR/metrics.json``.
"""

import dataclasses
import json
import shutil
from pathlib import Path

from ..config import Config
from .trainer import TrainResult, train


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


def run_protocol(
    config: Config,
    outdir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Run every stage; a stage whose ``model.ckpt`` exists is reused on ``resume``."""
    outdir = Path(outdir)
    previous: Path | None = None
    costs = {}
    result: TrainResult | None = None
    for i, (name, stage) in enumerate(protocol_stages(config), start=1):
        if previous is not None:
            training = dataclasses.replace(stage.training, init_from=str(previous))
            stage = dataclasses.replace(stage, training=training)
        folder = outdir / f"{i}-{name}"
        if resume and (folder / "model.ckpt").exists():
            with open(folder / "metrics.json") as fd:
                done = json.load(fd)
            costs[name] = {"seconds": done["train_seconds"], "epochs": done["epochs"]}
            previous = folder / "model.ckpt"
            continue
        print(f"protocol stage {i}: {name}")
        stage_resume = resume and (folder / "last.ckpt").exists()
        result = train(
            stage,
            folder,
            resume=stage_resume,
            overwrite=overwrite or not stage_resume,
            progress=progress,
        )
        costs[name] = {"seconds": result.train_seconds, "epochs": len(result.history)}
        previous = result.checkpoint

    assert previous is not None
    shutil.copy(previous, outdir / "model.ckpt")
    final_metrics_path = previous.parent / "metrics.json"
    with open(final_metrics_path) as fd:
        final = json.load(fd)
    final["strategy"] = "protocol"
    final["stages"] = costs
    final["train_seconds"] = sum(c["seconds"] for c in costs.values())
    final["epochs"] = sum(c["epochs"] for c in costs.values())
    with open(outdir / "metrics.json", "w") as fd:
        json.dump(final, fd, indent=2)
    if result is None:  # everything was already done
        from .checkpoints import load_model

        model = load_model(outdir / "model.ckpt")
        return TrainResult(
            model,
            outdir / "model.ckpt",
            [],
            final["calibration"],
            {k: v for k, v in final.items() if k.startswith(("valid", "test"))},
            final["train_seconds"],
            {"stages": costs},
        )
    result.checkpoint = outdir / "model.ckpt"
    result.train_seconds = final["train_seconds"]
    result.info["stages"] = costs
    return result
