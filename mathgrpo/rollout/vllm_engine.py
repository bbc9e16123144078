"""The vLLM rollout engine (GPU): one in-process `vllm.LLM` per JAX process and GPU, fed through hf_io's table.

Written against vLLM 0.33.0 (requirements-gpu.txt); `file:line` references are to that wheel's source.
`vllm` and `torch` are imported inside functions, so this module imports anywhere and its pure parts
(request building, output reading, the weight stream up to the DLPack handoff) are tested on CPU.

**Topology** (DESIGN "Rollout on GPU"). Each JAX process owns one GPU — the launcher gives it one
visible device (CUDA_VISIBLE_DEVICES), so vLLM's `cuda:0` is the process's GPU — and builds one engine
with tensor_parallel_size=1 and VLLM_ENABLE_V1_MULTIPROCESSING=0 (vllm/envs.py:1444). The engine core
then lives in this process (InprocClient, vllm/v1/engine/core_client.py:488) on the UniProcExecutor,
whose collective_rpc calls the worker directly (vllm/v1/executor/uniproc_executor.py:90-106): so
`llm.apply_model(f)` (vllm/entrypoints/llm.py:604, worker_base.py:165) runs `f(model)` here and tensors
pass by reference. vLLM gets a directory holding only `config.json` and `load_format="dummy"` (random
weights, replaced at once by `update_weights`), and `skip_tokenizer_init=True`: it sees token ids only.

**Memory.** Two allocators share each GPU: `environment_for(rollout)` gives JAX a fixed
`XLA_PYTHON_CLIENT_MEM_FRACTION = 1 - gpu_memory_utilization - margin` (preallocated, so JAX never
grows into vLLM's share) and vLLM takes `gpu_memory_utilization` of the total, which it requires to be
free when it starts (vllm/v1/worker/utils.py:761). The margin covers two CUDA contexts, NCCL and
library workspaces. Set the variables before JAX touches the GPU (`os.environ.update(...)` first thing).

**Log-probs** (rollout/base.py: log_softmax(logits / T) of the sampled token over the FULL vocabulary,
never renormalized by top-k/top-p; greedy gives the T = 1 value). vLLM's `logprobs_mode`
(vllm/config/model.py:291) offers two candidates:
- `raw_logprobs` (default): log_softmax of the raw logits, before temperature and top-k/top-p (V1
  sampler vllm/v1/sample/sampler.py:146-151; model runner V2 vllm/v1/worker/gpu/sample/sampler.py:170-186
  reads the unprocessed `logits`). Exact when T = 1 — with ANY top-k/top-p, since nothing was
  renormalized — and for greedy (T = 0 returns the T = 1 value, as ours does).
- `processed_logprobs`: log_softmax after temperature AND the top-k/top-p mask
  (vllm/v1/sample/ops/topk_topp_sampler.py:303-308), i.e. renormalized over the kept support: exact only
  when nothing is truncated (top_k off, top_p = 1), at any T (greedy rows skip the temperature:
  sampler.py:324-335, gpu/sample/gumbel.py:33).
The choice: the mode is fixed when the engine is built, from the TRAINING settings
(rollout.temperature/top_p/top_k): `raw_logprobs` when T is 0 or 1 (the recipe: T = 1, top_p = 1; its
validation T = 1, top_p = 0.95 is exact too), else `processed_logprobs` when nothing truncates, else an
error. Cost: nothing — no extra pass, and no sampler change: the processed modes rule out FlashInfer's
fused top-k/top-p sampler (topk_topp_sampler.py:242-250, gpu/sample/sampler.py:304-311), but so do the
explicit per-request seeds we send for reproducibility (topk_topp_sampler.py:326 falls back to
the native sampler with per-request generators; V2: `any_explicit_seed`), in either mode. A `generate`
call whose settings the mode cannot serve exactly (say an evaluation at T = 0.6, top_p = 0.95) gets NaN
log-probs and a warning, never biased numbers. We do not recompute them: vLLM's prompt log-probs are
always raw (vllm/v1/worker/gpu_model_runner.py:5321-5327), and full-vocabulary log-probs
(`logprobs=-1`) would move V floats per token to the host.

**Stop tokens.** Requests set `ignore_eos=True`, so vLLM neither stops on the tokenizer's EOS nor adds
generation_config's EOS ids to the stop list (vllm/sampling_params.py:781-802): `stop_token_ids` alone
end a response, as in the JAX sampler, and the scheduler records the token as `stop_reason`
(vllm/v1/core/sched/utils.py:109-112). With `detokenize=False` the output processor gives no tokenizer
to the detokenizer (vllm/v1/engine/output_processor.py:297), whose base class keeps every token id
(vllm/v1/engine/detokenizer.py:42-44); the tokenizer-backed one re-appends the stop token it skips when
detokenizing (detokenizer.py:128). So the stop token is in `token_ids` and its log-prob in `logprobs`;
`to_rollout_batch` still appends it, with its log-prob from the per-position log-probs, if a future
version drops it, and fails loudly when no log-prob exists for it (a made-up value would poison TIS).

**Weight sync** (`update_weights`, rollout.weight_sync):
- "dlpack": `torch_weights` walks hf_io's table (`expected_tensors` + `to_hf_layout`, no second table):
  per HF tensor, one jitted slice → bf16 cast → HF layout → all-gather to a replicated array,
  `block_until_ready` (XLA and torch use different streams), `torch.utils.dlpack.from_dlpack`, then
  `llm.apply_model(lambda m: m.load_weights([(name, tensor)]))` copies it into vLLM's fused parameters
  (vllm/model_executor/models/qwen3.py:346; q/k/v and gate/up fused by the mapper, qwen2.py:325-334).
  The tensor is dropped before the next one, so one tensor (plus its replica) is in flight. Every process
  must call it (the gathers are collective). Afterwards the loaded names must cover
  `model.named_parameters()`, the check vLLM's own loader makes (default_loader.py:531-571).
- "safetensors" (fallback): `hf_io.save` writes bf16 safetensors to a tmpfs directory (/dev/shm) shared
  by the node's processes (process 0 writes), then the worker's `update_config` switches `load_format`
  from "dummy" (whose loader cannot read files: dummy_loader.py has no `get_all_weights`, which
  reload/inplace.py:73-78 requires) to "safetensors" (gpu_worker.py:619-634), and
  `collective_rpc("reload_weights", kwargs={"weights_path": dir})` reloads in place
  (gpu_worker.py:636, gpu_model_runner.py:5226, model_loader/reload/inplace.py:32). One node only,
  unless `sync_dir` names a directory all processes share.
Both end with `reset_prefix_cache()`: cached KV blocks were computed by the old weights.

**Sleep** (`enable_sleep_mode=True`). Between rollouts the trainer needs the memory:
`sleep()` = `llm.sleep(level=2)` drops weights and KV cache (vllm/entrypoints/llm.py:839; level 2
because fresh weights come from the trainer anyway; it also clears the prefix cache, v1/engine/core.py:1007).
`update_weights` on a sleeping engine then runs `wake_up(["weights"])` → load →
`wake_up(["kv_cache"])` → `reset_prefix_cache()`: weights first so loading never competes with the KV
cache for memory; the scheduler resumes once everything is resident (core.py:1031-1056). `generate` on
a sleeping engine is an error: level 2 left no weights.
"""

