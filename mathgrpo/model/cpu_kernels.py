"""A CPU kernel called through XLA's FFI: `rows_dot`, the sampler's LM head on x86-64 CPUs with AVX-512F.

The head of a decode step is a tall product, W [V, D] · hᵀ [D, B] (V = 151,936 rows of the vocabulary,
B = the step's rows). XLA:CPU's GEMM ran it at ~0.7 of this machine's measured matmul peak (26-27 ms
a step at the bench's shapes, V·D = 311 MB of fp32 weights streamed once per step), the largest single
cost of the JAX sampler on CPU; the C++ kernel in `csrc/rows_dot.cc` runs it near the peak (~18 ms;
BENCHMARKS.md, session 20). Its outputs are fp32 fused multiply-add chains over the depth in order, one
per element, so a column's logits do not depend on the other columns of the call (the sampler's
samples must not depend on which rows share a step).

The kernel is compiled on first use with the system's C++ compiler into a per-user cache
(`MATHGRPO_KERNEL_CACHE`, default `~/.cache/mathgrpo/kernels`, keyed by the source, the flags and the
jaxlib version; `make install` builds it ahead) and registered as the FFI target `mathgrpo_rows_dot`.
Where it cannot run (not Linux x86-64, no AVX-512F, no compiler, or `MATHGRPO_CPU_KERNELS=off`),
`rows_dot_available()` is False and callers use XLA's dot; a failed build on a machine that could run
it is logged once, with the compiler's message.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from mathgrpo.utils.process import log

SOURCE = Path(__file__).parent / "csrc" / "rows_dot.cc"
TARGET = "mathgrpo_rows_dot"
# -ffp-contract=off: the only fused multiply-adds are the kernel's own chains (module docstring).
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mfma", "-ffp-contract=off", "-w")


def cpu_supported() -> tuple[bool, str]:
    """Whether this machine can build and run the kernel, and if not, why."""
    if os.environ.get("MATHGRPO_CPU_KERNELS", "") == "off":
        return False, "MATHGRPO_CPU_KERNELS=off"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False, f"needs Linux on x86-64, this is {platform.system()} on {platform.machine()}"
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    if "avx512f" not in flags.split():
        return False, "the CPU has no AVX-512F"
    if shutil.which(compiler()) is None:
        return False, f"no C++ compiler {compiler()!r} on PATH (set CXX)"
    return True, ""


def compiler() -> str:
    return os.environ.get("CXX", "g++")


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mathgrpo" / "kernels"
    return Path(os.environ.get("MATHGRPO_KERNEL_CACHE", default))


def library_path() -> Path:
    """Where the built kernel lives: named by a hash of what it is built from."""
    import jaxlib

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + jaxlib.__version__.encode()).hexdigest()
    return cache_dir() / f"rows_dot-{key[:16]}.so"


def build() -> Path:
    """Compiles the kernel into the cache unless it is there (under a file lock, so processes starting
    together build it once); returns the library's path. Raises RuntimeError with the compiler's output."""
    path = library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            out = Path(scratch) / path.name
            command = [compiler(), *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"building {SOURCE.name} failed ({' '.join(command)}):\n{done.stderr[-4000:]}")
            os.replace(out, path)  # atomic: a reader never sees a partial library
    return path


@functools.cache
def rows_dot_available() -> bool:
    """Whether `rows_dot` can be traced here: the machine supports it, it is built and registered."""
    supported, why = cpu_supported()
    if not supported:
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
    except (OSError, RuntimeError) as error:
        log(f"cpu_kernels: rows_dot unavailable, XLA's dot is used instead: {error}")
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.RowsDot), platform="cpu")
    return True


def rows_dot(rows: jax.Array, x: jax.Array) -> jax.Array:
    """fp32 [V, B] = rows [V, D] · xᵀ (x [B, D]), both fp32, by the kernel (`rows_dot_available()` must
    hold). Each element is the fused multiply-add chain over D in order from 0."""
    if rows.dtype != jnp.float32 or x.dtype != jnp.float32:
        raise TypeError(f"rows_dot takes fp32 operands, got {rows.dtype} and {x.dtype}")
    if rows.ndim != 2 or x.ndim != 2 or rows.shape[1] != x.shape[1]:
        raise ValueError(f"rows_dot takes rows [V, D] and x [B, D], got {rows.shape} and {x.shape}")
    out = jax.ShapeDtypeStruct((rows.shape[0], x.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(rows, x)


if __name__ == "__main__":  # `make install`: build ahead where the machine supports it
    supported, why = cpu_supported()
    print(f"cpu_kernels: rows_dot built at {build()}" if supported else f"cpu_kernels: rows_dot not built ({why})")
