"""Configure and build targets of the root CMakeLists.txt for tests (C++ driver and
its Catch2 unit tests, LAMMPS plugin), against the torch, metatensor, metatomic and
vesin wheels installed in this environment. Not a test module.

A missing tool skips the test, or fails it under SHALLOW_ENSEMBLE_REQUIRE_ENGINES=1
(tests/conftest.py)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
# the driver and its unit tests (tests/cxx/), configured and built once per session
CXX_BUILD = ROOT / "build" / "cxx-tests"


def run_checked(command, timeout=1800, **kwargs):
    """Run ``command``; fail the test with its output if it fails."""
    process = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if process.returncode != 0:
        pytest.fail(
            f"`{' '.join(map(str, command))}` failed ({process.returncode}):\n"
            f"{process.stdout[-5000:]}\n{process.stderr[-5000:]}"
        )
    return process


def _compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _prefix_path():
    import metatensor
    import metatensor.torch
    import metatomic.torch
    import torch

    return ";".join(
        [
            torch.utils.cmake_prefix_path,
            metatensor.utils.cmake_prefix_path,
            metatensor.torch.utils.cmake_prefix_path,
            metatomic.torch.utils.cmake_prefix_path,
        ]
    )


def require_tools() -> str:
    """The C++ compiler; skip the test when cmake or a compiler is missing."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) is installed")
    return compiler


_CATCH2_PROBE = """cmake_minimum_required(VERSION 3.22)
project(catch2_probe LANGUAGES CXX)
find_package(Catch2 CONFIG REQUIRED)
message(STATUS "Catch2 version: ${Catch2_VERSION}")
"""


def require_catch2(folder: Path) -> str:
    """Catch2's version (as CMake finds it); skip the test when it is missing.

    Probed with a tiny project in ``folder``, so that a failed ``find_package`` never
    reaches the shared build folder's cache."""
    compiler = require_tools()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "CMakeLists.txt").write_text(_CATCH2_PROBE)
    process = subprocess.run(
        [
            "cmake",
            "-S",
            folder,
            "-B",
            folder / "build",
            f"-DCMAKE_CXX_COMPILER={compiler}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if process.returncode != 0:
        pytest.skip("Catch2 is not installed (e.g. apt-get install catch2)")
    return process.stdout.split("Catch2 version: ")[1].split()[0]


def build_target(build: Path, target: str, defines: list[str] = ()) -> None:
    """Configure the root project into ``build`` (kept between sessions, so later
    runs only rebuild what changed) and build ``target``; skip the test when cmake
    or a C++ compiler is missing."""
    compiler = require_tools()
    import vesin

    run_checked(
        [
            "cmake",
            "-S",
            ROOT,
            "-B",
            build,
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CXX_COMPILER={compiler}",
            f"-DCMAKE_PREFIX_PATH={_prefix_path()}",
            f"-DVESIN_PREFIX={os.path.dirname(vesin.__file__)}",
            *defines,
        ]
    )
    run_checked(["cmake", "--build", build, "--target", target, "--parallel", "2"])
