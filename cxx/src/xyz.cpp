#include "xyz.hpp"

#include <cctype>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>

namespace shallow_ensemble {

namespace {

const char* const ELEMENTS[] = {
    "H",  "He", "Li", "Be", "B",  "C",  "N",  "O",  "F",  "Ne", "Na", "Mg", "Al", "Si",
    "P",  "S",  "Cl", "Ar", "K",  "Ca", "Sc", "Ti", "V",  "Cr", "Mn", "Fe", "Co", "Ni",
    "Cu", "Zn", "Ga", "Ge", "As", "Se", "Br", "Kr", "Rb", "Sr", "Y",  "Zr", "Nb", "Mo",
    "Tc", "Ru", "Rh", "Pd", "Ag", "Cd", "In", "Sn", "Sb", "Te", "I",  "Xe", "Cs", "Ba",
    "La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb",
    "Lu", "Hf", "Ta", "W",  "Re", "Os", "Ir", "Pt", "Au", "Hg", "Tl", "Pb", "Bi", "Po",
    "At", "Rn", "Fr", "Ra", "Ac", "Th", "Pa", "U",  "Np", "Pu", "Am", "Cm", "Bk", "Cf",
    "Es", "Fm", "Md", "No", "Lr", "Rf", "Db", "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn",
    "Nh", "Fl", "Mc", "Lv", "Ts", "Og",
};

[[noreturn]] void fail(const std::string& path, int64_t line, const std::string& message) {
    throw std::runtime_error(path + ":" + std::to_string(line) + ": " + message);
}

std::string lower(std::string text) {
    for (auto& c: text) {
        c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    }
    return text;
}

/// Split the comment line in `key=value` pairs; values may be quoted with "" or
/// '' (and then contain spaces); keys without a value get "T".
std::map<std::string, std::string> parse_comment(const std::string& line) {
    std::map<std::string, std::string> result;
    size_t i = 0;
    const size_t n = line.size();
    auto skip_space = [&]() {
        while (i < n && std::isspace(static_cast<unsigned char>(line[i]))) {
            i++;
        }
    };
    auto read_token = [&]() {
        std::string token;
        if (i < n && (line[i] == '"' || line[i] == '\'')) {
            char quote = line[i++];
            while (i < n && line[i] != quote) {
                token += line[i++];
            }
            i++;  // closing quote
        } else {
            while (i < n && !std::isspace(static_cast<unsigned char>(line[i])) && line[i] != '=') {
                token += line[i++];
            }
        }
        return token;
    };
    while (true) {
        skip_space();
        if (i >= n) {
            break;
        }
        auto key = read_token();
        skip_space();
        if (i < n && line[i] == '=') {
            i++;
            skip_space();
            result[lower(key)] = read_token();
        } else if (!key.empty()) {
            // (emplace rather than `= "T"`: g++ 12 gives a false -Wrestrict there)
            result.emplace(lower(key), std::string(1, 'T'));
        } else {
            i++;  // stray character
        }
    }
    return result;
}

std::vector<std::string> split(const std::string& text, char separator) {
    std::vector<std::string> parts;
    std::string part;
    std::istringstream stream(text);
    while (std::getline(stream, part, separator)) {
        parts.push_back(part);
    }
    return parts;
}

std::vector<std::string> words(const std::string& text) {
    std::vector<std::string> result;
    std::istringstream stream(text);
    std::string word;
    while (stream >> word) {
        result.push_back(word);
    }
    return result;
}

double to_double(const std::string& text, const std::string& path, int64_t line) {
    try {
        size_t used = 0;
        double value = std::stod(text, &used);
        if (used != text.size()) {
            throw std::invalid_argument(text);
        }
        return value;
    } catch (const std::exception&) {
        fail(path, line, "expected a number, got '" + text + "'");
    }
}

bool to_bool(const std::string& text, const std::string& path, int64_t line) {
    auto value = lower(text);
    if (value == "t" || value == "true" || value == "1") {
        return true;
    }
    if (value == "f" || value == "false" || value == "0") {
        return false;
    }
    fail(path, line, "expected T or F in pbc, got '" + text + "'");
}

}  // namespace

int32_t atomic_number(const std::string& symbol) {
    for (size_t i = 0; i < sizeof(ELEMENTS) / sizeof(ELEMENTS[0]); i++) {
        if (symbol == ELEMENTS[i]) {
            return static_cast<int32_t>(i + 1);
        }
    }
    throw std::runtime_error("unknown element symbol '" + symbol + "'");
}

Frame read_xyz_frame(const std::string& path, int64_t index) {
    if (index < 0) {
        throw std::runtime_error("the frame index must be positive, got " + std::to_string(index));
    }
    std::ifstream file(path);
    if (!file) {
        throw std::runtime_error("can not open structure file '" + path + "'");
    }

    std::string line;
    int64_t line_number = 0;
    for (int64_t frame = 0;; frame++) {
        // skip empty lines between frames
        do {
            if (!std::getline(file, line)) {
                throw std::runtime_error(
                    "'" + path + "' has " + std::to_string(frame) + " frame(s), frame " +
                    std::to_string(index) + " was requested"
                );
            }
            line_number++;
        } while (words(line).empty());

        auto count_words = words(line);
        int64_t n_atoms = 0;
        try {
            n_atoms = std::stoll(count_words[0]);
        } catch (const std::exception&) {
            fail(path, line_number, "expected the number of atoms, got '" + line + "'");
        }
        if (count_words.size() != 1 || n_atoms < 0) {
            fail(path, line_number, "expected the number of atoms, got '" + line + "'");
        }

        if (frame < index) {
            for (int64_t i = 0; i < n_atoms + 1; i++) {
                if (!std::getline(file, line)) {
                    fail(path, line_number, "unexpected end of file inside a frame");
                }
                line_number++;
            }
            continue;
        }

        if (!std::getline(file, line)) {
            fail(path, line_number, "unexpected end of file: missing comment line");
        }
        line_number++;
        const auto comment_line = line_number;
        auto info = parse_comment(line);

        // columns: find the species and positions
        int64_t species_column = 0;
        bool species_are_numbers = false;
        int64_t position_column = 1;
        int64_t n_columns = 4;
        auto properties = info.find("properties");
        if (properties != info.end()) {
            auto fields = split(properties->second, ':');
            if (fields.size() % 3 != 0) {
                fail(path, comment_line, "malformed Properties='" + properties->second + "'");
            }
            species_column = -1;
            position_column = -1;
            int64_t column = 0;
            for (size_t f = 0; f < fields.size(); f += 3) {
                auto name = fields[f];
                int64_t width = 0;
                try {
                    width = std::stoll(fields[f + 2]);
                } catch (const std::exception&) {
                    fail(path, comment_line, "malformed Properties='" + properties->second + "'");
                }
                if (name == "species" && species_column < 0) {
                    species_column = column;
                    species_are_numbers = (lower(fields[f + 1]) == "i");
                } else if (name == "Z" && species_column < 0) {
                    species_column = column;
                    species_are_numbers = true;
                } else if (name == "pos") {
                    if (width != 3) {
                        fail(path, comment_line, "'pos' must have 3 columns");
                    }
                    position_column = column;
                }
                column += width;
            }
            n_columns = column;
            if (species_column < 0 || position_column < 0) {
                fail(path, comment_line, "Properties must contain 'species' (or 'Z') and 'pos'");
            }
        }

        Frame result;
        auto lattice = info.find("lattice");
        if (lattice != info.end()) {
            auto values = words(lattice->second);
            if (values.size() != 9) {
                fail(path, comment_line, "Lattice must have 9 values");
            }
            for (size_t k = 0; k < 9; k++) {
                result.cell[k / 3][k % 3] = to_double(values[k], path, comment_line);
            }
            result.has_lattice = true;
            result.pbc = {true, true, true};
        }
        auto pbc = info.find("pbc");
        if (pbc != info.end()) {
            auto values = words(pbc->second);
            if (values.size() == 1) {
                values = {values[0], values[0], values[0]};
            }
            if (values.size() != 3) {
                fail(path, comment_line, "pbc must have 1 or 3 values");
            }
            for (size_t k = 0; k < 3; k++) {
                result.pbc[k] = to_bool(values[k], path, comment_line);
            }
        }
        if (!result.has_lattice && (result.pbc[0] || result.pbc[1] || result.pbc[2])) {
            fail(path, comment_line, "the structure is periodic but has no Lattice");
        }

        result.types.reserve(static_cast<size_t>(n_atoms));
        result.positions.reserve(static_cast<size_t>(n_atoms));
        for (int64_t i = 0; i < n_atoms; i++) {
            if (!std::getline(file, line)) {
                fail(path, line_number, "unexpected end of file: expected " + std::to_string(n_atoms) + " atoms");
            }
            line_number++;
            auto columns = words(line);
            if (static_cast<int64_t>(columns.size()) < n_columns) {
                fail(path, line_number, "expected " + std::to_string(n_columns) + " columns");
            }
            const auto& species = columns[static_cast<size_t>(species_column)];
            if (species_are_numbers) {
                result.types.push_back(static_cast<int32_t>(to_double(species, path, line_number)));
            } else {
                try {
                    result.types.push_back(atomic_number(species));
                } catch (const std::exception& error) {
                    fail(path, line_number, error.what());
                }
            }
            std::array<double, 3> position = {};
            for (size_t k = 0; k < 3; k++) {
                position[k] = to_double(columns[static_cast<size_t>(position_column) + k], path, line_number);
            }
            result.positions.push_back(position);
        }
        return result;
    }
}

}  // namespace shallow_ensemble
