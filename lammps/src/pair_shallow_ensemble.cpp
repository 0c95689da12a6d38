// SPDX-License-Identifier: GPL-2.0-or-later
//
// pair_style shallow/ensemble (see pair_shallow_ensemble.h and docs/lammps.md).

#include "pair_shallow_ensemble.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <stdexcept>

#include <mpi.h>
#include <torch/cuda.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <metatensor/torch.hpp>
#include <metatomic/torch.hpp>

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"
#include "utils.h"

using namespace LAMMPS_NS;

namespace mts = metatensor_torch;
namespace mta = metatomic_torch;

namespace {

/// Length and energy units of a LAMMPS `units` style, spelled as metatomic's unit
/// parser knows them. Styles whose units metatomic can not express (lj, cgs with
/// erg, nano, micro) are refused.
std::array<std::string, 2> metatomic_units(const std::string& style) {
    if (style == "metal") {
        return {"angstrom", "eV"};
    } else if (style == "real") {
        return {"angstrom", "kcal/mol"};
    } else if (style == "electron") {
        return {"bohr", "Hartree"};
    } else if (style == "si") {
        return {"m", "J"};
    }
    throw std::runtime_error(
        "units " + style + " are not supported by pair shallow/ensemble "
        "(use metal, real, electron or si)"
    );
}

const char* const ELEMENTS[] = {
    "H",  "He", "Li", "Be", "B",  "C",  "N",  "O",  "F",  "Ne", "Na", "Mg", "Al", "Si", "P",
    "S",  "Cl", "Ar", "K",  "Ca", "Sc", "Ti", "V",  "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn",
    "Ga", "Ge", "As", "Se", "Br", "Kr", "Rb", "Sr", "Y",  "Zr", "Nb", "Mo", "Tc", "Ru", "Rh",
    "Pd", "Ag", "Cd", "In", "Sn", "Sb", "Te", "I",  "Xe", "Cs", "Ba", "La", "Ce", "Pr", "Nd",
    "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W",  "Re",
    "Os", "Ir", "Pt", "Au", "Hg", "Tl", "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac", "Th",
    "Pa", "U",  "Np", "Pu", "Am", "Cm", "Bk", "Cf", "Es", "Fm", "Md", "No", "Lr", "Rf", "Db",
    "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn", "Nh", "Fl", "Mc", "Lv", "Ts", "Og",
};

/// Atomic number from "14" or "Si"; 0 when neither.
int atomic_number(const std::string& text) {
    if (!text.empty() && std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; })) {
        return text.size() < 4 ? std::stoi(text) : 0;
    }
    for (size_t z = 0; z < sizeof(ELEMENTS) / sizeof(ELEMENTS[0]); z++) {
        if (text == ELEMENTS[z]) {
            return static_cast<int>(z) + 1;
        }
    }
    return 0;
}


/// The torch device of the `device` keyword: `cpu`, `cuda` (the GPU of this rank's
/// index among the ranks of its node, modulo the number of visible GPUs) or
/// `cuda:N`. Throws std::invalid_argument with a message for anything else.
torch::Device parse_device(const std::string& name, MPI_Comm world) {
    if (name == "cpu") {
        return torch::Device(torch::kCPU);
    }
    bool is_cuda = name == "cuda";
    int64_t index = -1;
    if (!is_cuda && name.rfind("cuda:", 0) == 0 && name.size() > 5 && name.size() < 10) {
        auto digits = name.substr(5);
        if (std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) {
            is_cuda = true;
            index = std::stoll(digits);
        }
    }
    if (!is_cuda) {
        throw std::invalid_argument("device '" + name + "' is not one of cpu, cuda or cuda:N");
    }
    if (!torch::cuda::is_available()) {
        throw std::invalid_argument(
            "device " + name + " was requested but CUDA is not available to torch "
            "(a CPU build of libtorch, or no visible GPU)"
        );
    }
    auto count = static_cast<int64_t>(torch::cuda::device_count());
    if (index < 0) {
        // one GPU per rank of a node, in turn
        MPI_Comm node;
        int node_rank = 0;
        MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
        MPI_Comm_rank(node, &node_rank);
        MPI_Comm_free(&node);
        index = node_rank % count;
    } else if (index >= count) {
        throw std::invalid_argument(
            "device " + name + " was requested but torch sees " + std::to_string(count) + " CUDA device(s)"
        );
    }
    return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
}

