// SPDX-License-Identifier: GPL-2.0-or-later
//
// Entry point of the shallow-ensemble LAMMPS plugin: `plugin load
// shallowensembleplugin.so` registers `pair_style shallow/ensemble` and
// `compute shallow/ensemble`.

#include "compute_shallow_ensemble.h"
#include "pair_shallow_ensemble.h"
#include "plugin_abi.h"

#ifndef SHALLOW_ENSEMBLE_LAMMPS_VERSION
#error "SHALLOW_ENSEMBLE_LAMMPS_VERSION (e.g. \"22 Jul 2025\") must be defined by the build"
#endif

namespace {

LAMMPS_NS::Pair* create_pair(LAMMPS_NS::LAMMPS* lmp) {
    return new LAMMPS_NS::PairShallowEnsemble(lmp);
}

LAMMPS_NS::Compute* create_compute(LAMMPS_NS::LAMMPS* lmp, int narg, char** arg) {
    return new LAMMPS_NS::ComputeShallowEnsemble(lmp, narg, arg);
}

}  // namespace

extern "C" void lammpsplugin_init(void* lmp, void* handle, void* register_function) {
    using shallow_ensemble::PluginRecord;
    auto register_style = reinterpret_cast<shallow_ensemble::RegisterFunction>(register_function);

    PluginRecord pair = {};
    pair.lammps_version = SHALLOW_ENSEMBLE_LAMMPS_VERSION;
    pair.style_kind = "pair";
    pair.style_name = "shallow/ensemble";
    pair.description = "metatomic models with per-atom energy uncertainties (shallow-ensemble)";
    pair.author = "shallow-ensemble developers";
    pair.factory.pair = &create_pair;
    pair.handle = handle;
    register_style(&pair, lmp);

    PluginRecord compute = pair;
    compute.style_kind = "compute";
    compute.description = "per-atom energy uncertainty and whole-system ensemble spread of pair shallow/ensemble";
    compute.factory.compute = &create_compute;
    register_style(&compute, lmp);
}
