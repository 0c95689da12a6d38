// shallow-ensemble-driver: evaluate an exported shallow-ensemble model (metatomic
// TorchScript file) on one frame of an extended XYZ file and print JSON with the
// energy, its calibrated uncertainty, the ensemble members (per system and per
// atom) and the forces. `--domains N` runs the same calculation as a
// domain-decomposed engine (LAMMPS) would, and must give the same numbers.
//
// See docs/cxx.md for building, usage and the JSON layout.

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <torch/script.h>
#include <torch/torch.h>

#include <metatensor/torch.hpp>
#include <metatomic/torch.hpp>

#include <vesin.h>

#include "json.hpp"
#include "xyz.hpp"

namespace mts = metatensor_torch;
namespace mta = metatomic_torch;
using shallow_ensemble::Frame;
using shallow_ensemble::Json;

namespace {

/// The driver's positions, cells and lengths are in angstrom; energies in eV.
const std::string LENGTH_UNIT = "angstrom";
const std::string ENERGY_UNIT = "eV";

const char* const USAGE =
    "usage: shallow-ensemble-driver MODEL.pt STRUCTURE.xyz [options]\n"
    "\n"
    "Evaluate an exported shallow-ensemble model on one frame of an extended XYZ\n"
    "file and print JSON (energy, uncertainty, ensemble, per-atom values, forces).\n"
    "\n"
    "options:\n"
    "  --extensions DIR       folder with the model's compiled extensions\n"
    "                         (default: 'extensions/' next to MODEL.pt if present)\n"
    "  --device cpu|cuda[:N]  device to run the model on (default: cpu)\n"
    "  --dtype float64|float32  must match the model's dtype (default: the model's)\n"
    "  --selected i,j,k       only compute (and sum) the energies of these atoms\n"
    "  --domains N            split the (periodic) structure in N slabs along the\n"
    "                         first cell vector, evaluate each slab with its ghost\n"
    "                         atoms and selected_atoms, and sum (as LAMMPS does)\n"
    "  --frame K              0-based frame index in STRUCTURE.xyz (default: 0)\n"
    "  --no-check-consistency skip metatomic's input/output checks (faster)\n"
    "  -h, --help             show this message\n";

/// Command line errors: print the usage with the message, exit code 2.
struct UsageError: std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Arguments {
    std::string model;
    std::string structure;
    std::optional<std::string> extensions;
    std::string device = "cpu";
    std::optional<std::string> dtype;
    std::optional<std::vector<int64_t>> selected;
    int64_t domains = 0;
    int64_t frame = 0;
    bool check_consistency = true;
};

int64_t parse_integer(const std::string& text, const std::string& option) {
    try {
        size_t used = 0;
        auto value = std::stoll(text, &used);
        if (used == text.size()) {
            return value;
        }
    } catch (const std::exception&) {
    }
    throw UsageError("expected an integer for " + option + ", got '" + text + "'");
}

/// Whether `name` is `cpu`, `cuda` or `cuda:N`.
bool is_device_name(const std::string& name) {
    if (name == "cpu" || name == "cuda") {
        return true;
    }
    if (name.rfind("cuda:", 0) != 0 || name.size() == 5 || name.size() > 9) {
        return false;
    }
    return std::all_of(name.begin() + 5, name.end(), [](char c) { return c >= '0' && c <= '9'; });
}

Arguments parse_arguments(int argc, char** argv) {
    Arguments args;
    std::vector<std::string> positional;
    for (int i = 1; i < argc; i++) {
        std::string arg = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) {
                throw UsageError("missing value for " + arg);
            }
            return argv[++i];
        };
        if (arg == "-h" || arg == "--help") {
            std::cout << USAGE;
            std::exit(0);
        } else if (arg == "--extensions") {
            args.extensions = value();
        } else if (arg == "--device") {
            args.device = value();
            if (!is_device_name(args.device)) {
                throw UsageError("--device must be cpu, cuda or cuda:N, got '" + args.device + "'");
            }
        } else if (arg == "--dtype") {
            args.dtype = value();
            if (*args.dtype != "float64" && *args.dtype != "float32") {
                throw UsageError("--dtype must be float64 or float32, got '" + *args.dtype + "'");
            }
        } else if (arg == "--selected") {
            std::vector<int64_t> atoms;
            std::stringstream stream(value());
            std::string item;
            while (std::getline(stream, item, ',')) {
                atoms.push_back(parse_integer(item, "--selected"));
            }
            if (atoms.empty()) {
                throw UsageError("--selected needs at least one atom index");
            }
            args.selected = atoms;
        } else if (arg == "--domains") {
            args.domains = parse_integer(value(), "--domains");
            if (args.domains < 1) {
                throw UsageError("--domains must be at least 1");
            }
        } else if (arg == "--frame") {
            args.frame = parse_integer(value(), "--frame");
        } else if (arg == "--no-check-consistency") {
            args.check_consistency = false;
        } else if (arg.size() > 1 && arg[0] == '-') {
            throw UsageError("unknown option " + arg);
        } else {
            positional.push_back(arg);
        }
    }
    if (positional.size() != 2) {
        throw UsageError("expected MODEL.pt and STRUCTURE.xyz");
    }
    if (args.selected && args.domains != 0) {
        throw UsageError("--selected and --domains can not be used together");
    }
    args.model = positional[0];
    args.structure = positional[1];
    return args;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