/// Number of ensemble members: one call on an isolated atom, in the model's units.
int probe_ensemble_size(mts::Module& module, const mta::ModelCapabilities& capabilities,
    const std::vector<mta::NeighborListOptions>& neighbor_lists, torch::Dtype dtype, torch::Device device) {
    auto real = torch::TensorOptions().dtype(dtype).device(device);
    auto labels_options = torch::TensorOptions().dtype(torch::kInt32).device(device);
    auto types = torch::tensor(std::vector<int32_t>{static_cast<int32_t>(capabilities->atomic_types.at(0))}, labels_options);
    auto system = torch::make_intrusive<mta::SystemHolder>(
        types, torch::zeros({1, 3}, real), torch::zeros({3, 3}, real),
        torch::zeros({3}, torch::TensorOptions().dtype(torch::kBool).device(device))
    );
    for (const auto& options: neighbor_lists) {
        auto block = torch::make_intrusive<mts::TensorBlockHolder>(
            torch::zeros({0, 3, 1}, real),
            torch::make_intrusive<mts::LabelsHolder>(
                std::vector<std::string>{"first_atom", "second_atom", "cell_shift_a", "cell_shift_b", "cell_shift_c"},
                torch::zeros({0, 5}, labels_options)
            ),
            std::vector<mts::Labels>{torch::make_intrusive<mts::LabelsHolder>(
                std::vector<std::string>{"xyz"}, torch::tensor({0, 1, 2}, labels_options).reshape({3, 1})
            )},
            torch::make_intrusive<mts::LabelsHolder>(std::vector<std::string>{"distance"}, torch::zeros({1, 1}, labels_options))
        );
        system->add_neighbor_list(options, block);
    }
    auto requested = torch::Dict<std::string, mta::ModelOutput>();
    auto output = torch::make_intrusive<mta::ModelOutputHolder>();
    output->set_sample_kind("system");
    requested.insert("energy_ensemble", output);
    auto evaluation = torch::make_intrusive<mta::ModelEvaluationOptionsHolder>(capabilities->length_unit(), requested, torch::nullopt);
    auto systems = c10::List<mta::System>();
    systems.push_back(system);
    torch::NoGradGuard no_grad;
    auto result = module.forward({systems, evaluation, false}).toGenericDict();
    auto block = mts::TensorMapHolder::block_by_id(result.at("energy_ensemble").toCustomClass<mts::TensorMapHolder>(), 0);
    return static_cast<int>(block->values().size(1));
}

}  // namespace

/// The loaded model and what the pair style needs to know about it.
struct PairShallowEnsemble::Model {
    explicit Model(mts::Module loaded): module(std::move(loaded)) {}

    mts::Module module;
    mta::ModelCapabilities capabilities;
    std::vector<mta::NeighborListOptions> neighbor_lists;
    torch::Dtype dtype = torch::kFloat64;
    torch::Device device = torch::Device(torch::kCPU);
    bool has_uncertainty = false;
    int ensemble_size = 0;
    // set in init_style from the LAMMPS units
    std::string length_unit;
    std::string energy_unit;
};

PairShallowEnsemble::PairShallowEnsemble(LAMMPS* lmp): Pair(lmp) {
    single_enable = 0;
    restartinfo = 0;
    one_coeff = 1;
    manybody_flag = 1;
    ghostneigh = 1;              // the model needs the neighbours of ghost atoms too
    no_virial_fdotr_compute = 1; // the virial is computed from this style's own forces
    centroidstressflag = CENTROID_NOTAVAIL;
}