from __future__ import annotations

import dataclasses
import functools
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

from mathgrpo import hf_io
from mathgrpo.config import ModelConfig, RolloutConfig
from mathgrpo.rollout.base import RolloutBatch, SamplingParams, check_prompts

MEMORY_MARGIN = 0.05  # of each GPU, for CUDA contexts, NCCL and library workspaces outside both pools
SYNC_DTYPE = "bfloat16"  # vLLM runs in bf16 (dtype="bfloat16"); weights are cast before the gather
VLLM_MIN_TEMPERATURE = 1e-2  # vLLM raises smaller positive temperatures to this (sampling_params.py:33, 560)
INSTALL_HINT = "pip install -r requirements-gpu.txt"


# ---------------------------------------------------------------------------------------------------
# Environment and availability.


def environment_for(rollout: RolloutConfig, margin: float = MEMORY_MARGIN) -> dict[str, str]:
    """The variables to set before JAX and vLLM start: one config value splits each GPU between them."""
    fraction = 1.0 - rollout.gpu_memory_utilization - margin
    if fraction <= 0:
        raise ValueError(f"rollout.gpu_memory_utilization={rollout.gpu_memory_utilization} leaves no memory for "
                         f"JAX after a {margin} margin; lower it")
    return {
        "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{fraction:.3f}",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "true",  # a fixed share: JAX never grows into vLLM's
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in this process: apply_model by reference
    }