/// Everything the driver needs to know about the loaded model.
struct Model {
    mts::Module module;
    mta::ModelCapabilities capabilities;
    std::vector<mta::NeighborListOptions> neighbor_lists;
    torch::Dtype dtype;
    torch::Device device;
    double interaction_range;
};

Model load_model(const Arguments& args) {
    namespace fs = std::filesystem;
    if (!fs::is_regular_file(args.model)) {
        throw std::runtime_error("model file '" + args.model + "' does not exist");
    }
    auto extensions = args.extensions;
    if (!extensions) {
        auto beside = fs::path(args.model).parent_path() / "extensions";
        if (fs::is_directory(beside)) {
            extensions = beside.string();
        }
    } else if (!fs::is_directory(*extensions)) {
        throw std::runtime_error("extensions directory '" + *extensions + "' does not exist");
    }

    auto device = torch::Device(args.device);
    if (device.is_cuda() && !torch::cuda::is_available()) {
        throw std::runtime_error(
            "--device " + args.device + " was requested but CUDA is not available to torch "
            "(a CPU build of libtorch, or no visible GPU)"
        );
    }
    if (device.is_cuda() && device.has_index() && device.index() >= static_cast<int>(torch::cuda::device_count())) {
        throw std::runtime_error(
            "--device " + args.device + " was requested but torch sees " +
            std::to_string(torch::cuda::device_count()) + " CUDA device(s)"
        );
    }

    auto module = mta::load_atomistic_model(args.model, extensions);
    auto capabilities = module.run_method("capabilities").toCustomClass<mta::ModelCapabilitiesHolder>();

    // the device must be one the model declares (`cuda:1` matches "cuda")
    auto device_type = device.is_cuda() ? std::string("cuda") : device.str();
    const auto& supported = capabilities->supported_devices;
    if (std::find(supported.begin(), supported.end(), device_type) == supported.end()) {
        throw std::runtime_error("the model does not support device '" + device_type + "'");
    }

    auto model_dtype = capabilities->dtype();
    if (args.dtype && *args.dtype != model_dtype) {
        // AtomisticModel checks the systems' dtype against its capabilities: a
        // different dtype needs a re-export (shallow_ensemble.export, dtype=...)
        throw std::runtime_error(
            "the model was exported in " + model_dtype + ", but --dtype " + *args.dtype +
            " was requested; export the model again with dtype='" + *args.dtype + "'"
        );
    }
    auto dtype = model_dtype == "float32" ? torch::kFloat32 : torch::kFloat64;

    auto outputs = capabilities->outputs();
    for (const auto* name: {"energy", "energy_uncertainty", "energy_ensemble"}) {
        if (!outputs.contains(name)) {
            throw std::runtime_error(std::string("the model has no '") + name + "' output");
        }
    }

    std::vector<mta::NeighborListOptions> neighbor_lists;
    auto requested = module.run_method("requested_neighbor_lists").toList();
    for (const auto& item: requested) {
        neighbor_lists.push_back(item.get().toCustomClass<mta::NeighborListOptionsHolder>());
    }

    double interaction_range = capabilities->engine_interaction_range(LENGTH_UNIT);
    for (const auto& options: neighbor_lists) {
        interaction_range = std::max(interaction_range, options->engine_cutoff(LENGTH_UNIT));
    }

    module.to(device);
    return Model{
        std::move(module), capabilities, std::move(neighbor_lists), dtype, device, interaction_range
    };
}

