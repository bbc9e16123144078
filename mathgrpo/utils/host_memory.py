"""Host allocator settings for XLA:CPU: keep freed memory in the process instead of faulting it back.

XLA:CPU allocates each executable's buffers with posix_memalign from its worker threads. glibc serves
a thread from its own arena, and such an arena maps every large chunk with mmap and unmaps it on free
(even with mmap "disabled", non-main arenas fall back to it), so every train step writes into fresh
pages: ~1.07 M page faults (4.1 GB) per step of the full-size bench, and on the virtual machines we
run on a fresh page costs 3-9 µs (1 GiB: 0.85-2.3 s to fill fresh, 0.06 s to refill). With one arena,
no mmap and no trimming, freed chunks stay in the heap and the next step reuses them: 0 faults after
warm-up, the same step 9-14 s → 7-8 s (BENCHMARKS.md). The cost: the process keeps its high-water mark
of host memory until it exits.

Applied only where JAX runs on the CPU (no accelerator plugin installed, or JAX_PLATFORMS=cpu), on
glibc, before JAX starts its threads; `MATHGRPO_HOST_MALLOC=default` opts out.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform

# mallopt(3) parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def _accelerator_installed() -> bool:
    """Whether JAX would find an accelerator backend, found the way JAX finds one (xla_bridge's plugin
    discovery: modules of the `jax_plugins` namespace package or `jax_plugins` entry points; libtpu),
    without importing JAX."""
    if importlib.util.find_spec("libtpu") is not None or importlib.metadata.entry_points(group="jax_plugins"):
        return True
    namespace = importlib.util.find_spec("jax_plugins")
    return namespace is not None and any(pkgutil.iter_modules(namespace.submodule_search_locations))


def runs_on_cpu() -> bool:
    """True when JAX will run on the CPU: JAX_PLATFORMS says cpu, or no accelerator plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not _accelerator_installed()


def _glibc():
    """The process's glibc (its malloc is what the settings here tune), or None on another libc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_host_memory() -> bool:
    """One malloc arena, no mmap'd chunks, no trimming (see the module docstring). Call before JAX
    initializes; returns whether the settings were applied."""
    if os.environ.get("MATHGRPO_HOST_MALLOC", "") == "default" or not runs_on_cpu():
        return False
    libc = _glibc()
    if libc is None:
        return False
    # Arena count first: threads that start later share the main arena, which grows with brk.
    return all(libc.mallopt(param, value) == 1
               for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))


def release_freed_host_memory() -> bool:
    """Give the heap's free pages back to the system (glibc `malloc_trim(0)`, which also releases whole
    free pages inside the heap): for a process that keeps freed memory (above) and moves to a phase
    that needs less of it. The bench calls it between its phases, where its two processes (ours and
    the torch worker) would otherwise both sit at their high-water marks (11.5 + 13.0 GB: the torch
    worker was OOM-killed on a 23 GiB machine, BENCHMARKS.md). Returns whether anything was released."""
    libc = _glibc()
    return libc is not None and libc.malloc_trim(0) == 1
