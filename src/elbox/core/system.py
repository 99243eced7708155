"""Process-level settings that the command-line tool applies once at start-up."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys

import torch

from elbox.core.errors import ElboxError

# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory_in_heap(threshold_bytes: int = 1 << 30) -> bool:
    """On glibc, stop handing large freed blocks back to the OS.

    Importance sampling allocates the same ~16 MB temporaries thousands of times. By default glibc
    serves them with mmap or trims them off the heap when freed, so each reuse page-faults on every
    4 KiB page: measured 15-30 % of IWAE evaluation time spent in the kernel on a 2-core CPU. Raising
    the mmap and trim thresholds keeps that memory in the process for reuse. Returns whether it applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (e.g. musl): leave the allocator alone
    return bool(mallopt(_M_TRIM_THRESHOLD, threshold_bytes)) and bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which container limits narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    """Set PyTorch's intra-op thread count and return it.

    None picks the default: $OMP_NUM_THREADS when set (torchrun sets it), else every usable core shared
    among the processes on this machine ($LOCAL_WORLD_SIZE under torchrun). Measured on a 2-core CPU, one
    thread per core is fastest; one thread instead of two is 25-35 % slower (benchmarks/results/speed.md)."""
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            threads = int(os.environ["OMP_NUM_THREADS"])
        else:
            threads = usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    threads = max(1, threads)
    torch.set_num_threads(threads)
    return threads


def resolve_device(name: str) -> torch.device:
    """ "auto" (CUDA, else Apple's MPS, else the CPU) or a device that PyTorch sees; ElboxError otherwise."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ElboxError("device cuda was asked for, but PyTorch sees no CUDA GPU")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ElboxError("device mps was asked for, but PyTorch sees no Apple GPU")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ElboxError(f"unknown device {name!r}: {e}") from None


def bf16_is_native(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run on hardware support: CUDA GPUs of compute capability 8 or later,
    and CPUs with AVX-512 BF16 or AMX (what oneDNN needs). Elsewhere PyTorch emulates bf16 matmuls, measured
    about 100x slower than float32 on an AVX2 CPU (benchmarks/results/speed.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def available_memory_bytes(device: torch.device) -> int:
    """Memory a new allocation can use now: free GPU memory on CUDA; on a CPU, the kernel's MemAvailable
    (/proc/meminfo), else free physical pages."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def address_space_limit() -> int | None:
    """This process's address-space limit in bytes (RLIMIT_AS, `ulimit -v`), None where there is none."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else soft


def address_space_used() -> int:
    """Bytes of address space this process takes now (its virtual size), 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def allocatable_bytes() -> tuple[int, str]:
    """(bytes a new allocation can take now, what bounds it in words): the free memory, or, under an address-space
    limit, the room left below it when that is less (an allocation beyond it fails however much memory is free)."""
    free, limit = available_memory_bytes(torch.device("cpu")), address_space_limit()
    left = None if limit is None else max(0, limit - address_space_used())
    if left is None or left >= free:
        return free, "free memory"
    return left, f"address space left below this process's limit ({format_bytes(limit)}, ulimit -v)"


def format_bytes(n: float) -> str:
    """A size for a message: 4.7 KB, 1 TB."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1000
    return ""  # not reached