void check_atomic_types(const Model& model, const std::vector<int32_t>& types) {
    const auto& known = model.capabilities->atomic_types;
    for (size_t i = 0; i < types.size(); i++) {
        if (std::find(known.begin(), known.end(), types[i]) == known.end()) {
            std::string list;
            for (auto type: known) {
                list += (list.empty() ? "" : ", ") + std::to_string(type);
            }
            throw std::runtime_error(
                "atom " + std::to_string(i) + " has atomic type " + std::to_string(types[i]) +
                ", which this model does not support (model atomic types: " + list + ")"
            );
        }
    }
}

/// A raw neighbour list from vesin (CPU, float64): pairs, cell shifts, vectors.
struct Pairs {
    std::vector<std::array<int32_t, 5>> samples;  // i, j, shift a, b, c
    std::vector<std::array<double, 3>> vectors;
};

Pairs compute_pairs(
    const std::vector<std::array<double, 3>>& positions,
    const std::array<std::array<double, 3>, 3>& cell,
    const std::array<bool, 3>& pbc,
    double cutoff,
    bool full_list
) {
    VesinOptions options = {};
    options.cutoff = cutoff;
    options.full = full_list;
    options.sorted = true;
    options.algorithm = VesinAutoAlgorithm;
    options.skin = 0.0;
    options.n_threads = 0;
    options.return_shifts = true;
    options.return_distances = false;
    options.return_vectors = true;

    double box[3][3];
    bool periodic[3];
    for (size_t a = 0; a < 3; a++) {
        periodic[a] = pbc[a];
        for (size_t b = 0; b < 3; b++) {
            box[a][b] = cell[a][b];
        }
    }

    VesinNeighborList neighbors;
    const char* error = nullptr;
    auto status = vesin_neighbors(
        reinterpret_cast<const double (*)[3]>(positions.data()),
        positions.size(),
        box,
        periodic,
        VesinDevice{VesinCPU, 0},
        options,
        &neighbors,
        &error
    );
    if (status != EXIT_SUCCESS) {
        auto message = std::string("vesin failed to compute the neighbor list: ") + (error ? error : "unknown error");
        vesin_free(&neighbors);
        throw std::runtime_error(message);
    }

    Pairs result;
    result.samples.resize(neighbors.length);
    result.vectors.resize(neighbors.length);
    for (size_t p = 0; p < neighbors.length; p++) {
        result.samples[p] = {
            static_cast<int32_t>(neighbors.pairs[p][0]),
            static_cast<int32_t>(neighbors.pairs[p][1]),
            neighbors.shifts[p][0],
            neighbors.shifts[p][1],
            neighbors.shifts[p][2],
        };
        result.vectors[p] = {neighbors.vectors[p][0], neighbors.vectors[p][1], neighbors.vectors[p][2]};
    }
    vesin_free(&neighbors);
    return result;
}

