"""The configuration's schema: one frozen dataclass per section, with the allowed
values of each key as its annotation and its documentation as the string under it."""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ShallowEnsembleError


StrategyName = Literal[
    "mse",
    "energy_nll",
    "energy_force_nll",
    "laplace",
    "random_heads",
    "from_metatomic",
    "deep_ensemble",
    "finetune",
    "protocol",
]
"""The values of ``training.strategy``: each names a preset, a list of training
stages (:py:mod:`shallow_ensemble.training.presets`)."""

PROBABILISTIC_STRATEGIES: tuple[str, ...] = (
    "energy_nll",
    "energy_force_nll",
    "finetune",
)
"""Strategies that train a probabilistic loss (after an optional MSE warm-up)."""

CHECKPOINT_STRATEGIES: tuple[str, ...] = ("laplace", "random_heads", "finetune")
"""Strategies that start from the trained model in ``training.init_from``."""

ONE_MEMBER_STRATEGIES: tuple[str, ...] = ("mse", "from_metatomic")
"""Strategies that work with a single member (``model.num_members`` 1)."""

EnergyLossName = Literal["gaussian_nll_ensemble", "gaussian_crps_ensemble"]
"""Keys of :py:data:`shallow_ensemble.losses.ENERGY_LOSSES` (the tests check that
they are the same)."""

ForcesLossName = Literal[
    "gaussian_nll_ensemble", "gaussian_nll_full_ensemble", "gaussian_crps_ensemble"
]
"""Keys of :py:data:`shallow_ensemble.losses.FORCE_LOSSES` (the tests check that
they are the same)."""

