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

import math
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mathgrpo.config import MESH_AXES, ConfigError, MeshConfig, ModelConfig
from mathgrpo.model import abstract_params, logical_axes

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


def check_divisibility(model: ModelConfig, mesh: Mesh, rules) -> None:
    """Every sharded parameter dimension must divide by its mesh axes; errors name param, axis, sizes."""
    tensor = mesh.shape["tensor"]
    for name, heads in (("num_attention_heads", model.num_attention_heads),
                        ("num_key_value_heads", model.num_key_value_heads)):
        if heads % tensor:
            raise ConfigError(f"model.{name}={heads} is not divisible by the mesh's tensor axis ({tensor})")
    rule_map = dict(rules)
    shapes = abstract_params(model)
    flat_specs = jax.tree_util.tree_flatten_with_path(
        logical_axes(model), is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    flat_shapes = jax.tree.leaves(shapes)
    for (path, spec), leaf in zip(flat_specs, flat_shapes):
        for dim, logical in zip(leaf.shape, spec):
            target = rule_map.get(logical)
            size = _axis_size(mesh, target)
            if dim % size:
                name = "/".join(str(getattr(k, "key", k)) for k in path)
                raise ConfigError(f"param {name}: dimension '{logical}' of size {dim} is not divisible by mesh "
                                  f"axis {target} of size {size}")


def param_shardings(model: ModelConfig, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """NamedShardings of the params (checked for divisibility first)."""
    check_divisibility(model, mesh, rules)
    return nn.logical_to_mesh_sharding(logical_axes(model), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def optimizer_state_shardings(optimizer: optax.GradientTransformation, abstract_state_params: Any,
                              shardings: Any, mesh: Mesh) -> Any:
    """Shardings of `optimizer.init(params)`: param-shaped leaves (Adam moments) follow the params."""
    abstract = jax.eval_shape(optimizer.init, abstract_state_params)
    return optax.tree_utils.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract, shardings,
        transform_non_params=lambda _: replicated(mesh))


def train_state_shardings(model: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh, rules=LOGICAL_RULES):
    """Shardings of a TrainState (step and counters replicated)."""
    from mathgrpo.train_step import TrainState

    params = param_shardings(model, mesh, rules)
    abstract = abstract_params(model)
    return TrainState(step=replicated(mesh), params=params,
                      opt_state=optimizer_state_shardings(optimizer, abstract, params, mesh),
                      skipped_steps=replicated(mesh))


def batch_shardings(mesh: Mesh) -> Any:
    """Shardings of a PackedBatch: rows over (data, fsdp); everything else replicated."""
    from mathgrpo.packing import PackedBatch

    rows = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, None))
    return PackedBatch(
        tokens=rows, positions=rows, segment_ids=rows, loss_mask=rows, advantages=rows,
        rollout_logprobs=rows, old_logprobs=rows, ref_logprobs=rows, sequence_index=rows,
        sequence_slots=replicated(mesh), legacy_weight=NamedSharding(mesh, PartitionSpec(None, BATCH_AXES)),
        num_micro_batches=replicated(mesh), token_count=replicated(mesh), sequence_count=replicated(mesh),
    )


def cache_shardings(mesh: Mesh) -> Any:
    """Shardings of a KVCache: batch over (data, fsdp), kv heads over tensor."""
    from mathgrpo.model import KVCache

    kv = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, "tensor", None, None))  # [L, B, K, S, H]
    return KVCache(k=kv, v=kv, segment_ids=NamedSharding(mesh, PartitionSpec(BATCH_AXES, None)),
                   index=replicated(mesh))


def data_parallel_size(mesh: Mesh) -> int:
    return _axis_size(mesh, BATCH_AXES)


def put_global(tree: Any, shardings: Any) -> Any:
    """Places host arrays that every process holds in full onto the mesh (each process sets only its
    addressable shards; nothing is gathered)."""
    def one(value, sharding):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(one, tree, shardings)


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