/// A metatomic System (positions requiring grad) with all the model's neighbour
/// lists, built from float64 data on the CPU.
mta::System make_system(
    const Model& model,
    const std::vector<int32_t>& types,
    const std::vector<std::array<double, 3>>& positions,
    const std::array<std::array<double, 3>, 3>& cell,
    const std::array<bool, 3>& pbc,
    bool check_consistency
) {
    auto n_atoms = static_cast<int64_t>(types.size());
    auto cpu_f64 = torch::TensorOptions().dtype(torch::kFloat64);
    auto types_tensor = torch::tensor(std::vector<int32_t>(types), torch::TensorOptions().dtype(torch::kInt32));
    auto positions_tensor = torch::empty({n_atoms, 3}, cpu_f64);
    for (int64_t i = 0; i < n_atoms; i++) {
        for (int64_t k = 0; k < 3; k++) {
            positions_tensor.index_put_({i, k}, positions[static_cast<size_t>(i)][static_cast<size_t>(k)]);
        }
    }
    auto cell_tensor = torch::zeros({3, 3}, cpu_f64);
    for (int64_t a = 0; a < 3; a++) {
        for (int64_t b = 0; b < 3; b++) {
            cell_tensor.index_put_({a, b}, cell[static_cast<size_t>(a)][static_cast<size_t>(b)]);
        }
    }
    auto pbc_tensor = torch::tensor(std::vector<int32_t>{pbc[0], pbc[1], pbc[2]}).to(torch::kBool);

    auto to_model = torch::TensorOptions().dtype(model.dtype).device(model.device);
    positions_tensor = positions_tensor.to(to_model).requires_grad_(true);
    auto system = torch::make_intrusive<mta::SystemHolder>(
        types_tensor.to(model.device),
        positions_tensor,
        cell_tensor.to(to_model),
        pbc_tensor.to(model.device)
    );

    auto labels_options = torch::TensorOptions().dtype(torch::kInt32).device(model.device);
    auto components = torch::make_intrusive<mts::LabelsHolder>(
        std::vector<std::string>{"xyz"}, torch::tensor({0, 1, 2}, labels_options).reshape({3, 1})
    );
    auto properties = torch::make_intrusive<mts::LabelsHolder>(
        std::vector<std::string>{"distance"}, torch::zeros({1, 1}, labels_options)
    );

    for (const auto& options: model.neighbor_lists) {
        // vesin lists are always strict (only pairs inside the cutoff), which
        // also satisfies non-strict requests
        auto pairs = compute_pairs(positions, cell, pbc, options->engine_cutoff(LENGTH_UNIT), options->full_list());
        auto n_pairs = static_cast<int64_t>(pairs.samples.size());
        auto samples_values = torch::empty({n_pairs, 5}, torch::TensorOptions().dtype(torch::kInt32));
        auto vectors = torch::empty({n_pairs, 3, 1}, cpu_f64);
        if (n_pairs != 0) {
            std::memcpy(samples_values.data_ptr<int32_t>(), pairs.samples.data(), sizeof(int32_t) * 5 * static_cast<size_t>(n_pairs));
            std::memcpy(vectors.data_ptr<double>(), pairs.vectors.data(), sizeof(double) * 3 * static_cast<size_t>(n_pairs));
        }
        auto samples = torch::make_intrusive<mts::LabelsHolder>(
            std::vector<std::string>{"first_atom", "second_atom", "cell_shift_a", "cell_shift_b", "cell_shift_c"},
            samples_values.to(model.device)
        );
        auto block = torch::make_intrusive<mts::TensorBlockHolder>(
            vectors.to(to_model), samples, std::vector<mts::Labels>{components}, properties
        );
        mta::register_autograd_neighbors(system, block, check_consistency);
        system->add_neighbor_list(options, block);
    }
    return system;
}

/// Run the model once. `outputs` maps output names to "system" or "atom".
std::map<std::string, mts::TensorBlock> evaluate(
    Model& model,
    const mta::System& system,
    const std::vector<std::pair<std::string, std::string>>& outputs,
    const std::optional<std::vector<int64_t>>& selected,
    bool check_consistency
) {
    auto requested = torch::Dict<std::string, mta::ModelOutput>();
    for (const auto& [name, sample_kind]: outputs) {
        auto output = torch::make_intrusive<mta::ModelOutputHolder>();
        output->set_unit(ENERGY_UNIT);
        output->set_sample_kind(sample_kind);
        requested.insert(name, output);
    }

    auto selected_atoms = torch::optional<mts::Labels>();
    if (selected) {
        auto n_selected = static_cast<int64_t>(selected->size());
        auto values = torch::zeros({n_selected, 2}, torch::TensorOptions().dtype(torch::kInt32));
        for (int64_t i = 0; i < n_selected; i++) {
            values.index_put_({i, 1}, static_cast<int32_t>((*selected)[static_cast<size_t>(i)]));
        }
        selected_atoms = torch::make_intrusive<mts::LabelsHolder>(
            std::vector<std::string>{"system", "atom"}, values.to(model.device)
        );
    }
    auto options = torch::make_intrusive<mta::ModelEvaluationOptionsHolder>(LENGTH_UNIT, requested, selected_atoms);

    auto systems = c10::List<mta::System>();
    systems.push_back(system);
    auto result = model.module.forward({systems, options, check_consistency}).toGenericDict();

    std::map<std::string, mts::TensorBlock> blocks;
    for (const auto& [name, _]: outputs) {
        auto tensor_map = result.at(name).toCustomClass<mts::TensorMapHolder>();
        blocks[name] = mts::TensorMapHolder::block_by_id(tensor_map, 0);
    }
    return blocks;
}

