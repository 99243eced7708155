"""How elbox's threads wait: the OpenMP wait policy, set when elbox is imported, before PyTorch loads.

PyTorch's CPU build runs its intra-op threads on GNU OpenMP (libgomp). By default a libgomp thread that has finished
its part of an operation spins on the CPU for a while (GOMP_SPINCOUNT, 300,000 checks) waiting for the next one.
On a machine of its own that costs nothing. With more runnable threads than cores (several training runs, data
loader workers beside the training threads, a shared server) the spinning threads take the cores that the threads
they wait for need, and each operation waits for descheduled threads: a 2-core CPU measured 54 images/s instead of
about 11,000 for the default VAE. With OMP_WAIT_POLICY=PASSIVE a waiting thread sleeps instead
(benchmarks/contention.py measures both, alone and beside other runs).

libgomp reads its environment once, when it is loaded, so the policy must be in the environment before `import
torch`: `import elbox` first does it, and so does every `elbox` command. A user's own choice is kept: when any of
OMP_WAIT_POLICY, GOMP_SPINCOUNT or KMP_BLOCKTIME is set, elbox sets nothing. This module must not import torch.
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY = "PASSIVE"
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def apply_wait_policy() -> bool:
    """Put OMP_WAIT_POLICY=PASSIVE in the environment unless the user chose a wait policy. Returns whether it takes
    effect in this process: not when torch was imported before elbox (child processes still inherit it)."""
    if any(name in os.environ for name in WAIT_VARIABLES):
        return False
    os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    return "torch" not in sys.modules
