"""Peak resident memory of a piece of work, from Linux's /proc (not a test module).

``clear_refs`` resets the process's resident high-water mark (``VmHWM``), so that the
peak of one step can be read apart from what came before it.
"""

import resource
import subprocess
import sys


def resident_mib() -> float:
    """Resident memory of this process now, MiB."""
    with open("/proc/self/statm") as fd:
        pages = int(fd.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def reset_peak() -> None:
    """Reset this process's resident high-water mark."""
    with open("/proc/self/clear_refs", "w") as fd:
        fd.write("5")


def peak_mib() -> float:
    """Resident high-water mark of this process since the last reset, MiB."""
    with open("/proc/self/status") as fd:
        for line in fd:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_extra_mib(work) -> float:
    """How far ``work()`` raises the resident memory above its level before, MiB."""
    before = resident_mib()
    reset_peak()
    work()
    return peak_mib() - before


def peak_extra_in_fresh_process(*extra_args: str) -> float:
    """Run this script again with ``extra_args`` (it must print ``peak_mib X`` last),
    so that no memory freed by earlier work hides the peak, and return ``X``."""
    command = [sys.executable, *sys.argv, *extra_args]
    output = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(output.stdout.split("peak_mib")[-1])
