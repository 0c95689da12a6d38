// Minimal reader for one frame of an extended XYZ file.
#ifndef SHALLOW_ENSEMBLE_XYZ_HPP
#define SHALLOW_ENSEMBLE_XYZ_HPP

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace shallow_ensemble {

/// One structure: atomic numbers, positions (angstrom), cell (rows are the
/// vectors a, b, c; zero when the file has no `Lattice`) and periodicity.
struct Frame {
    std::vector<int32_t> types;
    std::vector<std::array<double, 3>> positions;
    std::array<std::array<double, 3>, 3> cell = {};
    std::array<bool, 3> pbc = {false, false, false};
    bool has_lattice = false;
};

/// Read frame `index` (0-based) of the extended XYZ file at `path`.
///
/// Understands `Properties=` (the species column `species:S:1` as element symbol,
/// or `Z:I:1` as atomic number, and the `pos:R:3` column; other columns are
/// skipped), `Lattice="ax ay az bx by bz cx cy cz"` and `pbc="T T T"`. Without
/// `Properties`, the columns are `symbol x y z`. `Lattice` without `pbc` means
/// periodic in all directions; without `Lattice` the structure must not be
/// periodic. Throws `std::runtime_error` with the line number on malformed input.
Frame read_xyz_frame(const std::string& path, int64_t index);

/// Atomic number of an element symbol (`"Si"` -> 14); throws when unknown.
int32_t atomic_number(const std::string& symbol);

}  // namespace shallow_ensemble

#endif