def check_available() -> None:
    """Stops early, naming what is missing, when vLLM cannot run here (no CUDA GPU or no vLLM)."""
    problems = []
    if importlib.util.find_spec("vllm") is None:
        problems.append(f"vLLM is not installed ({INSTALL_HINT})")
    if jax.default_backend() != "gpu":
        problems.append(f"JAX runs on '{jax.default_backend()}', not a CUDA GPU (jax[cuda13], {INSTALL_HINT})")
    if importlib.util.find_spec("torch") is None:
        problems.append(f"torch is not installed ({INSTALL_HINT})")
    else:
        import torch

        if not torch.cuda.is_available():
            problems.append("torch sees no CUDA device")
    if problems:
        raise RuntimeError("rollout engine 'vllm' needs a CUDA GPU with vLLM 0.33.0: " + "; ".join(problems)
                           + ". Without one use the JAX sampler (rollout.engine=jax, --engine jax).")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# Log-prob mode (see the module docstring).


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
    (vllm/v1/engine/parallel_sampling.py:81), so equal seeds across prompts would correlate their noise."""
    words = np.random.SeedSequence(seed % 2**64).generate_state(2 * count, np.uint32).astype(np.int64)
    return [int(((high & 0x3FFFFFFF) << 32) | low) for high, low in zip(words[0::2], words[1::2])]


def build_sampling_params(params: SamplingParams, *, seed: int | None = None):
    """Our SamplingParams as a `vllm.SamplingParams` (vllm/sampling_params.py:271). Greedy requests
    have n=1 (vLLM refuses greedy n > 1, sampling_params.py:769): the caller repeats the prompt instead."""
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
        ignore_eos=True,  # only stop_token_ids stop a response (module docstring)
        seed=params.seed if seed is None else seed,
        logprobs=0,  # the sampled token's log-prob only
        flat_logprobs=True,  # a few flat lists per response instead of a dict per token (vllm/logprobs.py:32)
        detokenize=False,
    )


def build_prompts(prompts: Sequence[Sequence[int]], copies: int = 1) -> list:
    """`TokensPrompt`s (vllm/inputs/llm.py:111), each prompt `copies` times in a row (prompt-major)."""
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
    """vLLM's `RequestOutput`s (vllm/outputs.py:137), one per request in prompt order, as a RolloutBatch.

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
# The weight stream: hf_io's table, on device.


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
def _hf_tensor(rule: hf_io.TensorRule, dtype: str, replicated: NamedSharding, leaf: jax.Array,
               layer: jax.Array | None) -> jax.Array:
    """One HF tensor from a (sharded) params leaf: slice the layer, cast (so the gather moves bf16),
    HF layout, replicate. Compiled once per table row; the layer index is traced."""
    tensor = leaf if layer is None else jax.lax.dynamic_index_in_dim(leaf, layer, keepdims=False)
    tensor = hf_io.to_hf_layout(rule, tensor.astype(dtype))
    return jax.lax.with_sharding_constraint(tensor, replicated)


