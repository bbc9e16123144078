"""The one way to load a policy: a HF directory (config.json) or an Orbax params checkpoint (meta/).

`train`, `sft`, `eval` and `generate` all call `load_policy`; it returns the model config, the params in
the requested dtype and shardings, the tokenizer directory and the generation config (or None).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, NamedTuple

import jax

from mathgrpo.config import ConfigError, ModelConfig, ModelSource, from_dict, read_yaml
from mathgrpo.weights import hf, orbax


def resolve_model_config(source: ModelSource) -> ModelConfig:
    """The ModelConfig: from the HF dir or checkpoint at `path`, else from `architecture`."""
    if os.path.exists(os.path.join(source.path, "config.json")):
        return hf.model_config_from_hf(source.path, **source.runtime())
    meta = os.path.join(source.path, "meta", "metadata")
    if os.path.exists(meta):
        with open(meta) as f:
            stored = json.load(f)
        return from_dict(ModelConfig, {**stored["model"], **source.runtime()}, prefix="model.")
    if source.architecture is not None:
        return from_dict(ModelConfig, {**read_yaml(source.architecture), **source.runtime()}, prefix="model.")
    raise ConfigError(f"model.path={source.path!r} has no config.json (HF) or meta/ (Orbax checkpoint), "
                      "and model.architecture is not set")


class Policy(NamedTuple):
    config: ModelConfig
    params: Any
    tokenizer_dir: str
    generation_config: dict | None


def load_policy(path: str | os.PathLike, *, dtype: str = "float32", tokenizer_dir: str | None = None,
                shardings: Any | Callable[[ModelConfig], Any] | None = None, **runtime) -> Policy:
    """The policy at `path`, its params in `dtype` placed by `shardings` (as in `hf.load`).

    The tokenizer is `tokenizer_dir`, else the HF directory itself, else the directory an Orbax
    checkpoint records. Raises FileNotFoundError naming what is missing: a path that is neither
    format, or no tokenizer anywhere.
    """
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        config, params = hf.load(path, dtype=dtype, shardings=shardings, **runtime)
        tokenizer_dir, generation_config = tokenizer_dir or path, hf.read_generation_config(path)
    elif os.path.isdir(os.path.join(path, "meta")):
        config, params, meta = orbax.restore_params(path, shardings=shardings, **runtime)
        if config.param_dtype != dtype:
            params = jax.tree.map(lambda leaf: leaf.astype(dtype), params)
            config = config.replace(param_dtype=dtype)
        tokenizer_dir, generation_config = tokenizer_dir or meta.get("tokenizer_dir"), meta.get("generation_config")
    else:
        raise FileNotFoundError(f"{path}: neither a HF model directory (no config.json) nor an Orbax params "
                                "checkpoint (no meta/)")
    if not tokenizer_dir:
        raise FileNotFoundError(f"{path}: the checkpoint records no tokenizer directory; pass one "
                                "(model.tokenizer in a config, --tokenizer on the command line)")
    return Policy(config, params, tokenizer_dir, generation_config)
