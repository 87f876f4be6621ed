"""Process-wide settings every ``logonet`` command makes before it works: how OpenMP's idle threads wait, and
whether glibc's malloc keeps freed memory. Standard library only (it runs before torch is imported), and the
bottom import layer, so the benchmarks can record what was set."""
from __future__ import annotations

import sys
from typing import Dict, Optional


#: libgomp (PyTorch's OpenMP runtime on Linux) reads these once, when torch is loaded, so the CLI's ``main`` sets
#: them before any command module (and torch) is imported. A thread that has finished its share of an operator
#: spins this many rounds (libgomp's default: 300,000) before it sleeps. While it spins it holds its core; when
#: another program holds the other one, our second thread shares a core with it and every operator waits for that
#: thread. Sleeping sooner lets the operating system move it to the freed core. Measured (issue 14,
#: docs/benchmarks.md), LoGoNet-S at 2 threads per 96^3 patch, medians: one core busy 13.2 s -> 11.4 s, idle 7.1 s
#: -> 7.1 s (OMP_WAIT_POLICY=PASSIVE, no spinning: busy 11.3 s but idle 7.8 s). Intel's and LLVM's runtimes (torch
#: on Windows, macOS) ignore it.
OPENMP_DEFAULTS: Dict[str, str] = {"GOMP_SPINCOUNT": "1000"}
#: A user's own OpenMP wait settings win: none of OPENMP_DEFAULTS is set when any of these is.
OPENMP_USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def apply_openmp_defaults(environ: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Set :data:`OPENMP_DEFAULTS` in ``environ`` (default ``os.environ``) unless the user chose a wait policy
    (:data:`OPENMP_USER_SETTINGS`); returns what it set. Child processes (torchrun ranks, benchmark workers)
    inherit them."""
    import os

    env = os.environ if environ is None else environ
    if any(name in env for name in OPENMP_USER_SETTINGS):
        return {}
    env.update(OPENMP_DEFAULTS)
    return dict(OPENMP_DEFAULTS)


#: glibc's malloc hands every freed block over 32 MiB straight back to the system (mmap/munmap), so each large
#: feature map of a 3-D network is fresh memory that the kernel must fault in and zero, page by page, in the one
#: thread that allocates it. Measured (issue 14, docs/benchmarks.md) per 96^3 patch at 1 thread: LoGoNet-S 10.7 s
#: -> 6.9 s and SwinUNETR-48 15.4 s -> 8.5 s, 1.4 and 2.6 million page faults per forward -> 0; and the faults were
#: what kept 2 threads from scaling (LoGoNet-S 3.7 s at 2 threads, 0.53x). Keeping freed memory in the heap costs
#: the process its peak footprint until it exits; every command is a process of its own, so nothing lingers.
#: A user's own malloc settings (these variables, or glibc.malloc tunables) win.
MALLOC_USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
#: Whether :func:`retain_freed_memory` made malloc keep freed memory in this process (machine lines record it).
malloc_retains_freed = False


def retain_freed_memory(environ: Optional[Dict[str, str]] = None) -> bool:
    """On glibc (Linux), make malloc keep freed memory for reuse: no mmap for large blocks (``M_MMAP_MAX`` 0), and
    give the heap's top back only beyond 2 GiB (``M_TRIM_THRESHOLD``). Returns whether it was applied: not on other
    C libraries (Windows, macOS: their allocators differ), nor when the user set malloc options themselves."""
    import ctypes
    import os
    import platform

    env = os.environ if environ is None else environ
    if any(name in env for name in MALLOC_USER_SETTINGS) or "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    global malloc_retains_freed
    try:
        libc = ctypes.CDLL(None)
        applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):  # no mallopt in this process's C library
        return False
    malloc_retains_freed = malloc_retains_freed or applied
    return applied
