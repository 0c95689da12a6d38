"""Configuration: one frozen dataclass per component, loaded from YAML with checks."""

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ShallowEnsembleError


@dataclass(frozen=True, kw_only=True)
class DataConfig:
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
    split_seed: int = 0
    """Seed of the random split when ``valid`` or ``test`` are fractions."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
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
    strategy: str = "energy_force_nll"
    """``mse``, ``energy_nll``, ``energy_force_nll``, ``laplace``, ``random_heads``,
    ``deep_ensemble``, ``finetune`` or ``protocol`` (see docs/strategies.md)."""
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
    lr_schedule: str = "cosine"
    """``cosine`` (decay to 1% over training) or ``constant``."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    energy_weight: float = 1.0
    """Weight of the energy term (losses on per-atom energies, eV)."""
    forces_weight: float = 1.0
    """Weight of the forces term (eV/angstrom)."""
    energy_loss: str = "gaussian_nll_ensemble"
    """Probabilistic energy loss: ``gaussian_nll_ensemble`` or
    ``gaussian_crps_ensemble``."""
    forces_loss: str = "gaussian_nll_ensemble"
    """Probabilistic forces loss (``energy_force_nll`` only):
    ``gaussian_nll_ensemble``, ``gaussian_nll_full_ensemble`` (3x3 per atom) or
    ``gaussian_crps_ensemble``."""
    init_from: str | None = None
    """Checkpoint to start from: the trained model that ``laplace``,
    ``random_heads`` and ``finetune`` build on (relative to the config file). Its
    architecture and cutoff replace the ``model`` section, except
    ``model.num_members`` for ``laplace`` and ``random_heads``."""
    heads_learning_rate: float | None = None
    """Learning rate of the heads (default: ``learning_rate``)."""
    finetune_target: str = "full"
    """``finetune``: train the ``full`` model (recommended) or the ``heads`` only."""
    pin_mean: bool = False
    """``finetune``: keep the mean of the heads fixed while the members spread."""
    random_heads_std: float = 0.5
    """``random_heads``: spread of the heads around the trained one, relative to the
    root mean square of its weights."""
    grad_clip: float = 10.0
    """Clip the gradient norm to this value (0 disables)."""
    seed: int = 0
    """Seed for initialisation and shuffling."""
    dtype: str = "float32"
    """``float32`` or ``float64``."""
    device: str = "cpu"
    """``cpu`` or ``cuda`` (or ``cuda:N``, N the index of a GPU from 0)."""


@dataclass(frozen=True, kw_only=True)
class LaplaceConfig:
    regularizer: str | float = "fit"
    """``auto`` (smallest value keeping C + rI positive definite), ``fit`` (minimise
    the validation NLL together with alpha) or a number."""
    features: str = "structure"
    """Covariance of ``structure`` features (per-atom averages, matching per-atom
    energy losses) or of ``atom`` features (raw per-atom features)."""


@dataclass(frozen=True, kw_only=True)
class ProtocolConfig:
    first: str = "mse"
    """First stage of ``strategy: protocol``: ``mse`` (then Laplace sampling) or
    ``energy_nll``; it runs for ``training.epochs``."""
    finetune_epochs: int = 10
    """Epochs of the final full-model fine-tune with the energy + force NLL."""
    finetune_learning_rate: float = 1e-3
    """Learning rate of the fine-tune."""
    finetune_target: str = "full"
    """Fine-tune the ``full`` model or the ``heads`` only."""


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    enabled: bool = True
    """Fit the calibration factors (alpha) on the validation set after training."""


@dataclass(frozen=True, kw_only=True)
class Config:
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


