"""Hugging Face safetensors ⇄ mathgrpo params, through ONE name/layout table.

`HF_TABLE` maps every HF tensor name to our parameter path and says how the layouts differ.
Loading, saving and the vLLM weight sync all read it; nothing else knows HF names.

Layouts: HF stores a projection as [out, in]; we store it einsum-ready, e.g. q_proj [D, N, H] and
o_proj [N, H, D], stacked on a leading L axis for per-layer tensors. With `in_dims` leading input
axes, `ours = hf.T.reshape(our_shape)` and `hf = ours.reshape(prod(in), prod(out)).T`; tensors
without `in_dims` (embedding, norms) have the same layout on both sides.

Loading is memory-mapped and per device shard: `jax.make_array_from_callback` asks for each
shard, and the callback reads only the layers that shard covers, one HF tensor at a time, so a 4B
load never holds two full copies in host memory and never gathers on one device. The safetensors
format (8-byte header length, JSON header, raw little-endian data) is read and written here
directly so bf16 works through `ml_dtypes` without a framework.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np

from mathgrpo.config import ConfigError, ModelConfig
from mathgrpo.model import abstract_params
from mathgrpo.model.layers import dtype_name

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja",
)
# Buffers some exporters write that carry no parameters.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


# ---------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig.

QWEN3_REQUIRED_HF_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads",
)


def model_config_from_hf(hf: dict | str | os.PathLike, **runtime) -> ModelConfig:
    """Reads a HF Qwen3 `config.json` (a dict, the file, or its directory).

    Accepts both the classic layout (`rope_theta` at the top) and transformers 5's
    `rope_parameters`. Anything that is not a dense Qwen3 stops here with the reason.
    """
    if not isinstance(hf, dict):
        path = os.fspath(hf)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"{path}: no config.json (expected a Hugging Face model directory)")
        with open(path) as f:
            hf = json.load(f)
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if model_type != "qwen3" and "Qwen3ForCausalLM" not in architectures:
        raise ConfigError(
            f"not a dense Qwen3 config: model_type={model_type!r}, architectures={architectures}; "
            "expected model_type 'qwen3' (Qwen3ForCausalLM)"
        )
    missing = [k for k in QWEN3_REQUIRED_HF_KEYS if k not in hf]
    if missing:
        raise ConfigError(f"Qwen3 config.json lacks {missing}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={hf['hidden_act']!r}; Qwen3 uses 'silu'")
    if hf.get("attention_bias", False):
        raise ConfigError("attention_bias=true is not Qwen3 (its projections have no bias)")
    if hf.get("use_sliding_window", False):
        raise ConfigError("use_sliding_window=true is not supported (dense Qwen3 uses full attention)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = rope.get("rope_type", (scaling or {}).get("rope_type", "default"))
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise ConfigError(f"rope scaling {scaling or rope} is not supported; expected default RoPE")
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    eos = hf.get("eos_token_id")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        rope_theta=float(rope_theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        **runtime,
    )


def model_config_to_hf(config: ModelConfig, dtype: str = "bfloat16") -> dict:
    """A HF `config.json` dict for `Qwen3ForCausalLM` (classic layout, read by transformers 4 and 5)."""
    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": config.num_hidden_layers,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "use_cache": True,
        "torch_dtype": dtype,
    }


class HFFormatError(ValueError):
    """A HF directory that does not match the expected Qwen3 checkpoint; the message names the tensor or file."""


@dataclasses.dataclass(frozen=True)
class TensorRule:
    hf: str  # HF name; "{i}" stands for the layer index
    path: tuple[str, ...]  # our parameter path
    in_dims: int | None = None  # leading input axes of our kernel; None: same layout as HF

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


HF_TABLE: tuple[TensorRule, ...] = (
    TensorRule("model.embed_tokens.weight", ("embed_tokens", "embedding")),
    TensorRule("model.layers.{i}.input_layernorm.weight", ("layers", "input_layernorm", "weight")),
    TensorRule("model.layers.{i}.self_attn.q_proj.weight", ("layers", "self_attn", "q_proj", "kernel"), 1),
    TensorRule("model.layers.{i}.self_attn.k_proj.weight", ("layers", "self_attn", "k_proj", "kernel"), 1),
    TensorRule("model.layers.{i}.self_attn.v_proj.weight", ("layers", "self_attn", "v_proj", "kernel"), 1),
    TensorRule("model.layers.{i}.self_attn.o_proj.weight", ("layers", "self_attn", "o_proj", "kernel"), 2),
    TensorRule("model.layers.{i}.self_attn.q_norm.weight", ("layers", "self_attn", "q_norm", "weight")),
    TensorRule("model.layers.{i}.self_attn.k_norm.weight", ("layers", "self_attn", "k_norm", "weight")),
    TensorRule("model.layers.{i}.post_attention_layernorm.weight", ("layers", "post_attention_layernorm", "weight")),
    TensorRule("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate_proj", "kernel"), 1),
    TensorRule("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up_proj", "kernel"), 1),
    TensorRule("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down_proj", "kernel"), 1),
    TensorRule("model.norm.weight", ("norm", "weight")),
    TensorRule("lm_head.weight", ("lm_head", "kernel"), 1),
)


def rules_for(config: ModelConfig) -> tuple[TensorRule, ...]:
    """The table rows that exist for this config (a tied model has no lm_head)."""
    return tuple(r for r in HF_TABLE if not (r.path[0] == "lm_head" and config.tie_word_embeddings))


def to_hf_layout(rule: TensorRule, ours: np.ndarray) -> np.ndarray:
    """One tensor (one layer's slice for per-layer rules) from our layout to HF's."""
    if rule.in_dims is None:
        return ours
    rows = math.prod(ours.shape[: rule.in_dims])
    return ours.reshape(rows, -1).T


def from_hf_layout(rule: TensorRule, hf: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
    """One HF tensor to our layout (`our_shape` without the layer axis)."""
    if rule.in_dims is None:
        return hf.reshape(our_shape)
    return hf.T.reshape(our_shape)


def hf_shape(rule: TensorRule, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    if rule.in_dims is None:
        return tuple(our_shape)
    return (math.prod(our_shape[rule.in_dims:]), math.prod(our_shape[: rule.in_dims]))


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def expected_tensors(config: ModelConfig) -> dict[str, tuple[TensorRule, int | None, tuple[int, ...]]]:
    """HF name → (rule, layer index or None, HF shape), in the order they are written."""
    abstract = abstract_params(config)
    expected = {}
    for rule in rules_for(config):
        shape = _get(abstract, rule.path).shape
        if rule.per_layer:
            for i in range(config.num_hidden_layers):
                expected[rule.hf.format(i=i)] = (rule, i, hf_shape(rule, shape[1:]))
        else:
            expected[rule.hf] = (rule, None, hf_shape(rule, shape))
    return expected


# ---------------------------------------------------------------------------------------------------
# Reading safetensors (memory-mapped).


@dataclasses.dataclass(frozen=True)
class _Entry:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _read_header(path: str) -> dict[str, _Entry]:
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 2**20:
                raise HFFormatError(f"{path}: safetensors header of {length} bytes is not plausible")
            header = json.loads(f.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HFFormatError(f"{path}: not a readable safetensors file ({error})") from None
    size = os.path.getsize(path)
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise HFFormatError(f"{path}: tensor {name!r} has dtype {info['dtype']}; expected one of "
                                f"{sorted(SAFETENSORS_DTYPES)}")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = (8 + length + offset for offset in info["data_offsets"])
        shape = tuple(info["shape"])
        if end - start != math.prod(shape) * dtype.itemsize or end > size:
            raise HFFormatError(f"{path}: tensor {name!r} data offsets do not match its shape {shape}")
        entries[name] = _Entry(path, dtype, shape, start, end)
    return entries


class SafetensorsDir:
    """All tensors of a HF model directory (single file or sharded with an index), memory-mapped."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        index_path = os.path.join(self.directory, "model.safetensors.index.json")
        single = os.path.join(self.directory, "model.safetensors")
        self.entries: dict[str, _Entry] = {}
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not a mapping")
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise HFFormatError(f"{index_path}: broken index ({error}); expected JSON with a "
                                    "'weight_map' of tensor name → file") from None
            headers = {}
            for name, file in weight_map.items():
                path = os.path.join(self.directory, file)
                if file not in headers:
                    if not os.path.exists(path):
                        raise HFFormatError(f"{index_path}: tensor {name!r} is in {file!r}, which does not exist")
                    headers[file] = _read_header(path)
                if name not in headers[file]:
                    raise HFFormatError(f"{index_path}: tensor {name!r} is listed in {file!r} but that file lacks it")
                self.entries[name] = headers[file][name]
        elif os.path.exists(single):
            self.entries = _read_header(single)
        else:
            raise HFFormatError(f"{self.directory}: no model.safetensors or model.safetensors.index.json")
        self._maps: dict[str, np.memmap] = {}

    def read(self, name: str) -> np.ndarray:
        """One tensor as a read-only view of the memory-mapped file (no copy until used)."""
        entry = self.entries[name]
        if entry.file not in self._maps:
            self._maps[entry.file] = np.memmap(entry.file, dtype=np.uint8, mode="r")
        raw = self._maps[entry.file][entry.start: entry.end]
        return raw.view(entry.dtype).reshape(entry.shape)


def _check_tensors(source: SafetensorsDir, config: ModelConfig, expected: dict) -> None:
    present = {n for n in source.entries if not n.endswith(IGNORED_SUFFIXES)}
    missing = [n for n in expected if n not in present]
    extra = sorted(present - set(expected))
    if missing:
        raise HFFormatError(f"{source.directory}: missing tensor(s) {missing[:5]}"
                            f"{' and more' if len(missing) > 5 else ''} for the Qwen3 config in config.json")
    if extra:
        hint = " (the config says tie_word_embeddings=true)" if extra == ["lm_head.weight"] else ""
        raise HFFormatError(f"{source.directory}: unexpected tensor(s) {extra[:5]}{hint}; "
                            "they do not belong to the Qwen3 config in config.json")
    for name, (_, _, shape) in expected.items():
        if source.entries[name].shape != shape:
            raise HFFormatError(f"{source.directory}: tensor {name!r} has shape {source.entries[name].shape}, "
                                f"expected {shape} from config.json")


def stored_dtype(path: str | os.PathLike) -> str:
    """The floating dtype a HF directory's tensors are stored in ("bfloat16", "float32", ...)."""
    names = {entry.dtype.name for entry in SafetensorsDir(path).entries.values()
             if np.issubdtype(entry.dtype, np.floating) or entry.dtype == SAFETENSORS_DTYPES["BF16"]}
    if len(names) != 1:
        raise HFFormatError(f"{os.fspath(path)}: tensors stored in {sorted(names) or 'no floating dtype'}; "
                            "expected one floating dtype")
    return names.pop()


def placement(shardings: Any | Callable[[ModelConfig], Any] | None, config: ModelConfig, abstract: Any) -> Any:
    """The params' shardings: given, computed from the config, or (None) this process's first device."""
    if callable(shardings):
        shardings = shardings(config)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    return shardings


def load(path: str | os.PathLike, dtype: str = "float32",
         shardings: Any | Callable[[ModelConfig], Any] | None = None,
         **runtime) -> tuple[ModelConfig, Any]:
    """Loads a HF Qwen3 directory into (ModelConfig, params).

    Args:
      path: directory with config.json and model.safetensors (or shards + index); bf16 or fp32.
      dtype: the params' dtype (and `ModelConfig.param_dtype`), a name or a numpy / JAX dtype; fp32
        master weights by default.
      shardings: a pytree of `jax.sharding.Sharding` like the params, or a function of the config
        returning one; None puts everything on this process's first device.
      runtime: other ModelConfig runtime fields (compute_dtype, attention, ...).
    """
    dtype = dtype_name(dtype)
    config = model_config_from_hf(path, param_dtype=dtype, **runtime)
    source = SafetensorsDir(path)
    expected = expected_tensors(config)
    _check_tensors(source, config, expected)
    abstract = abstract_params(config)
    shardings = placement(shardings, config, abstract)
    target = np.dtype(dtype)
    params: dict = {}
    for rule in rules_for(config):
        shape = _get(abstract, rule.path).shape

        def read_shard(index, rule=rule, shape=shape):
            if not rule.per_layer:
                return from_hf_layout(rule, source.read(rule.hf), shape)[index].astype(target)
            layers = range(config.num_hidden_layers)[index[0]]
            out = np.empty((len(layers),) + tuple(
                len(range(n)[s]) for n, s in zip(shape[1:], index[1:])), target)
            for j, layer in enumerate(layers):
                tensor = from_hf_layout(rule, source.read(rule.hf.format(i=layer)), shape[1:])
                out[j] = tensor[index[1:]]
            return out

        array = jax.make_array_from_callback(shape, _get(shardings, rule.path), read_shard)
        _set(params, rule.path, array)
    return config, params


# ---------------------------------------------------------------------------------------------------
# Writing.


def _host(array: jax.Array) -> np.ndarray:
    """A (small) array on the host; gathers across processes when it is not fully addressable."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)


def hf_tensors(config: ModelConfig, params: Any, dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, HF-layout host array) one tensor at a time, in `expected_tensors` order.

    Per-layer tensors are sliced out of the stacked params one layer at a time, so the host never
    holds more than one tensor. `dtype` converts (e.g. "bfloat16"); None keeps the params' dtype.
    """
    for name, (rule, layer, _) in expected_tensors(config).items():
        leaf = _get(params, rule.path)
        tensor = _host(leaf[layer] if layer is not None else leaf)
        tensor = to_hf_layout(rule, tensor)
        yield name, np.ascontiguousarray(tensor.astype(np.dtype(dtype_name(dtype))) if dtype else tensor)


def _write_safetensors(path: str, names: list[str], shapes: dict, dtype: np.dtype,
                       tensors: Iterator[tuple[str, np.ndarray]]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        nbytes = math.prod(shapes[name]) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            tensor_name, tensor = next(tensors)
            assert tensor_name == name and tensor.shape == tuple(shapes[name]), (tensor_name, name)
            f.write(tensor.tobytes())


def default_generation_config(config: ModelConfig) -> dict:
    return {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}


def save(config: ModelConfig, params: Any, path: str | os.PathLike, *, dtype: str = "bfloat16",
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer_dir: str | os.PathLike | None = None,
         generation_config: dict | None = None) -> None:
    """Writes a HF directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Files: `model.safetensors` (or `model-0000k-of-0000n.safetensors` + index when over
    `max_shard_bytes`), `config.json`, `generation_config.json`, and the tokenizer files found in
    `tokenizer_dir`. A tied model stays tied (no lm_head.weight). Only process 0 writes; every
    process must call this (the gathers of sharded params are collective).
    """
    path = os.fspath(path)
    dtype = dtype_name(dtype)
    np_dtype = np.dtype(dtype)
    expected = expected_tensors(config)
    names = list(expected)
    shapes = {n: shape for n, (_, _, shape) in expected.items()}
    # Assign tensors to files in order, starting a new file when the size limit would be passed.
    files: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = math.prod(shapes[name]) * np_dtype.itemsize
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
    tensors = hf_tensors(config, params, dtype)
    if len(files) == 1:
        file_names = ["model.safetensors"]
    else:
        file_names = [f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))]
    for file_name, members in zip(file_names, files):
        if writer:
            _write_safetensors(os.path.join(path, file_name), members, shapes, np_dtype, tensors)
        else:
            for _ in members:  # take part in the gathers
                next(tensors)
    if not writer:
        return
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(math.prod(shapes[n]) * np_dtype.itemsize for n in names)},
            "weight_map": {n: f for f, members in zip(file_names, files) for n in members},
        }
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model_config_to_hf(config, dtype), f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(generation_config or default_generation_config(config), f, indent=2)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, path)


def copy_tokenizer(source: str | os.PathLike, destination: str | os.PathLike) -> list[str]:
    """Copies the tokenizer files present in `source`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        file = os.path.join(source, name)
        if os.path.exists(file):
            shutil.copyfile(file, os.path.join(destination, name))
            copied.append(name)
    return copied


def read_generation_config(path: str | os.PathLike) -> dict | None:
    file = os.path.join(path, "generation_config.json")
    if not os.path.exists(file):
        return None
    with open(file) as f:
        return json.load(f)