std::vector<double> to_vector(const torch::Tensor& tensor) {
    auto flat = tensor.detach().to(torch::kCPU, torch::kFloat64).contiguous().reshape({-1});
    return std::vector<double>(flat.data_ptr<double>(), flat.data_ptr<double>() + flat.numel());
}

Json rows(const torch::Tensor& tensor) {
    auto values = tensor.detach().to(torch::kCPU, torch::kFloat64).contiguous();
    auto json = Json::array();
    for (int64_t i = 0; i < values.size(0); i++) {
        json.push(Json(to_vector(values[i])));
    }
    return json;
}

/// The atom index column of per-atom samples, as int64 on the CPU.
std::vector<int64_t> sample_atoms(const mts::TensorBlock& block) {
    auto samples = block->samples();
    auto names = samples->names();
    auto column = std::find(names.begin(), names.end(), "atom") - names.begin();
    auto atoms = samples->values().index({torch::indexing::Slice(), column}).to(torch::kCPU, torch::kInt64).contiguous();
    return std::vector<int64_t>(atoms.data_ptr<int64_t>(), atoms.data_ptr<int64_t>() + atoms.numel());
}

/// Unbiased standard deviation (as torch.std), 0 for a single member.
double ensemble_std(const std::vector<double>& members) {
    if (members.size() < 2) {
        return 0.0;
    }
    double mean = 0.0;
    for (auto value: members) {
        mean += value;
    }
    mean /= static_cast<double>(members.size());
    double variance = 0.0;
    for (auto value: members) {
        variance += (value - mean) * (value - mean);
    }
    return std::sqrt(variance / static_cast<double>(members.size() - 1));
}

/// Whole-system evaluation (optionally restricted to `--selected` atoms).
void run_whole(Model& model, const Frame& frame, const Arguments& args, Json& out, Json& timing) {
    auto n_atoms = static_cast<int64_t>(frame.types.size());
    if (args.selected) {
        for (auto atom: *args.selected) {
            if (atom < 0 || atom >= n_atoms) {
                throw std::runtime_error("selected atom " + std::to_string(atom) + " is out of range (" + std::to_string(n_atoms) + " atoms)");
            }
        }
    }

    auto start = std::chrono::steady_clock::now();
    auto system = make_system(model, frame.types, frame.positions, frame.cell, frame.pbc, args.check_consistency);
    timing.set("neighbors_s", seconds_since(start));

    // per-system outputs (and the energy to differentiate); a model output can only
    // be requested once per call, so the per-atom ones come in a second call
    start = std::chrono::steady_clock::now();
    auto totals = evaluate(
        model,
        system,
        {{"energy", "system"}, {"energy_uncertainty", "system"}, {"energy_ensemble", "system"}},
        args.selected,
        args.check_consistency
    );
    timing.set("forward_s", seconds_since(start));

    start = std::chrono::steady_clock::now();
    auto energy = totals["energy"]->values();
    auto gradient = torch::autograd::grad({energy.sum()}, {system->positions()})[0];
    auto forces = -gradient;
    timing.set("backward_s", seconds_since(start));

    start = std::chrono::steady_clock::now();
    std::map<std::string, mts::TensorBlock> per_atom;
    {
        torch::NoGradGuard no_grad;
        per_atom = evaluate(
            model,
            system,
            {{"energy", "atom"}, {"energy_uncertainty", "atom"}, {"energy_ensemble", "atom"}},
            args.selected,
            args.check_consistency
        );
    }
    timing.set("forward_per_atom_s", seconds_since(start));

    out.set("energy", to_vector(energy)[0]);
    out.set("energy_uncertainty", to_vector(totals["energy_uncertainty"]->values())[0]);
    out.set("energy_ensemble", Json(to_vector(totals["energy_ensemble"]->values())));
    out.set("atoms", Json(sample_atoms(per_atom["energy_ensemble"])));
    out.set("energy_per_atom", Json(to_vector(per_atom["energy"]->values())));
    out.set("energy_uncertainty_per_atom", Json(to_vector(per_atom["energy_uncertainty"]->values())));
    out.set("energy_ensemble_per_atom", rows(per_atom["energy_ensemble"]->values()));
    out.set("forces", rows(forces));
}

