#!/usr/bin/env bash
# The prepared GPU check, one command from the repository root (see
# docs/performance.md, "GPU check"):
#
#   bash benchmarks/device_check.sh                 # on a GPU machine: --device cuda
#   bash benchmarks/device_check.sh --device cpu --tiny --sizes 1 --members 2 ...
#                                                   # the dry run tests/test_device_check.py does
#
# 1. installs the wheels carried in .device-wheels/ (benchmarks/device_wheels.sh
#    downloads them; the GPU machine has no network) into a private folder, and puts
#    it and python/ on PYTHONPATH (without that folder: the environment's packages);
# 2. builds the C++ driver into build/cxx-tests (the folder tests/cxx uses);
# 3. runs the CUDA tests (pytest -m cuda) with SHALLOW_ENSEMBLE_REQUIRE_CUDA=1 when
#    the device is CUDA (on the CPU they only collect and skip);
# 4. prints the table of benchmarks/device_check.py (other arguments go to it).
#
# Exits non-zero if a step failed; the table is printed in any case.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --device=*) DEVICE="${1#--device=}"; shift ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
PYTHON="${PYTHON:-python3}"
WHEELS="${SHALLOW_ENSEMBLE_WHEELS:-.device-wheels}"
BUILD="${SHALLOW_ENSEMBLE_BUILD:-build/cxx-tests}"
status=0

step() { echo "== $* ($(date +%T))"; }

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    step "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS"
    SITE="${TMPDIR:-/tmp}/shallow-ensemble-site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$SITE:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count())" || exit 1

step "building the C++ driver in $BUILD"
DRIVER=()
PREFIX=$("$PYTHON" -c 'import torch, metatensor, metatensor.torch, metatomic.torch; print(";".join([torch.utils.cmake_prefix_path, metatensor.utils.cmake_prefix_path, metatensor.torch.utils.cmake_prefix_path, metatomic.torch.utils.cmake_prefix_path]))')
VESIN=$("$PYTHON" -c "import vesin, os; print(os.path.dirname(vesin.__file__))")
if cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$PREFIX" \
        -DVESIN_PREFIX="$VESIN" >"$BUILD.configure.log" 2>&1 \
    && cmake --build "$BUILD" --target shallow-ensemble-driver --parallel "$(nproc)" \
        >"$BUILD.build.log" 2>&1; then
    DRIVER=(--driver "$BUILD/cxx/shallow-ensemble-driver")
else
    echo "FAILED: the driver did not build; the end of the log:"
    tail -n 30 "$BUILD.configure.log" "$BUILD.build.log" 2>/dev/null
    status=1
fi

step "CUDA tests (pytest -m cuda)"
if [ "$DEVICE" != cpu ]; then
    export SHALLOW_ENSEMBLE_REQUIRE_CUDA=1
fi
"$PYTHON" -m pytest -q -p no:cacheprovider -m cuda -rfEs \
    tests/test_devices.py tests/cxx/test_driver.py
code=$?
# 5: nothing selected (a test file without CUDA tests) is not a failure
if [ $code -ne 0 ] && [ $code -ne 5 ]; then
    status=1
fi

step "device check on $DEVICE"
"$PYTHON" benchmarks/device_check.py --device "$DEVICE" "${DRIVER[@]}" "${ARGS[@]}" || status=1
step "done (status $status)"
exit $status
