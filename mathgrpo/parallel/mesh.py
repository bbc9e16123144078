"""Device mesh, the logical-axis rules, shardings of every state, and multi-host initialization.

Sharding is declared once: parameters carry logical axis names (model/qwen3.py), and
`LOGICAL_RULES` maps them onto the mesh axes (data, fsdp, tensor). A size-1 mesh axis drops out, so
the same code runs on one CPU device, 8 GPUs or several hosts.

    batch     → (data, fsdp)   sequences / micro-batch rows split across all data-parallel devices
    embed     → fsdp           FSDP: every parameter's model dimension is split (ZeRO-3)
    vocab, q_heads, kv_heads, mlp → tensor   Megatron-style tensor parallelism when tensor > 1
    layers, seq, head_dim → replicated

The optimizer state follows the parameters (Adam moments have the same shardings); the packed
batch splits its row axis over (data, fsdp); the KV cache splits batch and kv heads.

Multi-host is JAX's multi-controller runtime: one process per GPU, `jax.distributed.initialize`
(coordinator from the config or the environment; SLURM and other schedulers auto-detected by JAX).
Every process runs the same program; `process_index() == 0` logs.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from mathgrpo.config import MESH_AXES, ConfigError, MeshConfig

BATCH_AXES = ("data", "fsdp")
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("seq", None),
    ("head_dim", None),
)


def logical_rules(config: MeshConfig) -> tuple[tuple[str, Any], ...]:
    """LOGICAL_RULES with the config's overrides applied (lists become tuples)."""
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in (config.logical_rules or {}).items()}
    unknown = sorted(set(overrides) - {name for name, _ in LOGICAL_RULES})
    if unknown:
        raise ConfigError(f"mesh.logical_rules: unknown logical axes {unknown}; "
                          f"expected some of {[name for name, _ in LOGICAL_RULES]}")
    return tuple((name, overrides.get(name, target)) for name, target in LOGICAL_RULES)


def make_mesh(config: MeshConfig, devices: list | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all, across processes)."""
    devices = list(jax.devices() if devices is None else devices)
    fixed = math.prod(v for v in (config.data, config.fsdp, config.tensor))
    if -1 not in (config.data, config.fsdp, config.tensor) and fixed < len(devices) and jax.process_count() == 1:
        devices = devices[:fixed]  # a fully specified smaller mesh in one process: the first devices
    sizes = config.resolve(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        array = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, AssertionError, NotImplementedError):
        array = np.array(devices).reshape(shape)
    return Mesh(array, MESH_AXES)


def _axis_size(mesh: Mesh, target) -> int:
    if target is None:
        return 1
    names = target if isinstance(target, tuple) else (target,)
    return math.prod(mesh.shape[n] for n in names)


def data_parallel_size(mesh: Mesh) -> int:
    return _axis_size(mesh, BATCH_AXES)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids: list[int] | None = None) -> None:
    """`jax.distributed.initialize` from arguments or MATHGRPO_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID.

    With neither, JAX auto-detects the cluster (SLURM, Open MPI, ...); a single process needs no call.
    """
    coordinator_address = coordinator_address or os.environ.get("MATHGRPO_COORDINATOR")
    if num_processes is None and "MATHGRPO_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["MATHGRPO_NUM_PROCESSES"])
    if process_id is None and "MATHGRPO_PROCESS_ID" in os.environ:
        process_id = int(os.environ["MATHGRPO_PROCESS_ID"])
    if coordinator_address is None and "SLURM_JOB_ID" not in os.environ and num_processes in (None, 1):
        return  # single process
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)


class MeshJit:
    """A jitted function that is traced, compiled and called with `mesh` set and the logical rules
    active, so the model's activation constraints apply; `.lower()` serves ahead-of-time plans."""

    def __init__(self, fn, mesh: Mesh | None, rules, **jit_kwargs):
        def traced(*args):
            with nn.logical_axis_rules(rules):
                return fn(*args)

        self.mesh = mesh
        self.jitted = jax.jit(traced if mesh is not None else fn, **jit_kwargs)

    def _context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def __call__(self, *args):
        with self._context():
            return self.jitted(*args)

    def lower(self, *args):
        with self._context():
            return self.jitted.lower(*args)