PairShallowEnsemble::~PairShallowEnsemble() {
    if (allocated) {
        memory->destroy(setflag);
        memory->destroy(cutsq);
        memory->destroy(cutghost);
    }
}

bool PairShallowEnsemble::uncertainty_enabled() const {
    return model_ && model_->has_uncertainty && uncertainty_requested_;
}

int PairShallowEnsemble::ensemble_size() const {
    return uncertainty_enabled() ? model_->ensemble_size : 0;
}

void PairShallowEnsemble::allocate() {
    allocated = 1;
    int n = atom->ntypes;
    memory->create(setflag, n + 1, n + 1, "pair:setflag");
    memory->create(cutsq, n + 1, n + 1, "pair:cutsq");
    memory->create(cutghost, n + 1, n + 1, "pair:cutghost");  // neighbours of ghosts
    for (int i = 1; i <= n; i++) {
        for (int j = i; j <= n; j++) {
            setflag[i][j] = 0;
        }
    }
}

// pair_style shallow/ensemble MODEL [extensions DIR] [check_consistency on|off]
//                                   [uncertainty on|off] [device cpu|cuda|cuda:N]
void PairShallowEnsemble::settings(int narg, char** arg) {
    if (narg < 1) {
        utils::missing_cmd_args(FLERR, "pair_style shallow/ensemble", error);
    }
    std::string path = arg[0];
    std::optional<std::string> extensions;
    std::string device_name = "cpu";
    check_consistency_ = false;  // defaults, also when pair_style is given again
    uncertainty_requested_ = true;
    for (int iarg = 1; iarg < narg; iarg += 2) {
        std::string keyword = arg[iarg];
        if (iarg + 1 >= narg) {
            error->all(FLERR, "pair_style shallow/ensemble: missing value after '{}'", keyword);
        }
        if (keyword == "extensions") {
            extensions = arg[iarg + 1];
        } else if (keyword == "check_consistency") {
            check_consistency_ = utils::logical(FLERR, arg[iarg + 1], false, lmp) == 1;
        } else if (keyword == "uncertainty") {
            uncertainty_requested_ = utils::logical(FLERR, arg[iarg + 1], false, lmp) == 1;
        } else if (keyword == "device") {
            device_name = arg[iarg + 1];
        } else {
            error->all(FLERR, "pair_style shallow/ensemble: unknown keyword '{}'", keyword);
        }
    }
    auto device = torch::Device(torch::kCPU);
    try {
        device = parse_device(device_name, world);
    } catch (const std::exception& e) {
        error->all(FLERR, "pair_style shallow/ensemble: {}", e.what());
    }
    if (!std::filesystem::is_regular_file(path)) {
        error->all(FLERR, "pair_style shallow/ensemble: model file '{}' does not exist", path);
    }
    if (!extensions) {
        auto beside = std::filesystem::path(path).parent_path() / "extensions";
        if (std::filesystem::is_directory(beside)) {
            extensions = beside.string();
        }
    }

    std::unique_ptr<Model> model;
    try {
        model = std::make_unique<Model>(mta::load_atomistic_model(path, extensions));
        model->capabilities = model->module.run_method("capabilities").toCustomClass<mta::ModelCapabilitiesHolder>();
        for (const auto& item: model->module.run_method("requested_neighbor_lists").toList()) {
            model->neighbor_lists.push_back(item.get().toCustomClass<mta::NeighborListOptionsHolder>());
        }
    } catch (const c10::Error& e) {
        error->all(FLERR, "pair_style shallow/ensemble: cannot load '{}': {}", path, e.what_without_backtrace());
    } catch (const std::exception& e) {
        error->all(FLERR, "pair_style shallow/ensemble: cannot load '{}': {}", path, e.what());
    }

    const auto& supported = model->capabilities->supported_devices;
    const std::string device_type = device.is_cuda() ? "cuda" : "cpu";
    if (std::find(supported.begin(), supported.end(), device_type) == supported.end()) {
        error->all(FLERR, "pair_style shallow/ensemble: the model does not support device '{}'", device_type);
    }
    model->device = device;
    try {
        model->module.to(device);
    } catch (const c10::Error& e) {
        error->all(FLERR, "pair_style shallow/ensemble: cannot move the model to {}: {}", device.str(), e.what_without_backtrace());
    }
    auto dtype = model->capabilities->dtype();
    if (dtype == "float64") {
        model->dtype = torch::kFloat64;
    } else if (dtype == "float32") {
        model->dtype = torch::kFloat32;
    } else {
        error->all(FLERR, "pair_style shallow/ensemble: unsupported model dtype '{}'", dtype);
    }
    auto outputs = model->capabilities->outputs();
    if (!outputs.contains("energy")) {
        error->all(FLERR, "pair_style shallow/ensemble: the model has no 'energy' output");
    }
    model->has_uncertainty = outputs.contains("energy_uncertainty") && outputs.contains("energy_ensemble");
    if (model->has_uncertainty) {
        try {
            model->ensemble_size = probe_ensemble_size(
                model->module, model->capabilities, model->neighbor_lists, model->dtype, model->device
            );
        } catch (const c10::Error& e) {
            error->all(FLERR, "pair_style shallow/ensemble: cannot evaluate the model: {}", e.what_without_backtrace());
        } catch (const std::exception& e) {
            error->all(FLERR, "pair_style shallow/ensemble: cannot evaluate the model: {}", e.what());
        }
    }
    model_ = std::move(model);

    if (comm->me == 0) {
        utils::logmesg(lmp, "pair shallow/ensemble: loaded {} ({}, on {}, {} neighbour list(s), {})\n", path, dtype,
            model_->device.str(), model_->neighbor_lists.size(),
            model_->has_uncertainty ? "with energy_uncertainty and energy_ensemble" : "no uncertainty outputs");
    }
}

