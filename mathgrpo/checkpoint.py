"""Orbax checkpoints of params, and conversion to and from HF directories.

A params checkpoint is an Orbax composite with two items:
- `params`: the parameter pytree (StandardSave: one tensorstore array per leaf, restorable into any
  sharding — each process reads only its shards);
- `meta`: JSON with the model config (HF field names) and where the tokenizer came from, so an
  export needs nothing else.
Orbax writes to a temporary directory and renames it at the end, so an interrupted save is never
picked up as a checkpoint. (The training-state manager — optimizer, step, data position, RNG,
keep-N, async — comes with the trainer; it reuses `model_config_from_meta` below.)
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from mathgrpo import hf_io
from mathgrpo.config import ModelConfig, from_dict
from mathgrpo.model import abstract_params

FORMAT_VERSION = 1


def make_meta(config: ModelConfig, tokenizer_dir: str | os.PathLike | None = None,
              generation_config: dict | None = None) -> dict:
    return {
        "format": "mathgrpo-params",
        "version": FORMAT_VERSION,
        "model": config.architecture(),
        "param_dtype": config.param_dtype,
        "tokenizer_dir": os.path.abspath(tokenizer_dir) if tokenizer_dir else None,
        "generation_config": generation_config,
    }


def model_config_from_meta(meta: dict, **runtime) -> ModelConfig:
    return from_dict(ModelConfig, {**meta["model"], "param_dtype": meta["param_dtype"], **runtime},
                     prefix="model.")


def save_params(path: str | os.PathLike, config: ModelConfig, params: Any, *,
                tokenizer_dir: str | os.PathLike | None = None, generation_config: dict | None = None) -> None:
    """Writes params + metadata as an Orbax checkpoint at `path` (which must not exist)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; choose a new checkpoint directory")
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    checkpointer.save(path, ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave(make_meta(config, tokenizer_dir, generation_config)),
    ))


def read_meta(path: str | os.PathLike) -> dict:
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(os.path.join(path, "meta")):
        raise FileNotFoundError(f"{path}: not a mathgrpo params checkpoint (no 'meta' item); "
                                "expected a directory written by `convert hf-to-orbax` or the trainer")
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    return checkpointer.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_params(path: str | os.PathLike, shardings: Any | Callable[[ModelConfig], Any] | None = None,
                   **runtime) -> tuple[ModelConfig, Any, dict]:
    """Restores (config, params, meta). `shardings` as in `hf_io.load` (None: the first device)."""
    path = os.path.abspath(os.fspath(path))
    meta = read_meta(path)
    config = model_config_from_meta(meta, **runtime)
    abstract = abstract_params(config)
    if callable(shardings):
        shardings = shardings(config)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    params = checkpointer.restore(path, ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    return config, params, meta


def hf_to_orbax(hf_dir: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32") -> ModelConfig:
    """HF directory → Orbax params checkpoint (params stored in `dtype`; bf16 → fp32 is exact)."""
    config, params = hf_io.load(hf_dir, dtype=dtype)
    tokenizer = hf_dir if any(os.path.exists(os.path.join(hf_dir, f)) for f in hf_io.TOKENIZER_FILES) else None
    save_params(out, config, params, tokenizer_dir=tokenizer,
                generation_config=hf_io.read_generation_config(hf_dir))
    return config


def orbax_to_hf(ckpt: str | os.PathLike, out: str | os.PathLike, dtype: str = "bfloat16",
                max_shard_bytes: int = hf_io.DEFAULT_MAX_SHARD_BYTES) -> ModelConfig:
    """Orbax params checkpoint → HF directory (with the tokenizer it was converted from, if still there)."""
    config, params, meta = restore_params(ckpt)
    tokenizer = meta.get("tokenizer_dir")
    if tokenizer and not os.path.isdir(tokenizer):
        print(f"warning: tokenizer source {tokenizer} no longer exists; exporting without tokenizer files")
        tokenizer = None
    hf_io.save(config, params, out, dtype=dtype, max_shard_bytes=max_shard_bytes, tokenizer_dir=tokenizer,
               generation_config=meta.get("generation_config"))
    return config
