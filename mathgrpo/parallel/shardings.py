"""Shardings of parameters, optimizer state and KV cache, and placing host arrays on a mesh
(the logical-axis rules are in mesh.py)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mathgrpo.config import ConfigError, ModelConfig
from mathgrpo.model import abstract_params, logical_axes
from mathgrpo.parallel.mesh import BATCH_AXES, LOGICAL_RULES, _axis_size


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


def cache_shardings(mesh: Mesh, layers: int | None = None) -> Any:
    """Shardings of a KVCache: batch over (data, fsdp), kv heads over tensor; stacked, or a per-layer
    cache of `layers` layers."""
    from mathgrpo.model import KVCache

    if layers is None:
        kv = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, "tensor", None, None))  # [L, B, K, H/S, S/H]
    else:
        kv = (NamedSharding(mesh, PartitionSpec(BATCH_AXES, "tensor", None, None)),) * layers  # L × [B, K, ., .]
    return KVCache(k=kv, v=kv, segment_ids=NamedSharding(mesh, PartitionSpec(BATCH_AXES, None)),
                   index=replicated(mesh))


def put_global(tree: Any, shardings: Any) -> Any:
    """Places host arrays that every process holds in full onto the mesh (each process sets only its
    addressable shards; nothing is gathered)."""
    def one(value, sharding):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(one, tree, shardings)