/// Domain decomposition: `n_domains` slabs along the first cell vector (along x
/// for a non-periodic structure), each evaluated as its own non-periodic system of
/// local atoms plus ghost atoms (explicit copies of every atom or periodic image
/// within the interaction range of a local atom), with selected_atoms = the local
/// atoms. Per-atom ensemble energies are summed over the domains, ghost forces are
/// accumulated back onto the atoms they copy.
///
/// `lattice` is the cell as read (the slabs are cut along its first vector when
/// the structure is periodic along it), `frame.cell` the one given to the model.
void run_domains(
    Model& model,
    const Frame& frame,
    const std::array<std::array<double, 3>, 3>& lattice,
    const Arguments& args,
    Json& out,
    Json& timing
) {
    auto n_atoms = static_cast<int64_t>(frame.types.size());
    if (args.domains > n_atoms) {
        throw std::runtime_error("--domains " + std::to_string(args.domains) + " is larger than the number of atoms");
    }
    // slab coordinate: fractional coordinate along a (wrapped) when periodic along
    // a, else x
    std::vector<double> key(static_cast<size_t>(n_atoms));
    for (int64_t i = 0; i < n_atoms; i++) {
        key[static_cast<size_t>(i)] = frame.positions[static_cast<size_t>(i)][0];
    }
    if (frame.pbc[0]) {
        auto cell = torch::empty({3, 3}, torch::kFloat64);
        auto positions = torch::empty({n_atoms, 3}, torch::kFloat64);
        for (int64_t a = 0; a < 3; a++) {
            for (int64_t b = 0; b < 3; b++) {
                cell.index_put_({a, b}, lattice[static_cast<size_t>(a)][static_cast<size_t>(b)]);
            }
        }
        for (int64_t i = 0; i < n_atoms; i++) {
            for (int64_t k = 0; k < 3; k++) {
                positions.index_put_({i, k}, frame.positions[static_cast<size_t>(i)][static_cast<size_t>(k)]);
            }
        }
        if (std::abs(torch::det(cell).item<double>()) > 1e-12) {
            auto fractional = torch::linalg_solve(cell.t(), positions.t()).t();
            auto a = fractional.index({torch::indexing::Slice(), 0});
            a = (a - torch::floor(a)).contiguous();
            std::copy(a.data_ptr<double>(), a.data_ptr<double>() + n_atoms, key.begin());
        }
    }
    // equal-count slabs: cut the sorted coordinates in n_domains pieces
    std::vector<int64_t> order(static_cast<size_t>(n_atoms));
    for (int64_t i = 0; i < n_atoms; i++) {
        order[static_cast<size_t>(i)] = i;
    }
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return key[static_cast<size_t>(a)] < key[static_cast<size_t>(b)];
    });
    std::vector<int64_t> domain_of(static_cast<size_t>(n_atoms));
    for (int64_t rank = 0; rank < n_atoms; rank++) {
        domain_of[static_cast<size_t>(order[static_cast<size_t>(rank)])] = rank * args.domains / n_atoms;
    }

    // every image of every atom within the interaction range of each atom
    auto start = std::chrono::steady_clock::now();
    auto all_pairs = compute_pairs(frame.positions, frame.cell, frame.pbc, model.interaction_range, true);
    timing.set("ghosts_s", seconds_since(start));


    auto forces = torch::zeros({n_atoms, 3}, torch::kFloat64);
    std::vector<double> members;                        // summed over all local atoms
    std::vector<int64_t> atoms;                         // per-atom rows, by domain
    std::vector<double> energy_per_atom;
    std::vector<double> uncertainty_per_atom;
    std::vector<std::vector<double>> ensemble_per_atom;
    double energy = 0.0;
    double neighbors_s = 0.0, forward_s = 0.0, backward_s = 0.0;
    auto domains = Json::array();

    for (int64_t domain = 0; domain < args.domains; domain++) {
        // local atoms first, then ghosts; `owner` is the atom each one copies
        std::vector<int64_t> owner;
        std::vector<int32_t> types;
        std::vector<std::array<double, 3>> positions;
        for (int64_t i = 0; i < n_atoms; i++) {
            if (domain_of[static_cast<size_t>(i)] == domain) {
                owner.push_back(i);
                types.push_back(frame.types[static_cast<size_t>(i)]);
                positions.push_back(frame.positions[static_cast<size_t>(i)]);
            }
        }
        const auto n_local = static_cast<int64_t>(owner.size());
        std::map<std::array<int32_t, 4>, int64_t> ghosts;  // (atom, shift) -> index
        for (const auto& pair: all_pairs.samples) {
            auto i = pair[0], j = pair[1];
            if (domain_of[static_cast<size_t>(i)] != domain) {
                continue;
            }
            bool same_image = pair[2] == 0 && pair[3] == 0 && pair[4] == 0;
            if (same_image && domain_of[static_cast<size_t>(j)] == domain) {
                continue;  // a local atom
            }
            auto inserted = ghosts.emplace(std::array<int32_t, 4>{j, pair[2], pair[3], pair[4]}, 0);
            if (!inserted.second) {
                continue;
            }
            inserted.first->second = static_cast<int64_t>(owner.size());
            std::array<double, 3> position = frame.positions[static_cast<size_t>(j)];
            for (size_t a = 0; a < 3; a++) {
                for (size_t k = 0; k < 3; k++) {
                    position[k] += static_cast<double>(pair[2 + a]) * frame.cell[a][k];
                }
            }
            owner.push_back(j);
            types.push_back(frame.types[static_cast<size_t>(j)]);
            positions.push_back(position);
        }

        start = std::chrono::steady_clock::now();
        auto system = make_system(
            model, types, positions, {}, {false, false, false}, args.check_consistency
        );
        neighbors_s += seconds_since(start);

        std::vector<int64_t> local(static_cast<size_t>(n_local));
        for (int64_t i = 0; i < n_local; i++) {
            local[static_cast<size_t>(i)] = i;
        }
        start = std::chrono::steady_clock::now();
        auto blocks = evaluate(
            model,
            system,
            {{"energy", "system"}, {"energy_uncertainty", "atom"}, {"energy_ensemble", "atom"}},
            local,
            args.check_consistency
        );
        forward_s += seconds_since(start);

        start = std::chrono::steady_clock::now();
        auto domain_energy = blocks["energy"]->values();
        auto gradient = torch::autograd::grad({domain_energy.sum()}, {system->positions()})[0];
        auto owners = torch::tensor(owner, torch::TensorOptions().dtype(torch::kInt64));
        forces.index_add_(0, owners, -gradient.detach().to(torch::kCPU, torch::kFloat64));
        backward_s += seconds_since(start);

        auto ensemble = blocks["energy_ensemble"]->values().detach().to(torch::kCPU, torch::kFloat64);
        auto domain_members = to_vector(ensemble.sum(0));
        if (members.empty()) {
            members.assign(domain_members.size(), 0.0);
        }
        for (size_t k = 0; k < members.size(); k++) {
            members[k] += domain_members[k];
        }
        auto rows_atoms = sample_atoms(blocks["energy_ensemble"]);
        auto uncertainty = to_vector(blocks["energy_uncertainty"]->values());
        auto uncertainty_atoms = sample_atoms(blocks["energy_uncertainty"]);
        if (uncertainty_atoms != rows_atoms) {
            throw std::runtime_error("the per-atom outputs of the model list different atoms");
        }
        for (size_t r = 0; r < rows_atoms.size(); r++) {
            auto row = to_vector(ensemble[static_cast<int64_t>(r)]);
            double mean = 0.0;
            for (auto value: row) {
                mean += value / static_cast<double>(row.size());
            }
            atoms.push_back(owner[static_cast<size_t>(rows_atoms[r])]);
            energy_per_atom.push_back(mean);
            uncertainty_per_atom.push_back(uncertainty[r]);
            ensemble_per_atom.push_back(row);
        }
        energy += to_vector(domain_energy)[0];

        auto summary = Json::object();
        summary.set("local_atoms", n_local);
        summary.set("ghost_atoms", static_cast<int64_t>(owner.size()) - n_local);
        summary.set("energy", to_vector(domain_energy)[0]);
        summary.set("energy_ensemble", Json(domain_members));
        domains.push(summary);
    }
    timing.set("neighbors_s", neighbors_s);
    timing.set("forward_s", forward_s);
    timing.set("backward_s", backward_s);

    // per-atom values in atom order
    std::vector<size_t> by_atom(atoms.size());
    for (size_t r = 0; r < by_atom.size(); r++) {
        by_atom[r] = r;
    }
    std::sort(by_atom.begin(), by_atom.end(), [&](size_t a, size_t b) { return atoms[a] < atoms[b]; });
    std::vector<int64_t> sorted_atoms;
    std::vector<double> sorted_energy, sorted_uncertainty;
    auto sorted_ensemble = Json::array();
    for (auto r: by_atom) {
        sorted_atoms.push_back(atoms[r]);
        sorted_energy.push_back(energy_per_atom[r]);
        sorted_uncertainty.push_back(uncertainty_per_atom[r]);
        sorted_ensemble.push(Json(ensemble_per_atom[r]));
    }

    out.set("energy", energy);
    out.set("energy_uncertainty", ensemble_std(members));
    out.set("energy_ensemble", Json(members));
    out.set("atoms", Json(sorted_atoms));
    out.set("energy_per_atom", Json(sorted_energy));
    out.set("energy_uncertainty_per_atom", Json(sorted_uncertainty));
    out.set("energy_ensemble_per_atom", sorted_ensemble);
    out.set("forces", rows(forces));
    out.set("domains", domains);
}

}  // namespace

