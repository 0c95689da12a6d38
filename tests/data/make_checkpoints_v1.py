"""Write the version-1 checkpoints of tests/data and their expected predictions.

They were written by this script at commit 3ffbbec (checkpoint format version 1,
before model kinds had a contract); run with later code it would write the current
format, so the files are kept as they are and only read by
``tests/contract/test_checkpoint_versions.py``::

    python tests/data/make_checkpoints_v1.py

Every model is tiny, float64, with random (untrained) weights, non-trivial
normalisation, composition baseline and calibration factors. The expected
predictions (``checkpoints_v1.json``) are the uncalibrated member energies and
member forces of ethanol frame 0 (the package's ``resources/ethanol.xyz``), and the
calibrated per-system ``energy_ensemble`` of the exported model.
"""

import json
import tempfile
from importlib import resources
from pathlib import Path

import ase.io
import torch

from shallow_ensemble.backbones import SoapBpnn
from shallow_ensemble.data import GraphDataset, collate, read_structures
from shallow_ensemble.export import export_model, to_atomistic_model
from shallow_ensemble.export.predict import run_model
from shallow_ensemble.model import EnsembleModel
from shallow_ensemble.training.checkpoints import load_model, save_checkpoint


HERE = Path(__file__).parent
ETHANOL = str(resources.files("shallow_ensemble") / "resources" / "ethanol.xyz")
TYPES = [1, 6, 8]
HYPERS = {"cutoff": 3.5, "max_radial": 2, "max_angular": 2, "hidden_sizes": [6, 4]}


def tiny_soap_bpnn(seed: int, num_members: int, **hypers) -> EnsembleModel:
    torch.manual_seed(seed)
    backbone = SoapBpnn(TYPES, **{**HYPERS, **hypers})
    model = EnsembleModel(backbone, num_members).to(torch.float64)
    with torch.no_grad():
        model.head.bias.normal_()
        model.head.composition.copy_(torch.tensor([-13.6, -1029.8, -2041.3]))
        model.head.energy_scale.fill_(0.5)
        backbone.feature_scale.uniform_(0.5, 2.0)
        backbone.feature_shift.normal_(std=0.1)
    return model


def calibrate(model, alpha_energy: float, alpha_forces: float, alpha_atom: float):
    model.alpha_energy.fill_(alpha_energy)
    model.alpha_forces.fill_(alpha_forces)
    model.alpha_atom.fill_(alpha_atom)
    return model


def expected(model) -> dict:
    structures = read_structures(ETHANOL)[:1]
    batch = collate([GraphDataset(structures, 3.5)[0]]).to(dtype=torch.float64)
    prediction = model.predict(batch, forces="members")
    atoms = ase.io.read(ETHANOL, "0")
    results, _ = run_model(
        to_atomistic_model(model), [atoms], {"energy_ensemble": "system"}
    )
    return {
        "num_members": model.num_members,
        "energies": prediction.energies[0].detach().tolist(),
        "forces": prediction.forces.detach().tolist(),
        "exported_energy_ensemble": results["energy_ensemble"]
        .block()
        .values[0]
        .tolist(),
    }


def main() -> None:
    from shallow_ensemble.training.initialization import stack_models

    numbers = {}

    soap = calibrate(tiny_soap_bpnn(seed=1, num_members=3), 1.3, 0.7, 2.1)
    save_checkpoint(HERE / "soap_bpnn_v1.ckpt", soap)

    members = [tiny_soap_bpnn(seed=10 + k, num_members=1) for k in range(2)]
    stacked = calibrate(stack_models(members), 1.6, 0.8, 1.2)
    save_checkpoint(HERE / "stacked_v1.ckpt", stacked)

    # the wrapped model: a one-member SOAP-BPNN export, extended with 3 heads
    from shallow_ensemble.extended import extend_metatomic_model

    base = tiny_soap_bpnn(
        seed=20, num_members=1, max_radial=1, max_angular=1, hidden_sizes=[4]
    )
    train_set = GraphDataset(read_structures(ETHANOL)[:8], 3.5)
    with tempfile.TemporaryDirectory() as folder:
        base_file = export_model(base, Path(folder) / "base.pt")
        wrapped = extend_metatomic_model(base_file, train_set)
    generator = torch.Generator().manual_seed(3)
    size = wrapped.head.feature_size
    wrapped.head.set_members(
        torch.randn(3, size, generator=generator, dtype=torch.float64),
        torch.randn(3, generator=generator, dtype=torch.float64),
    )
    calibrate(wrapped, 1.1, 0.9, 1.5)
    save_checkpoint(HERE / "metatomic_v1.ckpt", wrapped)

    for name in ("soap_bpnn_v1", "stacked_v1", "metatomic_v1"):
        numbers[name] = expected(load_model(HERE / f"{name}.ckpt"))
    (HERE / "checkpoints_v1.json").write_text(json.dumps(numbers, indent=1) + "\n")


if __name__ == "__main__":
    main()
