"""Configuration: one frozen dataclass per component, loaded from YAML with checks.

The allowed values of a key are its annotation: a ``Literal[...]`` lists the choices,
which :py:func:`config_from_dict` checks and names in its messages. Every key is
documented by the string under its field; :py:func:`configuration_reference` turns
them into ``docs/configuration.md`` (``python -m shallow_ensemble.config PATH``
rewrites that file).
"""

import ast
import dataclasses
import inspect
import json
import math
import re
import sys
import textwrap
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from .errors import ShallowEnsembleError


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
    split_seed: int = 0
    """Seed of the random split when ``valid`` or ``test`` are fractions."""


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
    """``finetune``: keep the mean of the heads fixed while the members spread."""
    random_heads_std: float = 0.5
    """``random_heads``: spread of the heads around the trained one, relative to the
    root mean square of its weights."""
    grad_clip: float = 10.0
    """Clip the gradient norm to this value (0 disables)."""
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


_NONE = type(None)


def _alternatives(annotation: Any) -> tuple[Any, ...]:
    """The members of a union annotation (the annotation itself otherwise)."""
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def _convert(value: Any, alternatives: tuple[Any, ...]) -> tuple[bool, Any]:
    """``(True, value)`` converted to the first alternative that accepts it, or
    ``(False, None)``. Only ``bool`` accepts booleans; integers are accepted for
    numbers; a string that reads as a number is one (YAML 1.1 reads ``1e-3`` as a
    string)."""
    if isinstance(value, bool):
        return (bool in alternatives, value)
    if isinstance(value, int) and int in alternatives:
        return True, value
    if isinstance(value, int | float) and float in alternatives:
        return True, float(value)
    if isinstance(value, str):
        if float in alternatives:
            try:
                return True, float(value)
            except ValueError:
                pass
        for alternative in alternatives:
            if get_origin(alternative) is Literal and value in get_args(alternative):
                return True, value
        if str in alternatives:
            return True, value
    if isinstance(value, list):
        for alternative in alternatives:
            if get_origin(alternative) is list:
                (item,) = get_args(alternative)
                if all(isinstance(v, item) and not isinstance(v, bool) for v in value):
                    return True, list(value)
    return False, None


_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
}


def _describe(annotation: Any) -> str:
    """What a value of ``annotation`` must be, in words: the choices of a
    ``Literal``, the names of the types, ``null``."""
    alternatives = _alternatives(annotation)
    words: list[str] = []
    for alternative in alternatives:
        if alternative is _NONE:
            continue
        if get_origin(alternative) is Literal:
            words.extend(str(choice) for choice in get_args(alternative))
        elif get_origin(alternative) is list:
            (item,) = get_args(alternative)
            words.append(f"a list of {_TYPE_NAMES[item].split()[-1]}s")
        else:
            words.append(_TYPE_NAMES[alternative])
    if _NONE in alternatives:
        words.append("null")
    if len(alternatives) == 1 and len(words) > 2:  # choices only
        return "one of: " + ", ".join(words)
    return _join_or(words)


