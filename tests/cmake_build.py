"""Configure and build targets of the root CMakeLists.txt for tests (C++ driver,
LAMMPS plugin), against the torch, metatensor, metatomic and vesin wheels installed
in this environment. Not a test module."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


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


def build_target(build: Path, target: str, defines: list[str] = ()) -> None:
    """Configure the root project into ``build`` (kept between sessions, so later
    runs only rebuild what changed) and build ``target``; skip the test when cmake
    or a C++ compiler is missing."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) is installed")
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