int main(int argc, char** argv) {
    Arguments args;
    try {
        args = parse_arguments(argc, argv);
    } catch (const UsageError& error) {
        std::cerr << "error: " << error.what() << "\n\n" << USAGE;
        return 2;
    }

    try {
        auto total_start = std::chrono::steady_clock::now();
        auto timing = Json::object();

        auto start = std::chrono::steady_clock::now();
        auto frame = shallow_ensemble::read_xyz_frame(args.structure, args.frame);
        // metatomic wants zero cell vectors along non-periodic directions
        auto lattice = frame.cell;
        for (size_t a = 0; a < 3; a++) {
            if (!frame.pbc[a]) {
                frame.cell[a] = {0.0, 0.0, 0.0};
            }
        }
        timing.set("read_s", seconds_since(start));

        start = std::chrono::steady_clock::now();
        auto model = load_model(args);
        timing.set("load_s", seconds_since(start));
        check_atomic_types(model, frame.types);

        auto out = Json::object();
        out.set("model", args.model);
        out.set("structure", args.structure);
        out.set("frame", args.frame);
        out.set("n_atoms", static_cast<int64_t>(frame.types.size()));
        out.set("periodic", Json(std::vector<int64_t>{frame.pbc[0], frame.pbc[1], frame.pbc[2]}));
        out.set("device", model.device.str());
        out.set("dtype", model.capabilities->dtype());
        out.set("length_unit", LENGTH_UNIT);
        out.set("energy_unit", ENERGY_UNIT);
        out.set("selected_atoms", args.selected ? Json(*args.selected) : Json());

        if (args.domains > 0) {
            run_domains(model, frame, lattice, args, out, timing);
        } else {
            run_whole(model, frame, args, out, timing);
        }
        timing.set("total_s", seconds_since(total_start));
        out.set("timing", timing);
        std::cout << out.dump();
        return 0;
    } catch (const c10::Error& error) {
        std::cerr << "error: " << error.what_without_backtrace() << std::endl;
    } catch (const std::exception& error) {
        std::cerr << "error: " << error.what() << std::endl;
    }
    return 1;
}
