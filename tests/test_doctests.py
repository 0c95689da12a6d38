"""The ``>>>`` examples in the package's docstrings run and give what they show."""

import doctest
import importlib
import pkgutil

import pytest

import shallow_ensemble


def modules_with_examples() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(
        shallow_ensemble.__path__, prefix="shallow_ensemble."
    ):
        if info.ispkg or info.name.endswith("__main__"):
            continue
        origin = importlib.util.find_spec(info.name).origin
        with open(origin, encoding="utf-8") as fd:
            if ">>>" in fd.read():
                names.append(info.name)
    return names


MODULES = modules_with_examples()


def test_examples_are_found():
    # a wrong package walk would find nothing and pass every parametrised case
    assert "shallow_ensemble.calibration.recalibrate" in MODULES
    assert len(MODULES) >= 5


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0, f"{name} has `>>>` but no example was run"
    assert result.failed == 0, f"{result.failed} example(s) failed in {name}"