// pair_coeff * * TYPE1 TYPE2 ... (atomic number or element symbol of each LAMMPS type)
void PairShallowEnsemble::coeff(int narg, char** arg) {
    if (!allocated) {
        allocate();
    }
    int ntypes = atom->ntypes;
    if (narg != 2 + ntypes) {
        error->all(FLERR,
            "pair_coeff for shallow/ensemble needs * * and one atomic number or element per atom type "
            "({} types), got {} arguments", ntypes, narg);
    }
    if (std::strcmp(arg[0], "*") != 0 || std::strcmp(arg[1], "*") != 0) {
        error->all(FLERR, "pair_coeff for shallow/ensemble must start with * *");
    }
    type_to_atomic_number_.assign(static_cast<size_t>(ntypes) + 1, 0);
    for (int type = 1; type <= ntypes; type++) {
        std::string text = arg[1 + type];
        int z = atomic_number(text);
        if (z <= 0) {
            error->all(FLERR, "pair_coeff shallow/ensemble: '{}' is not an atomic number or element symbol", text);
        }
        const auto& known = model_->capabilities->atomic_types;
        if (std::find(known.begin(), known.end(), z) == known.end()) {
            error->all(FLERR, "pair_coeff shallow/ensemble: the model does not support atomic type {} ('{}')", z, text);
        }
        type_to_atomic_number_[static_cast<size_t>(type)] = z;
    }
    for (int i = 1; i <= ntypes; i++) {
        for (int j = i; j <= ntypes; j++) {
            setflag[i][j] = 1;
        }
    }
}

