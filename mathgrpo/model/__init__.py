"""Qwen3 in Flax: `forward`, `logits`, params and KV cache (see qwen3.py)."""

from mathgrpo.model.qwen3 import (
    KVCache,
    Qwen3,
    abstract_params,
    count_params,
    forward,
    init_cache,
    init_params,
    logical_axes,
    logits,
    output_kernel,
    positions_from_segments,
    unstack_layers,
    write_prompts,
)

__all__ = [
    "KVCache", "Qwen3", "abstract_params", "count_params", "forward", "init_cache", "init_params",
    "logical_axes", "logits", "output_kernel", "positions_from_segments", "unstack_layers", "write_prompts",
]
