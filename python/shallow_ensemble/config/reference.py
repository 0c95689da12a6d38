"""``docs/configuration.md``, generated from the schema's field docstrings."""

import ast
import dataclasses
import inspect
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from .checks import _NONE, _TYPE_NAMES, _alternatives, _join_or
from .schema import _SECTIONS


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
        "<!-- Generated from python/shallow_ensemble/config/schema.py by "
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
