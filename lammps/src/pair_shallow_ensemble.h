// SPDX-License-Identifier: GPL-2.0-or-later
//
// pair_style shallow/ensemble: run any metatomic model (TorchScript file) in LAMMPS.
//
//   pair_style shallow/ensemble MODEL.pt [keyword value ...]
//   pair_coeff * * Z_or_symbol_of_type_1 Z_or_symbol_of_type_2 ...
//
// Every rank evaluates its local atoms (selected_atoms) in a non-periodic system of
// local + ghost atoms built from LAMMPS' full neighbour list with ghosts. Energies,
// forces (autograd, ghost forces sent back by newton_pair on) and the virial come
// from the model's `energy` output. When the model also has `energy_uncertainty` and
// `energy_ensemble` outputs, their per-atom values are kept for
// `compute shallow/ensemble` (see compute_shallow_ensemble.h). See docs/lammps.md.
#ifndef SHALLOW_ENSEMBLE_PAIR_SHALLOW_ENSEMBLE_H
#define SHALLOW_ENSEMBLE_PAIR_SHALLOW_ENSEMBLE_H

#include <memory>
#include <string>
#include <vector>

#include "pair.h"

namespace LAMMPS_NS {

class PairShallowEnsemble : public Pair {
public:
    explicit PairShallowEnsemble(LAMMPS* lmp);
    ~PairShallowEnsemble() override;

    void compute(int eflag, int vflag) override;
    void settings(int narg, char** arg) override;
    void coeff(int narg, char** arg) override;
    void init_style() override;
    double init_one(int i, int j) override;

    /// Whether the per-atom uncertainty and ensemble are computed (the model has
    /// both outputs and `uncertainty` is on).
    bool uncertainty_enabled() const;
    /// Number of ensemble members (0 when the uncertainty is not computed).
    int ensemble_size() const;
    /// Timestep of the last force evaluation, or -1 before the first one.
    bigint computed_step() const { return computed_step_; }
    /// Number of local atoms at the last force evaluation.
    int computed_nlocal() const { return computed_nlocal_; }
    /// Per local atom: calibrated energy uncertainty (LAMMPS energy units).
    const std::vector<double>& atom_uncertainty() const { return atom_uncertainty_; }
    /// Per local atom, row-major (nlocal x M): member energies (LAMMPS energy units).
    const std::vector<double>& atom_ensemble() const { return atom_ensemble_; }

private:
    struct Model;  // the TorchScript model and its metadata (torch stays out of this header)
    std::unique_ptr<Model> model_;

    void allocate();
    void check_types();

    std::vector<int> type_to_atomic_number_;  // index: LAMMPS type (1-based)
    double cutoff_ = 0.0;                     // largest neighbour list cutoff, LAMMPS length
    double interaction_range_ = 0.0;          // model interaction range, LAMMPS length
    bool check_consistency_ = false;
    bool uncertainty_requested_ = true;

    bigint computed_step_ = -1;
    int computed_nlocal_ = 0;
    std::vector<double> atom_uncertainty_;
    std::vector<double> atom_ensemble_;
};

}  // namespace LAMMPS_NS

#endif
