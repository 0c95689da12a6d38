// SPDX-License-Identifier: GPL-2.0-or-later
//
// compute ID group shallow/ensemble [members]
//
// Reads what pair_style shallow/ensemble computed at the current timestep:
//   per-atom vector: the calibrated per-atom energy uncertainty (energy units); with
//       `members`, a per-atom array instead: column 1 the uncertainty, columns
//       2..M+1 the member energies of the atom
//   global scalar: the ensemble spread of the energy of the atoms in the group,
//       i.e. the standard deviation (M - 1 normalisation) over the M members of the
//       member energies summed over all atoms of the group on all MPI ranks
//   global vector (M + 2): [1] the same spread, [2] the largest per-atom
//       uncertainty in the group (over all ranks), [3..M+2] the summed member
//       energies
// Atoms outside the group get 0 in the per-atom output.
#ifndef SHALLOW_ENSEMBLE_COMPUTE_SHALLOW_ENSEMBLE_H
#define SHALLOW_ENSEMBLE_COMPUTE_SHALLOW_ENSEMBLE_H

#include <vector>

#include "compute.h"

namespace LAMMPS_NS {

class PairShallowEnsemble;

class ComputeShallowEnsemble : public Compute {
public:
    ComputeShallowEnsemble(LAMMPS* lmp, int narg, char** arg);
    ~ComputeShallowEnsemble() override;

    void init() override;
    double compute_scalar() override;
    void compute_vector() override;
    void compute_peratom() override;
    double memory_usage() override;

private:
    PairShallowEnsemble* pair_ = nullptr;
    int n_members_ = 0;
    bool members_ = false;
    int nmax_ = 0;
    double* uncertainty_ = nullptr;   // per-atom vector output
    double** per_atom_ = nullptr;     // per-atom array output (with `members`)
    std::vector<int> extlist_;

    void find_pair();
    void check_current();
    /// Members summed over the group on all ranks, and the largest per-atom
    /// uncertainty in the group; fills vector[].
    void reduce();
};

}  // namespace LAMMPS_NS

#endif