def hf_device_tensors(config: ModelConfig, params: Any, dtype: str = SYNC_DTYPE) -> Iterator[tuple[str, jax.Array]]:
    """`hf_io.hf_tensors` on device: (HF name, replicated HF-layout array) in `expected_tensors` order.

    The arrays stay on the devices (nothing goes through the host); every process gets a full copy.
    Collective across processes: all must iterate it to the end together.
    """
    for name, (rule, layer, shape) in hf_io.expected_tensors(config).items():
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
    """The `Rollout` protocol on an in-process vLLM engine (module docstring: topology, log-probs, sync)."""

    def __init__(self, config: ModelConfig, params: Any, *, max_length: int, rollout: RolloutConfig | None = None,
                 seed: int = 0, logprobs_mode: str | None = None, sync_dir: str | None = None,
                 enforce_eager: bool = False, max_num_seqs: int | None = None):
        """
        Args:
          max_length: most tokens (prompt + response) of a sequence: vLLM's max_model_len.
          rollout: gpu_memory_utilization, max_num_batched_tokens, weight_sync and the training
            sampling settings (which pick the log-prob mode); RolloutConfig() by default.
          seed: the engine's seed (requests carry their own, from SamplingParams.seed).
          logprobs_mode: override the mode chosen from the rollout settings.
          sync_dir: where the "safetensors" sync writes; default a directory in /dev/shm named by process 0.
          enforce_eager, max_num_seqs: passed to vLLM (eager skips CUDA-graph capture: faster start).
        """
        check_available()
        rollout = rollout or RolloutConfig()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import torch
        import vllm
        from vllm import envs as vllm_envs

        if vllm_envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            raise RuntimeError("VLLM_ENABLE_V1_MULTIPROCESSING must be 0: the engine must run in this process "
                               "(see environment_for)")
        expected = environment_for(rollout)
        for name in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE"):
            if os.environ.get(name) != expected[name]:
                _warn(f"{name}={os.environ.get(name)!r}, expected {expected[name]!r} for "
                      f"gpu_memory_utilization={rollout.gpu_memory_utilization}: set environment_for(rollout) "
                      "before JAX starts, or vLLM may find too little free memory")
        if torch.cuda.device_count() > 1:
            _warn(f"torch sees {torch.cuda.device_count()} GPUs; vLLM uses cuda:0. Give each process one GPU "
                  "(CUDA_VISIBLE_DEVICES) so every process's engine has its own")
        training = SamplingParams(temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                                  max_tokens=1)
        self.logprobs_mode = logprobs_mode or logprobs_mode_for(training)
        exact_logprobs(self.logprobs_mode, training)  # validates an override's name
        self.config = config
        self.max_length = max_length
        self.weight_sync = rollout.weight_sync
        self.sync_dir = sync_dir
        self._warned: set = set()
        self.model_dir = tempfile.mkdtemp(prefix="mathgrpo-vllm-", dir=_tmpfs())
        self._remove_model_dir = weakref.finalize(self, shutil.rmtree, self.model_dir, True)
        with open(os.path.join(self.model_dir, "config.json"), "w") as f:
            json.dump(config.to_hf(SYNC_DTYPE), f, indent=2)
        self.llm = vllm.LLM(
            model=self.model_dir,
            skip_tokenizer_init=True,  # token ids in and out
            tensor_parallel_size=1,
            distributed_executor_backend="uni",
            dtype=SYNC_DTYPE,
            load_format="dummy",
            enable_sleep_mode=True,
            gpu_memory_utilization=rollout.gpu_memory_utilization,
            max_num_batched_tokens=rollout.max_num_batched_tokens,
            max_model_len=max_length,
            seed=seed,
            logprobs_mode=self.logprobs_mode,
            generation_config="vllm",  # never let a generation_config.json change the sampling
            enforce_eager=enforce_eager,
            max_num_seqs=max_num_seqs,
        )
        self.update_weights(params)

    # -- Rollout protocol ----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"generate() takes a SamplingParams, got {type(params).__name__}")
        if self.llm.llm_engine.is_sleeping():
            raise RuntimeError("the vLLM engine is asleep (level 2: no weights); call update_weights first")
        M = params.max_tokens
        if M >= self.max_length:
            raise ValueError(f"max_tokens={M} leaves no room for a prompt in max_length={self.max_length}")
        prompts = check_prompts(prompts, vocab_size=self.config.vocab_size,
                                max_prompt_length=self.max_length - M, max_tokens=M)
        copies = params.n if params.greedy else 1
        requests = build_prompts(prompts, copies)
        sampling = [build_sampling_params(params, seed=s) for s in prompt_seeds(params.seed, len(requests))]
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
        asleep = self.llm.llm_engine.is_sleeping()
        if asleep:
            self.llm.wake_up(tags=["weights"])  # weights first: loading must not compete with the KV cache
        if self.weight_sync == "dlpack":
            self._load_dlpack(params)
        else:
            self._load_safetensors(params)
        if asleep:
            self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()  # cached blocks hold keys/values of the old weights

    def sleep(self) -> None:
        """Frees this engine's GPU memory (weights and KV cache: level 2) for training."""
        self.llm.sleep(level=2)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """vLLM's wake_up. After `sleep()` the weights are garbage until loaded: use update_weights."""
        self.llm.wake_up(tags=tags)

    def close(self) -> None:
        del self.llm
        self._remove_model_dir()

    # -- Weight sync ---------------------------------------------------------------------------------

    def _load_dlpack(self, params: Any) -> None:
        loaded: set[str] = set()
        for name, tensor in torch_weights(self.config, params):
            loaded |= self.llm.apply_model(functools.partial(_load_one, name=name, tensor=tensor))[0]
            del tensor  # free the replica before the next tensor
        expected = self.llm.apply_model(lambda model: {n for n, _ in model.named_parameters()})[0]
        missing = sorted(expected - loaded)
        if missing:
            raise RuntimeError(f"vLLM parameters not loaded by the sync: {missing[:5]}"
                               f"{' and more' if len(missing) > 5 else ''}")

    def _load_safetensors(self, params: Any) -> None:
        from jax.experimental import multihost_utils

        if self.sync_dir is None:  # one name for the node: process 0 writes, every engine reads
            owner = int(multihost_utils.broadcast_one_to_all(np.int32(os.getpid())))
            self.sync_dir = os.path.join(_tmpfs() or tempfile.gettempdir(), f"mathgrpo-weights-{owner}")
        # One file (no stale shards between syncs), then let the "dummy" engine read files.
        hf_io.save(self.config, params, self.sync_dir, dtype=SYNC_DTYPE, max_shard_bytes=_total_bytes(self.config) + 1)
        self.llm.collective_rpc("update_config", args=({"load_config": {"load_format": "safetensors"}},))
        multihost_utils.sync_global_devices("mathgrpo: safetensors written")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self.sync_dir})
        multihost_utils.sync_global_devices("mathgrpo: safetensors read")  # before anyone overwrites them


def _load_one(model: Any, *, name: str, tensor: Any) -> set[str]:
    """Runs inside the worker (apply_model): one HF tensor into vLLM's parameters; their names back."""
    return model.load_weights([(name, tensor)])


def _total_bytes(config: ModelConfig) -> int:
    """The bf16 size of all weights."""
    return sum(math.prod(shape) * 2 for _, _, shape in hf_io.expected_tensors(config).values())