void PairShallowEnsemble::init_style() {
    if (!model_) {
        error->all(FLERR, "pair shallow/ensemble: no model loaded");
    }
    if (force->newton_pair == 0) {
        error->all(FLERR, "pair shallow/ensemble requires newton_pair on (forces on ghost atoms are sent back to their owners)");
    }
    if (atom->tag_enable == 0) {
        error->all(FLERR, "pair shallow/ensemble requires atom IDs");
    }
    try {
        auto units = metatomic_units(update->unit_style);
        model_->length_unit = units[0];
        model_->energy_unit = units[1];
        cutoff_ = 0.0;
        for (const auto& options: model_->neighbor_lists) {
            cutoff_ = std::max(cutoff_, options->engine_cutoff(model_->length_unit));
        }
        interaction_range_ = model_->capabilities->engine_interaction_range(model_->length_unit);
    } catch (const c10::Error& e) {
        error->all(FLERR, "pair shallow/ensemble: {}", e.what_without_backtrace());
    } catch (const std::exception& e) {
        error->all(FLERR, "pair shallow/ensemble: {}", e.what());
    }
    if (!std::isfinite(interaction_range_) || !std::isfinite(cutoff_)) {
        error->all(FLERR, "pair shallow/ensemble: models with an infinite interaction range are not supported");
    }
    if (cutoff_ <= 0.0) {
        error->all(FLERR, "pair shallow/ensemble: the model requests no neighbour list with a positive cutoff");
    }

    neighbor->add_request(this, NeighConst::REQ_FULL | NeighConst::REQ_GHOST);

    // a model whose interaction range exceeds its neighbour list cutoff (message
    // passing) needs ghost atoms that far from the sub-domain
    if (interaction_range_ > cutoff_) {
        comm->cutghostuser = std::max(comm->cutghostuser, interaction_range_ + neighbor->skin);
    }
}

double PairShallowEnsemble::init_one(int i, int j) {
    if (setflag[i][j] == 0) {
        error->all(FLERR, "pair shallow/ensemble: all pair coeffs are not set");
    }
    cutghost[i][j] = cutghost[j][i] = cutoff_;
    return cutoff_;
}

