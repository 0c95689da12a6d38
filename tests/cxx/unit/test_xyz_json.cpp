// Catch2 tests for the driver's helpers that do not need torch: the extended XYZ
// reader and the JSON writer. Built with -DSHALLOW_ENSEMBLE_BUILD_TESTS=ON, run by
// ctest (under valgrind when it is installed).
#ifdef SHALLOW_ENSEMBLE_CATCH2_V3
#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
using Catch::Approx;
#else
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
#endif

#include <cstdio>
#include <fstream>
#include <string>

#include "json.hpp"
#include "xyz.hpp"

using namespace shallow_ensemble;
using Catch::Matchers::Contains;

namespace {

std::string write_file(const std::string& name, const std::string& content) {
    auto path = std::string("shallow-ensemble-test-") + name;
    std::ofstream(path) << content;
    return path;
}

}  // namespace

TEST_CASE("periodic extended XYZ, second frame") {
    auto path = write_file("periodic.xyz",
        "1\n"
        "Lattice=\"1 0 0 0 1 0 0 0 1\" Properties=species:S:1:pos:R:3\n"
        "H 0 0 0\n"
        "\n"
        "2\n"
        "Lattice=\"5.0 0.0 0.0 0.5 6.0 0.0 0.0 0.0 7.0\" "
        "Properties=species:S:1:pos:R:3:forces:R:3 energy=-1.5 pbc=\"T T F\"\n"
        "Si  0.1 0.2 0.3  9 9 9\n"
        "O   1.0 2.0 3.5  9 9 9\n"
    );
    auto frame = read_xyz_frame(path, 1);
    REQUIRE(frame.types == std::vector<int32_t>{14, 8});
    CHECK(frame.positions[1][2] == 3.5);
    CHECK(frame.cell[1][0] == 0.5);
    CHECK(frame.cell[2][2] == 7.0);
    CHECK(frame.has_lattice);
    CHECK(frame.pbc == std::array<bool, 3>{true, true, false});

    CHECK_THROWS_WITH(read_xyz_frame(path, 2), Contains("has 2 frame(s)"));
    std::remove(path.c_str());
}

TEST_CASE("non-periodic XYZ: plain columns, Z column") {
    auto plain = write_file("plain.xyz", "2\ncomment without keys\nC 0 0 0\nH 0 0 1.1\n");
    auto frame = read_xyz_frame(plain, 0);
    CHECK(frame.types == std::vector<int32_t>{6, 1});
    CHECK_FALSE(frame.has_lattice);
    CHECK(frame.pbc == std::array<bool, 3>{false, false, false});
    CHECK(frame.positions[1][2] == Approx(1.1));
    std::remove(plain.c_str());

    auto numbers = write_file("numbers.xyz", "1\nProperties=pos:R:3:Z:I:1\n1.0 2.0 3.0 8\n");
    frame = read_xyz_frame(numbers, 0);
    CHECK(frame.types == std::vector<int32_t>{8});
    CHECK(frame.positions[0][0] == 1.0);
    std::remove(numbers.c_str());
}

TEST_CASE("malformed XYZ files give clear errors") {
    auto unknown = write_file("unknown.xyz", "1\n\nXx 0 0 0\n");
    CHECK_THROWS_WITH(read_xyz_frame(unknown, 0), Contains("unknown element symbol 'Xx'"));
    std::remove(unknown.c_str());

    auto no_lattice = write_file("nolattice.xyz", "1\npbc=\"T T T\"\nH 0 0 0\n");
    CHECK_THROWS_WITH(read_xyz_frame(no_lattice, 0), Contains("periodic but has no Lattice"));
    std::remove(no_lattice.c_str());

    auto short_file = write_file("short.xyz", "3\n\nH 0 0 0\n");
    CHECK_THROWS_WITH(read_xyz_frame(short_file, 0), Contains("expected 3 atoms"));
    std::remove(short_file.c_str());

    CHECK_THROWS_WITH(read_xyz_frame("does-not-exist.xyz", 0), Contains("can not open"));
}

TEST_CASE("JSON writer") {
    auto json = Json::object();
    json.set("energy", 0.1);
    json.set("name", "a \"quoted\"\nline");
    json.set("atoms", Json(std::vector<int64_t>{1, 2}));
    json.set("missing", Json());
    auto rows = Json::array();
    rows.push(Json(std::vector<double>{1.0, -2.5}));
    json.set("rows", rows);
    auto text = json.dump(0);
    // full double precision: 0.1 round-trips
    CHECK_THAT(text, Contains("\"energy\": 0.10000000000000001"));
    CHECK_THAT(text, Contains("\"name\": \"a \\\"quoted\\\"\\nline\""));
    CHECK_THAT(text, Contains("\"atoms\": [1, 2]"));
    CHECK_THAT(text, Contains("\"missing\": null"));
    CHECK_THAT(text, Contains("\"rows\": [[1, -2.5]]"));
    CHECK(std::stod(text.substr(text.find(':') + 1)) == 0.1);
}