def _check_type(path: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a (possibly union) field annotation."""
    text = str(annotation).replace("typing.", "")
    allowed = [
        part.strip()
        for part in text.replace("<class '", "").replace("'>", "").split("|")
    ]
    if value is None:
        if "None" in allowed:
            return None
        raise ConfigError(f"`{path}` is null but must be set")
    if isinstance(value, bool):
        if "bool" in allowed:
            return value
    elif "int" in allowed and isinstance(value, int):
        return value
    elif "float" in allowed and isinstance(value, int | float):
        return float(value)
    elif "float" in allowed and isinstance(value, str):
        # YAML 1.1 reads `1e-3` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if "str" in allowed and isinstance(value, str):
        return value
    if "list[int]" in allowed and isinstance(value, list):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
    names = {
        "int": "an integer",
        "float": "a number",
        "str": "a string",
        "bool": "true or false",
        "list[int]": "a list of integers",
        "None": "null",
    }
    expected = " or ".join(names.get(a, a) for a in allowed)
    raise ConfigError(f"`{path}` is {value!r} but must be {expected}")


def config_from_dict(raw: dict[str, Any], base_dir: Path | None = None) -> Config:
    """Build a :py:class:`Config`, failing on unknown keys and wrong types.

    :param raw: nested dictionary (as read from YAML)
    :param base_dir: data paths relative to this folder (the config file's)
    """
    if not isinstance(raw, dict):
        raise ConfigError("the configuration must be a mapping of sections")
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        raise ConfigError(
            f"unknown section `{sorted(unknown)[0]}`; allowed sections: "
            f"{', '.join(_SECTIONS)}"
        )
    if "data" not in raw:
        raise ConfigError("missing section `data` (with at least `train` and `valid`)")
    sections = {}
    for name, cls in _SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"`{name}` must be a mapping, got {values!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in fields:
                raise ConfigError(
                    f"unknown key `{name}.{key}`; allowed keys in `{name}`: "
                    f"{', '.join(fields)}"
                )
        kwargs = {
            key: _check_type(f"{name}.{key}", value, fields[key].type)
            for key, value in values.items()
        }
        missing = [
            k
            for k, f in fields.items()
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and k not in kwargs
        ]
        if missing:
            raise ConfigError(f"missing required key `{name}.{missing[0]}`")
        if base_dir is not None:
            for key in ("train", "valid", "test", "init_from", "from_metatomic"):
                if isinstance(kwargs.get(key), str):
                    kwargs[key] = str((base_dir / kwargs[key]).resolve())
        sections[name] = cls(**kwargs)
    config = Config(**sections)
    _validate(config)
    return config


def _validate(config: Config) -> None:
    from .training.strategies import STRATEGIES

    t = config.training
    if t.strategy not in STRATEGIES and t.strategy != "protocol":
        raise ConfigError(
            f"`training.strategy` is '{t.strategy}' but must be one of: "
            f"{', '.join([*STRATEGIES, 'protocol'])}"
        )
    m = config.model
    checks = [
        (m.num_members >= 1, "model.num_members", "positive"),
        (0 < m.cutoff < math.inf, "model.cutoff", "positive and finite"),
        (
            0 < m.cutoff_width < m.cutoff,
            "model.cutoff_width",
            f"between 0 and `model.cutoff` ({m.cutoff}), both excluded",
        ),
        (m.max_radial >= 0, "model.max_radial", "at least 0"),
        (m.max_angular >= 0, "model.max_angular", "at least 0"),
        (
            len(m.hidden_sizes) > 0 and all(h >= 1 for h in m.hidden_sizes),
            "model.hidden_sizes",
            "a non-empty list of positive integers",
        ),
        (t.epochs >= 1, "training.epochs", "at least 1"),
        (
            t.warmup_epochs is None or t.warmup_epochs >= 0,
            "training.warmup_epochs",
            "at least 0 (or null)",
        ),
        (t.batch_size >= 1, "training.batch_size", "at least 1"),
        (t.learning_rate > 0, "training.learning_rate", "positive"),
        (
            t.heads_learning_rate is None or t.heads_learning_rate >= 0,
            "training.heads_learning_rate",
            "at least 0 (or null)",
        ),
        (t.weight_decay >= 0, "training.weight_decay", "at least 0"),
        (t.energy_weight >= 0, "training.energy_weight", "at least 0"),
        (t.forces_weight >= 0, "training.forces_weight", "at least 0"),
        (t.grad_clip >= 0, "training.grad_clip", "at least 0 (0 disables clipping)"),
        (t.dtype in ("float32", "float64"), "training.dtype", "float32 or float64"),
        (
            t.lr_schedule in ("cosine", "constant"),
            "training.lr_schedule",
            "cosine or constant",
        ),
    ]
    checks += [
        (
            t.finetune_target in ("full", "heads"),
            "training.finetune_target",
            "full or heads",
        ),
        (t.random_heads_std > 0, "training.random_heads_std", "positive"),
        (
            config.laplace.features in ("structure", "atom"),
            "laplace.features",
            "structure or atom",
        ),
        (
            config.laplace.regularizer in ("auto", "fit")
            or (
                not isinstance(config.laplace.regularizer, str)
                and config.laplace.regularizer > 0
            ),
            "laplace.regularizer",
            "auto, fit or a positive number",
        ),
        (
            config.protocol.first in ("mse", "energy_nll"),
            "protocol.first",
            "mse or energy_nll",
        ),
        (
            config.protocol.finetune_target in ("full", "heads"),
            "protocol.finetune_target",
            "full or heads",
        ),
        (
            config.protocol.finetune_epochs >= 1,
            "protocol.finetune_epochs",
            "at least 1",
        ),
        (
            config.protocol.finetune_learning_rate > 0,
            "protocol.finetune_learning_rate",
            "positive",
        ),
    ]
    for ok, key, rule in checks:
        if not ok:
            value = _get(config, key)
            raise ConfigError(f"`{key}` is {value!r} but must be {rule}")
    if not _is_device(t.device):
        raise ConfigError(
            f"`training.device` is {t.device!r} but must be 'cpu', 'cuda' or 'cuda:N' "
            "(N: the index of a GPU, from 0)"
        )
    _check_warmup(config)
    from .kinds import kind_names

    if config.model.kind not in kind_names():
        raise ConfigError(
            f"`model.kind` is '{config.model.kind}' but must be one of: "
            f"{', '.join(kind_names())}"
        )
    needs_init = ("laplace", "random_heads", "finetune")
    if t.strategy in needs_init and t.init_from is None:
        raise ConfigError(
            f"strategy '{t.strategy}' starts from a trained model: set "
            "`training.init_from` to its checkpoint"
        )
    if t.strategy == "from_metatomic" and config.model.from_metatomic is None:
        raise ConfigError(
            "strategy 'from_metatomic' extends an exported model: set "
            "`model.from_metatomic` to its .pt file"
        )
    if (
        t.strategy
        not in (
            "from_metatomic",
            "protocol",
        )
        and config.model.from_metatomic is not None
    ):
        raise ConfigError(
            f"`model.from_metatomic` is set, but strategy '{t.strategy}' does not use "
            "it: use 'protocol' (or 'from_metatomic', then 'laplace' and 'finetune')"
        )
    if t.strategy not in ("mse", "from_metatomic") and config.model.num_members < 2:
        raise ConfigError(
            f"`model.num_members` is {config.model.num_members} but strategy "
            f"'{t.strategy}' needs at least 2 members"
        )


def _is_device(device: str) -> bool:
    """Whether ``device`` names a CPU or CUDA device in torch's syntax."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return False
    return parsed.type in ("cpu", "cuda")


def _check_warmup(config: Config) -> None:
    """A probabilistic strategy must train beyond its MSE warm-up."""
    from .training.strategies import STRATEGIES

    t = config.training
    if t.warmup_epochs is None or t.warmup_epochs < t.epochs:
        return  # null is a fifth of the epochs (none for finetune): always fewer
    if t.strategy == "protocol":
        # its fine-tune stage has no warm-up; the first stage uses training.*
        first = config.protocol.first
        if config.model.from_metatomic is not None:
            return  # the first stage is from_metatomic, which does not train
        if not STRATEGIES[first].probabilistic:
            return
        what = f"the first stage '{first}' of strategy 'protocol' (`protocol.first`)"
    elif STRATEGIES[t.strategy].probabilistic:
        what = f"strategy '{t.strategy}'"
    else:
        return
    raise ConfigError(
        f"`training.warmup_epochs` is {t.warmup_epochs} but `training.epochs` is "
        f"{t.epochs}: {what} would train only the MSE warm-up and never its "
        "probabilistic loss; set `training.warmup_epochs` below `training.epochs` "
        "(or null for the default)"
    )


def _get(config: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override `{item}` must look like `section.key=value`")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override key `{dotted}` must look like `section.key`")
        if raw.get(parts[0]) is None:
            raw[parts[0]] = {}
        section = raw[parts[0]]
        if not isinstance(section, dict):
            raise ConfigError(f"`{parts[0]}` is not a section")
        try:
            section[parts[1]] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(
                f"override `{item}`: the value is not valid YAML ({error})"
            )
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML configuration file, apply ``--set`` overrides, validate it.

    Data paths (from the file or from overrides) are taken relative to the
    configuration file's folder and stored as absolute paths; the files are read
    (and their existence checked) when training starts.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file '{path}' does not exist")
    with open(path) as fd:
        try:
            raw = yaml.safe_load(fd) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"'{path}' is not valid YAML: {error}")
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, base_dir=path.parent)
