"""The Catch2 unit tests of the driver's XYZ reader and JSON writer (tests/cxx/unit/),
built with ``-DSHALLOW_ENSEMBLE_BUILD_TESTS=ON`` into the driver tests' build folder
(``build/cxx-tests``) and run by ``ctest`` (under valgrind when it is installed).

Skips when cmake, a C++ compiler or Catch2 (v2 or v3, e.g. Debian's ``catch2``) is
missing; fails then under SHALLOW_ENSEMBLE_REQUIRE_ENGINES=1 (.ci/run installs them).
"""

import re
from pathlib import Path

from cmake_build import CXX_BUILD, build_target, require_catch2, run_checked


UNIT = Path(__file__).resolve().parent / "unit"


def expected_test_cases() -> int:
    """``TEST_CASE``s in the unit test sources."""
    sources = sorted(UNIT.glob("*.cpp"))
    assert sources
    pattern = re.compile(r"^\s*TEST_CASE\s*\(", re.MULTILINE)
    return sum(len(pattern.findall(path.read_text())) for path in sources)


def test_catch2_unit_tests_pass_under_ctest(tmp_path):
    require_catch2(tmp_path / "catch2-probe")
    build_target(
        CXX_BUILD, "shallow-ensemble-cxx-tests", ["-DSHALLOW_ENSEMBLE_BUILD_TESTS=ON"]
    )
    process = run_checked(
        ["ctest", "--output-on-failure", "--verbose", "--timeout", "600"],
        timeout=900,
        cwd=CXX_BUILD,
    )
    output = process.stdout
    assert "100% tests passed, 0 tests failed out of 1" in output, output[-5000:]
    # Catch2 v2 and v3 end with "All tests passed (N assertions in K test cases)"
    summary = re.search(
        r"All tests passed \((\d+) assertions? in (\d+) test cases?\)", output
    )
    assert summary is not None, output[-5000:]
    expected = expected_test_cases()
    assert expected >= 4
    assert int(summary.group(2)) == expected
    assert int(summary.group(1)) >= 20  # the CHECKs ran
