"""Building a configuration from a dictionary or a YAML file, with overrides."""

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from .checks import _check_type, _validate
from .schema import _SECTIONS, Config, ConfigError


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
            paths = (
                "train",
                "valid",
                "test",
                "cache_dir",
                "init_from",
                "from_metatomic",
            )
            for key in paths:
                if isinstance(kwargs.get(key), str):
                    kwargs[key] = str((base_dir / kwargs[key]).resolve())
        sections[name] = cls(**kwargs)
    config = Config(**sections)
    _validate(config)
    return config


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
