"""Checking values against the schema: types and choices from the annotations,
ranges and combinations of values."""

import math
import types
from typing import Any, Literal, Union, get_args, get_origin

from .schema import (
    CHECKPOINT_STRATEGIES,
    ONE_MEMBER_STRATEGIES,
    PROBABILISTIC_STRATEGIES,
    Config,
    ConfigError,
)


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
        (t.stress_weight >= 0, "training.stress_weight", "at least 0"),
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
    _check_streaming(config)
    from ..kinds import kind_names

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


def _check_streaming(config: Config) -> None:
    """``data.num_workers`` and ``data.cache_dir`` belong to streaming datasets."""
    d = config.data
    if d.num_workers < 0:
        raise ConfigError(
            f"`data.num_workers` is {d.num_workers} but must be at least 0"
        )
    if d.streaming:
        return
    for key, value, default in (
        ("num_workers", d.num_workers, 0),
        ("cache_dir", d.cache_dir, None),
    ):
        if value != default:
            raise ConfigError(
                f"`data.{key}` is {value!r} but `data.streaming` is false: it is used "
                "by streaming datasets only; set `data.streaming: true` or remove it"
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
