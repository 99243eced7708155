"""How elbox's threads wait: the OpenMP spin count, set by the `elbox` command before PyTorch loads.

PyTorch's CPU build runs its intra-op threads on GNU OpenMP (libgomp). By default a libgomp thread that has finished
its part of an operation spins on the CPU, checking 300,000 times (GOMP_SPINCOUNT) for the next one, before it
sleeps. On a machine of its own that costs nothing. With more runnable threads than cores (several training runs, a
data loader beside the training threads, a shared server) the spinning threads take the cores that the threads they
wait for need: measured on 2 cores, five default-VAE runs together trained at 2,061 images/s in total, 0.16 of
one run alone (12,536). With GOMP_SPINCOUNT=1000 a waiting thread spins briefly (a few microseconds, enough to catch
the next operation of a busy training loop) and then sleeps: five runs together reach 14,167 images/s, 1.09 of one
alone, and one run alone keeps its speed (median -2.8 % over three interleaved rounds). OMP_WAIT_POLICY=PASSIVE
(sleep at once) did as well under load but cost 9 % alone (benchmarks/contention.py; benchmarks/results/speed.md).

libgomp reads its environment once, when it is loaded, so the setting must be in the environment before `import
torch`. Every `elbox` command sets it first (elbox.cli); `import elbox` leaves the process's environment alone. A
script or notebook opts in with one line, run before torch is imported:

    from elbox.core.threads import apply_wait_policy; apply_wait_policy()

(or GOMP_SPINCOUNT=1000 in the environment). A user's own choice is kept: when any of
OMP_WAIT_POLICY, GOMP_SPINCOUNT or KMP_BLOCKTIME is set, elbox sets nothing. Other OpenMP runtimes (LLVM's libomp
on macOS) ignore GOMP_SPINCOUNT; there, OMP_WAIT_POLICY=PASSIVE is the setting for a shared machine. This module
must not import torch.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "1000"
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def apply_wait_policy() -> bool:
    """Put GOMP_SPINCOUNT=1000 in the environment unless the user chose a wait policy. Returns whether it takes
    effect in this process: not when torch was imported before elbox (child processes still inherit it)."""
    if any(name in os.environ for name in WAIT_VARIABLES):
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return "torch" not in sys.modules