def _join_or(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def choices(annotation: Any) -> tuple[Any, ...]:
    """The values a ``Literal`` annotation allows (those of every ``Literal`` in a
    union), e.g. ``choices(TrainingConfig.__annotations__["dtype"])``."""
    return tuple(
        choice
        for alternative in _alternatives(annotation)
        if get_origin(alternative) is Literal
        for choice in get_args(alternative)
    )


def _check_type(path: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against a field annotation (possibly a union of types and
    ``Literal`` choices), converted where a number is given for a float."""
    if value is None:
        if _NONE in _alternatives(annotation):
            return None
        raise ConfigError(f"`{path}` is null but must be set")
    accepted, converted = _convert(value, _alternatives(annotation))
    if accepted:
        return converted
    raise ConfigError(f"`{path}` is {value!r} but must be {_describe(annotation)}")


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
    """Ranges and combinations of values (the types and choices are checked by
    :py:func:`_check_type`)."""
    t = config.training
    m = config.model
    regularizer = config.laplace.regularizer
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
        (t.random_heads_std > 0, "training.random_heads_std", "positive"),
        (
            isinstance(regularizer, str) or regularizer > 0,
            "laplace.regularizer",
            "auto, fit or a positive number",
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

    trainable = kind_names(from_scratch=True)
    if config.model.kind not in trainable:
        raise ConfigError(
            f"`model.kind` is '{config.model.kind}' but must be a kind trained from "
            f"scratch: {', '.join(trainable)}"
        )
    if t.strategy in CHECKPOINT_STRATEGIES and t.init_from is None:
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
        t.strategy not in ("from_metatomic", "protocol")
        and config.model.from_metatomic is not None
    ):
        raise ConfigError(
            f"`model.from_metatomic` is set, but strategy '{t.strategy}' does not use "
            "it: use 'protocol' (or 'from_metatomic', then 'laplace' and 'finetune')"
        )
    if t.strategy not in ONE_MEMBER_STRATEGIES and config.model.num_members < 2:
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
    t = config.training
    if t.warmup_epochs is None or t.warmup_epochs < t.epochs:
        return  # null is a fifth of the epochs (none for finetune): always fewer
    if t.strategy == "protocol":
        # its fine-tune stage has no warm-up; the first stage uses training.*
        first = config.protocol.first
        if config.model.from_metatomic is not None:
            return  # the first stage is from_metatomic, which does not train
        if first not in PROBABILISTIC_STRATEGIES:
            return
        what = f"the first stage '{first}' of strategy 'protocol' (`protocol.first`)"
    elif t.strategy in PROBABILISTIC_STRATEGIES:
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


# ------------------------------------------------------ configuration reference --
REFERENCE_INTRO = """\
A configuration is a YAML file with the sections below; only `data` (with `train`
and `valid`) is required. Unknown sections and keys are errors that list the
allowed ones. In a file, relative paths are taken from the file's folder.
`shallow-ensemble train CONFIG -o OUTDIR --set section.key=value` overrides a key
(the value is read as YAML). Runnable examples are in [`examples/`](../examples/);
the strategies are compared in [strategies.md](strategies.md)."""


def _field_docs(cls: type) -> dict[str, str]:
    """The string under each field of a dataclass (read from its source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _markdown(text: str) -> str:
    """reStructuredText markup of the docstrings as Markdown, one line per
    paragraph."""
    text = re.sub(r":py:\w+:`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)


def _yaml_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _type_words(annotation: Any) -> str:
    """The allowed values of a field, for the reference."""
    alternatives = _alternatives(annotation)
    words: list[str] = []
    for alternative in alternatives:
        if alternative is _NONE:
            words.append("`null`")
        elif get_origin(alternative) is Literal:
            words.extend(f"`{choice}`" for choice in get_args(alternative))
        elif get_origin(alternative) is list:
            (item,) = get_args(alternative)
            words.append(f"list of {_TYPE_NAMES[item].split()[-1]}s")
        elif alternative is bool:
            words.append("`true` or `false`")
        else:
            words.append(_TYPE_NAMES[alternative].split()[-1])
    return _join_or(words)


def configuration_reference() -> str:
    """``docs/configuration.md``: every section and key of the configuration, with
    its allowed values, its default and its documentation."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from python/shallow_ensemble/config.py by "
        "`python -m shallow_ensemble.config docs/configuration.md`; "
        "edit the docstrings there, not this file. -->",
        "",
        REFERENCE_INTRO,
    ]
    for section, cls in _SECTIONS.items():
        docs = _field_docs(cls)
        lines += ["", f"## `{section}`", "", _markdown(cls.__doc__ or "")]
        for item in dataclasses.fields(cls):
            if item.default is not dataclasses.MISSING:
                default = f"Default: `{_yaml_value(item.default)}`."
            elif item.default_factory is not dataclasses.MISSING:
                default = f"Default: `{_yaml_value(item.default_factory())}`."
            else:
                default = "Required."
            if not docs.get(item.name):
                raise ValueError(f"`{section}.{item.name}` has no docstring")
            lines += [
                "",
                f"### `{section}.{item.name}`",
                "",
                f"Allowed: {_type_words(item.type)}. {default}",
                "",
                _markdown(docs[item.name]),
            ]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m shallow_ensemble.config [PATH]``: write the configuration
    reference to PATH (``docs/configuration.md``), or print it."""
    args = sys.argv[1:] if argv is None else argv
    text = configuration_reference()
    if not args:
        sys.stdout.write(text)
    else:
        Path(args[0]).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