Target = Literal["full", "heads"]
"""What a fine-tune trains: the full model or the heads only."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the structures are and how their energies and forces are named."""

    train: str
    """Training structures, extended XYZ (eV, angstrom). In a configuration file, a
    relative path (here, in ``valid`` and ``test``, and in ``--set`` overrides) is
    taken from the file's folder."""
    valid: str | float
    """Validation structures (early stopping, calibration): a file, or a fraction
    of ``train`` split off at random with ``split_seed``."""
    test: str | float | None = None
    """Optional held-out test structures (a file, or a fraction of ``train``),
    evaluated after training."""
    energy_key: str = "energy"
    """Name of the energy in the XYZ header (ASE calculator or ``info`` key)."""
    forces_key: str = "forces"
    """Name of the per-atom forces array."""
    stress_key: str = "stress"
    """Name of the per-frame stress (eV/Å³, ASE's sign convention, 6 Voigt or 9
    components; ASE writes it with ``write(..., format="extxyz")``). Frames without
    it train on energies and forces only; it needs a cell periodic in 3D."""
    virial_key: str = "virial"
    """Name of the per-frame virial (eV, 9 components; the virial is minus the volume
    times the stress), read as a stress when a frame has no ``stress_key``."""
    split_seed: int = 0
    """Seed of the random split when ``valid`` or ``test`` are fractions."""
    streaming: bool = False
    """Stream the structures instead of keeping every neighbour list in memory (about
    360 KB per 192-atom water frame): a first pass validates the frames (with a
    progress bar) and writes them into a frame cache, and the neighbour lists are
    built batch by batch. For datasets larger than memory; it trains the same model
    as the in-memory mode for the same seed (docs/performance.md)."""
    num_workers: int = 0
    """With ``streaming``: worker processes that build the batches (neighbour lists)
    while the model trains; 0 builds them in the training process."""
    cache_dir: str | None = None
    """With ``streaming``: folder of the frame caches, kept and reused while the data
    files and keys do not change (relative to the configuration file); by default a
    temporary folder, removed when training ends."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The model trained from scratch, or the exported model to extend."""

    kind: str = "soap_bpnn"
    """Kind of model trained from scratch (a registered model kind, see
    :py:mod:`shallow_ensemble.kinds`); the architecture keys below belong to it."""
    num_members: int = 16
    """Ensemble members ``M`` (heads). The reference works used 64; 16 gives
    calibration of similar quality at a quarter of the member-force cost."""
    cutoff: float = 5.0
    """Radial cutoff, angstrom."""
    cutoff_width: float = 0.5
    """Width of the smooth switching region before the cutoff, angstrom (more than
    0, less than ``cutoff``)."""
    max_radial: int = 6
    """Largest radial index of the density expansion at l = 0 (0 or more: 0 is a
    single radial function)."""
    max_angular: int = 4
    """Largest angular momentum of the density expansion (0 or more)."""
    hidden_sizes: list[int] = field(default_factory=lambda: [128, 64])
    """MLP widths (at least one layer, each at least 1); the last one is the size of
    the last-layer features."""
    from_metatomic: str | None = None
    """Extend this exported metatomic model (``.pt``, e.g. trained with metatrain)
    instead of training a backbone: its energy is the ensemble mean, its per-atom
    last-layer features carry the heads (strategies ``from_metatomic`` or
    ``protocol``; see docs/metatomic-models.md). The other architecture keys are
    then unused."""
    features_output: str = "auto"
    """With ``from_metatomic``: the model's per-atom last-layer feature output
    (``auto``: ``mtt::aux::energy_last_layer_features``, else ``feature``)."""


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """How the model is trained: the strategy, the optimiser and the losses."""

    strategy: StrategyName = "energy_force_nll"
    """The training recipe, a preset list of stages (see docs/strategies.md):
    ``mse`` (one head, MSE on energies and forces), ``energy_nll`` (energy NLL and
    MSE on the mean forces), ``energy_force_nll`` (joint energy and force NLL),
    ``laplace`` and ``random_heads`` (heads sampled around the head of
    ``init_from``, no training), ``from_metatomic`` (``model.from_metatomic`` as a
    one-member ensemble), ``deep_ensemble`` (``model.num_members`` MSE models,
    stacked), ``finetune`` (joint NLL from the ensemble in ``init_from``) or
    ``protocol`` (``mse`` -> ``laplace`` -> ``finetune`` in one run, see the
    ``protocol`` section; recommended for new models)."""
    epochs: int = 100
    """Number of passes over the training set."""
    warmup_epochs: int | None = None
    """Epochs of MSE on the ensemble mean before a probabilistic loss starts
    (default: a fifth of ``epochs``, none for ``finetune``); guards NLL against
    drifting offsets. Must be less than ``epochs`` for the probabilistic strategies
    (``energy_nll``, ``energy_force_nll``, ``finetune``, and ``protocol`` with
    ``protocol.first: energy_nll``)."""
    batch_size: int = 8
    """Structures per optimiser step."""
    learning_rate: float = 3e-3
    """Initial Adam learning rate."""
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """``cosine`` (decay to 1% over training) or ``constant``."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    energy_weight: float = 1.0
    """Weight of the energy term (losses on per-atom energies, eV)."""
    forces_weight: float = 1.0
    """Weight of the forces term (eV/angstrom)."""
    stress_weight: float = 1.0
    """Weight of the stress term, on the frames that have a stress: losses on the
    virial per atom, volume times stress over the number of atoms (eV, the scale of
    the per-atom energy), averaged over all the structures of a batch (the frames
    without stress count as zero). The strategies that train member forces train
    the member stresses with ``forces_loss``'s kind (logged as ``stress_nll`` or
    ``stress_crps``); the others an MSE of the mean (``stress_mse``)."""
    energy_loss: EnergyLossName = "gaussian_nll_ensemble"
    """Probabilistic energy loss: Gaussian NLL or CRPS of the per-atom energies
    (logged as ``energy_nll`` or ``energy_crps``)."""
    forces_loss: ForcesLossName = "gaussian_nll_ensemble"
    """Probabilistic forces loss (the stages that train member forces:
    ``energy_force_nll``, ``finetune``): Gaussian NLL per component, NLL with the
    3x3 covariance per atom (``gaussian_nll_full_ensemble``) or CRPS (logged as
    ``forces_nll``, ``forces_nll_full`` or ``forces_crps``)."""
    init_from: str | None = None
    """Checkpoint to start from: the trained model that ``laplace``,
    ``random_heads`` and ``finetune`` build on (relative to the config file). Its
    architecture and cutoff replace the ``model`` section, except
    ``model.num_members`` for ``laplace`` and ``random_heads``."""
    heads_learning_rate: float | None = None
    """Learning rate of the heads (default: ``learning_rate``)."""
    finetune_target: Target = "full"
    """``finetune``: train the ``full`` model (recommended) or the ``heads`` only."""
    pin_mean: bool = False
    """``finetune``: keep the mean of the heads fixed while the members spread. With
    ``finetune_target: full`` on an extended metatomic model (kind ``metatomic``),
    keep the wrapped model's energies and forces exactly as the mean: a frozen copy
    gives the mean, the fine-tuned copy the members' deviations (the exported model
    runs both)."""
    random_heads_std: float = 0.5
    """``random_heads``: spread of the heads around the trained one, relative to the
    root mean square of its weights."""
    grad_clip: float = 10.0
    """Clip the gradient norm to this value (0 disables)."""
    select_epoch: Literal["calibrated_nll", "loss"] = "calibrated_nll"
    """How the kept model (``best.ckpt``, then ``model.ckpt``) is chosen among the
    epochs of a probabilistic stage: ``calibrated_nll``, the validation loss with each
    Gaussian NLL term at the value it has after the calibration that follows
    training (the NLL at the NLL-optimal global factor: an ensemble that is right but
    too confident, as the energy NLL makes it on a small training set, is not
    penalised for what the calibration fixes); ``loss``, the validation loss itself.
    The MSE warm-up and MSE stages use the loss."""
    seed: int = 0
    """Seed for initialisation and shuffling."""
    dtype: Literal["float32", "float64"] = "float32"
    """Floating-point precision of the model and the data in training."""
    device: str = "cpu"
    """``cpu`` or ``cuda`` (or ``cuda:N``, N the index of a GPU from 0)."""


@dataclass(frozen=True, kw_only=True)
class LaplaceConfig:
    """Laplace sampling of the heads (``laplace``, and ``protocol`` after ``mse``)."""

    regularizer: Literal["auto", "fit"] | float = "fit"
    """``auto`` (smallest value keeping C + rI positive definite), ``fit`` (minimise
    the validation NLL together with alpha) or a number."""
    features: Literal["structure", "atom"] = "structure"
    """Covariance of ``structure`` features (per-atom averages, matching per-atom
    energy losses) or of ``atom`` features (raw per-atom features)."""


@dataclass(frozen=True, kw_only=True)
class ProtocolConfig:
    """The stages of ``strategy: protocol``."""

    first: Literal["mse", "energy_nll"] = "mse"
    """First stage of ``strategy: protocol``: ``mse`` (then Laplace sampling) or
    ``energy_nll``; it runs for ``training.epochs``."""
    finetune_epochs: int = 10
    """Epochs of the final full-model fine-tune with the energy + force NLL."""
    finetune_learning_rate: float = 1e-3
    """Learning rate of the fine-tune."""
    finetune_target: Target = "full"
    """Fine-tune the ``full`` model or the ``heads`` only."""


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """Recalibration of the uncertainties after training."""

    enabled: bool = True
    """Fit the calibration factors (alpha) on the validation set after training."""
    noise_floor: bool = True
    """Also fit a noise floor model on the validation set, sigma^2 = (a *
    sigma_ens)^2 + sigma_0^2 with a fitted factor a, sigma_ens the member spread (per
    atom for energies;
    for force components one floor per element or one for all elements), kept where
    it lowers the cross-validated NLL: components the members all predict alike
    (atoms on high-symmetry sites, atoms without neighbours) get an uncertainty, and
    no longer inflate the others. Where a floor is kept, the members are stretched
    by the factor of the components whose uncertainty the ensemble term rules.
    ``false``: the factors alone."""


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole configuration: one object per section."""

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    laplace: LaplaceConfig = field(default_factory=LaplaceConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ShallowEnsembleError, ValueError):
    """A configuration file or override is invalid."""


_SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "calibration": CalibrationConfig,
    "laplace": LaplaceConfig,
    "protocol": ProtocolConfig,
}
