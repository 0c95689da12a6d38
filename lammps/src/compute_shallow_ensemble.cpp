// SPDX-License-Identifier: GPL-2.0-or-later
//
// compute shallow/ensemble (see compute_shallow_ensemble.h and docs/lammps.md).

#include "compute_shallow_ensemble.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include <mpi.h>

#include "atom.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "update.h"

#include "pair_shallow_ensemble.h"

using namespace LAMMPS_NS;

ComputeShallowEnsemble::ComputeShallowEnsemble(LAMMPS* lmp, int narg, char** arg): Compute(lmp, narg, arg) {
    for (int iarg = 3; iarg < narg; iarg++) {
        if (std::strcmp(arg[iarg], "members") == 0) {
            members_ = true;
        } else {
            error->all(FLERR, "compute shallow/ensemble: unknown keyword '{}'", arg[iarg]);
        }
    }
    find_pair();

    scalar_flag = 1;
    extscalar = 1;
    vector_flag = 1;
    size_vector = n_members_ + 2;
    extvector = -1;
    extlist_.assign(static_cast<size_t>(size_vector), 1);
    extlist_[1] = 0;  // the largest per-atom value is intensive
    extlist = extlist_.data();
    peratom_flag = 1;
    size_peratom_cols = members_ ? n_members_ + 1 : 0;

    vector = new double[static_cast<size_t>(size_vector)]();
}

ComputeShallowEnsemble::~ComputeShallowEnsemble() {
    extlist = nullptr;  // owned by extlist_, not by Compute
    delete[] vector;
    memory->destroy(uncertainty_);
    memory->destroy(per_atom_);
}

void ComputeShallowEnsemble::find_pair() {
    pair_ = dynamic_cast<PairShallowEnsemble*>(force->pair_match("shallow/ensemble", 1));
    if (pair_ == nullptr) {
        error->all(FLERR, "compute shallow/ensemble needs pair_style shallow/ensemble (defined before the compute)");
    }
    if (!pair_->uncertainty_enabled()) {
        error->all(FLERR,
            "compute shallow/ensemble: the model of pair shallow/ensemble has no energy_uncertainty and "
            "energy_ensemble outputs, or the pair style was defined with 'uncertainty off'");
    }
    if (n_members_ == 0) {
        n_members_ = pair_->ensemble_size();
    } else if (pair_->ensemble_size() != n_members_) {
        error->all(FLERR, "compute shallow/ensemble: the number of ensemble members of the pair style changed");
    }
}

void ComputeShallowEnsemble::init() {
    find_pair();
}

void ComputeShallowEnsemble::check_current() {
    if (pair_->computed_step() != update->ntimestep || pair_->computed_nlocal() != atom->nlocal) {
        error->all(FLERR,
            "compute shallow/ensemble: pair shallow/ensemble has not computed the current step ({}); "
            "use the compute on steps with a force evaluation (e.g. after 'run 0')", update->ntimestep);
    }
}

void ComputeShallowEnsemble::reduce() {
    check_current();
    const int nlocal = atom->nlocal;
    const int* mask = atom->mask;
    const auto& ensemble = pair_->atom_ensemble();
    const auto& uncertainty = pair_->atom_uncertainty();
    const auto m = static_cast<size_t>(n_members_);

    std::vector<double> local(m, 0.0), total(m, 0.0);
    double local_max = 0.0, total_max = 0.0;
    for (int i = 0; i < nlocal; i++) {
        if (mask[i] & groupbit) {
            const auto row = static_cast<size_t>(i) * m;
            for (size_t k = 0; k < m; k++) {
                local[k] += ensemble[row + k];
            }
            local_max = std::max(local_max, uncertainty[static_cast<size_t>(i)]);
        }
    }
    MPI_Allreduce(local.data(), total.data(), n_members_, MPI_DOUBLE, MPI_SUM, world);
    MPI_Allreduce(&local_max, &total_max, 1, MPI_DOUBLE, MPI_MAX, world);

    double spread = 0.0;
    if (n_members_ > 1) {
        double mean = 0.0;
        for (auto value: total) {
            mean += value;
        }
        mean /= static_cast<double>(n_members_);
        double variance = 0.0;
        for (auto value: total) {
            variance += (value - mean) * (value - mean);
        }
        spread = std::sqrt(variance / static_cast<double>(n_members_ - 1));
    }
    vector[0] = spread;
    vector[1] = total_max;
    std::copy(total.begin(), total.end(), vector + 2);
}

double ComputeShallowEnsemble::compute_scalar() {
    invoked_scalar = update->ntimestep;
    reduce();
    scalar = vector[0];
    return scalar;
}

void ComputeShallowEnsemble::compute_vector() {
    invoked_vector = update->ntimestep;
    reduce();
}

void ComputeShallowEnsemble::compute_peratom() {
    invoked_peratom = update->ntimestep;
    check_current();
    if (atom->nmax > nmax_) {
        nmax_ = atom->nmax;
        if (members_) {
            memory->destroy(per_atom_);
            memory->create(per_atom_, nmax_, n_members_ + 1, "shallow/ensemble:per_atom");
            array_atom = per_atom_;
        } else {
            memory->destroy(uncertainty_);
            memory->create(uncertainty_, nmax_, "shallow/ensemble:uncertainty");
            vector_atom = uncertainty_;
        }
    }
    const int nlocal = atom->nlocal;
    const int* mask = atom->mask;
    const auto& ensemble = pair_->atom_ensemble();
    const auto& uncertainty = pair_->atom_uncertainty();
    const auto m = static_cast<size_t>(n_members_);
    for (int i = 0; i < nlocal; i++) {
        const bool in_group = (mask[i] & groupbit) != 0;
        const auto row = static_cast<size_t>(i);
        if (members_) {
            per_atom_[i][0] = in_group ? uncertainty[row] : 0.0;
            for (size_t k = 0; k < m; k++) {
                per_atom_[i][k + 1] = in_group ? ensemble[row * m + k] : 0.0;
            }
        } else {
            uncertainty_[i] = in_group ? uncertainty[row] : 0.0;
        }
    }
}

double ComputeShallowEnsemble::memory_usage() {
    return static_cast<double>(nmax_) * static_cast<double>(members_ ? n_members_ + 1 : 1) * sizeof(double);
}