void PairShallowEnsemble::compute(int eflag, int vflag) {
    ev_init(eflag, vflag);
    if (vflag_atom) {
        error->all(FLERR, "pair shallow/ensemble does not compute per-atom virials (compute stress/atom and similar)");
    }

    const int nlocal = atom->nlocal;
    const int nall = nlocal + atom->nghost;
    double** x = atom->x;
    double** f = atom->f;
    const int* type = atom->type;
    const bool with_uncertainty = uncertainty_enabled();
    const int n_members = ensemble_size();

    computed_step_ = update->ntimestep;
    computed_nlocal_ = nlocal;
    atom_uncertainty_.assign(static_cast<size_t>(nlocal), 0.0);
    atom_ensemble_.assign(static_cast<size_t>(nlocal) * static_cast<size_t>(n_members), 0.0);
    if (nlocal == 0) {
        return;
    }

    try {
        auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
        auto i32 = torch::TensorOptions().dtype(torch::kInt32);
        // everything the model reads is on its device (built on the CPU, copied
        // once per step); what LAMMPS reads back is copied to the CPU
        const auto device = model_->device;
        auto i32_device = i32.device(device);

        // local atoms first, then ghosts, in LAMMPS order (no copy of x: it is
        // contiguous, nall x 3)
        auto positions = torch::from_blob(x[0], {nall, 3}, f64).to(device, model_->dtype, /*non_blocking*/ false, /*copy*/ true);
        positions.requires_grad_(true);
        auto types = torch::empty({nall}, i32);
        auto* types_data = types.data_ptr<int32_t>();
        for (int i = 0; i < nall; i++) {
            types_data[i] = type_to_atomic_number_[static_cast<size_t>(type[i])];
        }
        auto system = torch::make_intrusive<mta::SystemHolder>(
            types.to(device), positions, torch::zeros({3, 3}, positions.options().requires_grad(false)),
            torch::zeros({3}, torch::TensorOptions().dtype(torch::kBool).device(device))
        );

        // neighbour lists for the model from LAMMPS' full list (with ghosts):
        // pairs closer than each requested cutoff, no cell shifts (ghosts are
        // explicit copies of periodic images)
        auto components = torch::make_intrusive<mts::LabelsHolder>(
            std::vector<std::string>{"xyz"}, torch::tensor({0, 1, 2}, i32_device).reshape({3, 1})
        );
        auto properties = torch::make_intrusive<mts::LabelsHolder>(
            std::vector<std::string>{"distance"}, torch::zeros({1, 1}, i32_device)
        );
        for (const auto& options: model_->neighbor_lists) {
            const double cutoff = options->engine_cutoff(model_->length_unit);
            const double cutoff2 = cutoff * cutoff;
            const bool full = options->full_list();
            // pairs around ghosts too: a model may use them (message passing, or
            // pairs between the neighbours of an atom)
            const int n_centers = list->inum + list->gnum;
            std::vector<int32_t> samples;
            std::vector<double> vectors;
            for (int ii = 0; ii < n_centers; ii++) {
                const int i = list->ilist[ii];
                const int* neighbors = list->firstneigh[i];
                for (int jj = 0; jj < list->numneigh[i]; jj++) {
                    const int j = neighbors[jj] & NEIGHMASK;
                    if (!full && j < i) {
                        continue;  // half list: each pair once
                    }
                    const double dx = x[j][0] - x[i][0];
                    const double dy = x[j][1] - x[i][1];
                    const double dz = x[j][2] - x[i][2];
                    if (dx * dx + dy * dy + dz * dz >= cutoff2) {
                        continue;
                    }
                    samples.insert(samples.end(), {i, j, 0, 0, 0});
                    vectors.insert(vectors.end(), {dx, dy, dz});
                }
            }
            auto n_pairs = static_cast<int64_t>(vectors.size() / 3);
            auto sample_values = torch::from_blob(samples.data(), {n_pairs, 5}, i32).to(device, torch::kInt32, false, true);
            auto vector_values = torch::from_blob(vectors.data(), {n_pairs, 3, 1}, f64).to(device, model_->dtype, false, true);
            auto block = torch::make_intrusive<mts::TensorBlockHolder>(
                vector_values,
                torch::make_intrusive<mts::LabelsHolder>(
                    std::vector<std::string>{"first_atom", "second_atom", "cell_shift_a", "cell_shift_b", "cell_shift_c"},
                    sample_values
                ),
                std::vector<mts::Labels>{components},
                properties
            );
            mta::register_autograd_neighbors(system, block, check_consistency_);
            system->add_neighbor_list(options, block);
        }

        // one call: per-atom energies (and uncertainties) of the local atoms
        auto requested = torch::Dict<std::string, mta::ModelOutput>();
        std::vector<std::string> names = {"energy"};
        if (with_uncertainty) {
            names.push_back("energy_uncertainty");
            names.push_back("energy_ensemble");
        }
        for (const auto& name: names) {
            auto output = torch::make_intrusive<mta::ModelOutputHolder>();
            output->set_unit(model_->energy_unit);
            output->set_sample_kind("atom");
            requested.insert(name, output);
        }
        auto selected = torch::zeros({nlocal, 2}, i32);
        selected.index_put_({torch::indexing::Slice(), 1}, torch::arange(nlocal, i32));
        auto evaluation = torch::make_intrusive<mta::ModelEvaluationOptionsHolder>(
            model_->length_unit, requested,
            torch::make_intrusive<mts::LabelsHolder>(std::vector<std::string>{"system", "atom"}, selected.to(device))
        );
        auto systems = c10::List<mta::System>();
        systems.push_back(system);
        auto result = model_->module.forward({systems, evaluation, check_consistency_}).toGenericDict();

        auto block_of = [&](const std::string& name) {
            return mts::TensorMapHolder::block_by_id(result.at(name).toCustomClass<mts::TensorMapHolder>(), 0);
        };
        auto atom_column = [](const mts::TensorBlock& block) {
            auto names = block->samples()->names();
            auto column = std::find(names.begin(), names.end(), "atom") - names.begin();
            return block->samples()->values().index({torch::indexing::Slice(), column}).to(torch::kCPU, torch::kInt64).contiguous();
        };

        auto energy_block = block_of("energy");
        auto energies = energy_block->values();
        auto gradient = torch::autograd::grad({energies.sum()}, {positions})[0].to(torch::kCPU, torch::kFloat64).contiguous();

        const double* g = gradient.data_ptr<double>();
        double virial_local[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
        for (int i = 0; i < nall; i++) {
            const double fx = -g[3 * i + 0];
            const double fy = -g[3 * i + 1];
            const double fz = -g[3 * i + 2];
            f[i][0] += fx;
            f[i][1] += fy;
            f[i][2] += fz;
            if (vflag_global) {
                // W = sum over local and ghost atoms of r (x) F: the energy of
                // the local atoms is translation invariant, so this is the
                // virial of this rank's energy whatever the origin
                virial_local[0] += x[i][0] * fx;
                virial_local[1] += x[i][1] * fy;
                virial_local[2] += x[i][2] * fz;
                virial_local[3] += x[i][0] * fy;
                virial_local[4] += x[i][0] * fz;
                virial_local[5] += x[i][1] * fz;
            }
        }
        if (vflag_global) {
            for (int k = 0; k < 6; k++) {
                virial[k] += virial_local[k];
            }
        }

        auto atoms = atom_column(energy_block);
        auto energy_values = energies.detach().to(torch::kCPU, torch::kFloat64).reshape({-1}).contiguous();
        const double* e = energy_values.data_ptr<double>();
        const int64_t* a = atoms.data_ptr<int64_t>();
        if (eflag_global) {
            for (int64_t r = 0; r < atoms.size(0); r++) {
                eng_vdwl += e[r];
            }
        }
        if (eflag_atom) {
            for (int64_t r = 0; r < atoms.size(0); r++) {
                eatom[a[r]] += e[r];
            }
        }

        if (with_uncertainty) {
            auto uncertainty_block = block_of("energy_uncertainty");
            auto uncertainty = uncertainty_block->values().detach().to(torch::kCPU, torch::kFloat64).reshape({-1}).contiguous();
            auto uncertainty_atoms = atom_column(uncertainty_block);
            const double* u = uncertainty.data_ptr<double>();
            const int64_t* ua = uncertainty_atoms.data_ptr<int64_t>();
            for (int64_t r = 0; r < uncertainty_atoms.size(0); r++) {
                atom_uncertainty_[static_cast<size_t>(ua[r])] = u[r];
            }

            auto ensemble_block = block_of("energy_ensemble");
            auto ensemble = ensemble_block->values().detach().to(torch::kCPU, torch::kFloat64).contiguous();
            if (ensemble.size(1) != n_members) {
                throw std::runtime_error("the model returned " + std::to_string(ensemble.size(1)) +
                    " ensemble members, expected " + std::to_string(n_members));
            }
            auto ensemble_atoms = atom_column(ensemble_block);
            const double* m = ensemble.data_ptr<double>();
            const int64_t* ma = ensemble_atoms.data_ptr<int64_t>();
            for (int64_t r = 0; r < ensemble_atoms.size(0); r++) {
                std::copy(m + r * n_members, m + (r + 1) * n_members,
                    atom_ensemble_.begin() + ma[r] * n_members);
            }
        }
    } catch (const c10::Error& e) {
        error->one(FLERR, "pair shallow/ensemble: the model failed: {}", e.what_without_backtrace());
    } catch (const std::exception& e) {
        error->one(FLERR, "pair shallow/ensemble: the model failed: {}", e.what());
    }
}
