"""The JAX rollout engine: a jitted prefill, then a jitted `lax.while_loop` decode over an explicit state.

`JaxSampler.generate(prompts, params)`:
1. Repeats each prompt n times (prompt-major: rows i*n .. i*n+n-1 answer prompt i) and LEFT-pads them
   into a [B, P] batch, so every row's last prompt token sits in column P-1 and the KV cache writes
   the same slot for all rows. Padding has segment id 0 and is never attended.
2. Buckets the shapes so new prompt lengths don't recompile: P is the longest prompt rounded up to a
   power of two (or to a multiple of `prompt_bucket`), capped at `max_length - max_tokens`; B is the
   row count rounded up to a power of two and to a multiple of the mesh's batch shards. Extra rows are
   empty (segment 0), start `done` and are dropped. The cache holds S = P + max_tokens slots.
3. `prefill` runs the prompts through the model, writing the cache, and samples the first token.
4. `decode` loops one token at a time inside `lax.while_loop` until every row is done or max_tokens
   tokens exist. A row is done once it samples one of `stop_token_ids`; the stop token is kept and
   nothing after it is written (tokens 0, log-probs 0) or counted (`lengths`).

Compiled once per (model config, sampling settings without n and seed, B, P, mesh): the sampling
settings are static because they pick which filters are traced (see sampling.py) and set the buffer
width. `trace_counts` counts traces per function, so tests can prove a call did not recompile.

Log-probs follow rollout/base.py: log_softmax(logits / T) of the sampled token over the full vocab,
never renormalized by top-k/top-p (greedy: at T = 1).

Sharding: with a `mesh` (sharding.make_mesh's data/fsdp/tensor axes), the sampler uses training's
layout from sharding.py: its copy of the params has `param_shardings` under the same logical rules
(FSDP over "fsdp", heads/MLP/vocab over "tensor"), the KV cache has `cache_shardings` (batch over
data × fsdp, kv heads over tensor), and the prompts and every [B, ...] buffer of the state split their
batch over data × fsdp. `prefill` and `decode` are jitted with these as explicit in/out shardings and
traced with the mesh and rules active, so the model's activation constraints resolve as in the train
step. Without a mesh everything lives on the first device.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mathgrpo import sharding
from mathgrpo.config import ModelConfig
from mathgrpo.model import KVCache, abstract_params, forward, init_cache, output_kernel, positions_from_segments
from mathgrpo.rollout.base import RolloutBatch, SamplingParams, check_prompts
from mathgrpo.rollout.sampling import sample
from mathgrpo.train_step import MeshJit


@flax.struct.dataclass
class SamplingState:
    """Everything the decode loop carries. M = max_tokens; `step` new tokens exist in every row."""

    cache: KVCache  # k, v [L, B, S, K, H]
    last_token: jax.Array  # [B] int32, the token fed to the next step
    position: jax.Array  # [B] int32, its position in its sequence
    done: jax.Array  # [B] bool, row has sampled a stop token (or is batch padding)
    tokens: jax.Array  # [B, M] int32, generated tokens, 0 after a row is done
    logprobs: jax.Array  # [B, M] fp32, their log-probs, 0 after a row is done
    lengths: jax.Array  # [B] int32, tokens counted per row (the stop token included)
    rng: jax.Array  # [B] PRNG keys, one stream per row: (seed, prompt index, sample index); step t folds in t
    step: jax.Array  # [] int32, the column the next token goes to


# ---------------------------------------------------------------------------------------------------
# Pure functions (jitted by JaxSampler).


def _is_stop(tokens: jax.Array, stop_token_ids: tuple[int, ...]) -> jax.Array:
    if not stop_token_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(stop_token_ids, jnp.int32))


def state_shardings(mesh: Mesh) -> SamplingState:
    """Shardings of a SamplingState: the cache as sharding.cache_shardings, every other [B, ...]
    buffer split on its batch dimension over (data, fsdp) (the rows' keys too), the step replicated."""
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES))  # [B]
    columns = NamedSharding(mesh, P(sharding.BATCH_AXES, None))  # [B, M]
    return SamplingState(cache=sharding.cache_shardings(mesh), last_token=rows, position=rows, done=rows,
                         tokens=columns, logprobs=columns, lengths=rows, rng=rows,
                         step=sharding.replicated(mesh))


def _constrain(state: SamplingState, mesh: Mesh | None) -> SamplingState:
    """Pins the state to `state_shardings` (no-op without a mesh): inside the while_loop this keeps the
    carry in the layout the jit's in/out shardings expect."""
    if mesh is None:
        return state
    return jax.lax.with_sharding_constraint(state, state_shardings(mesh))


def row_keys(seed_key: jax.Array, row_ids: jax.Array) -> jax.Array:
    """[B] PRNG keys, row r's from (seed, prompt index, sample index) = (seed_key, *row_ids[r]): a row's
    samples never depend on the other rows of its batch, the batch size or the process that draws them."""
    return jax.vmap(lambda ids: jax.random.fold_in(jax.random.fold_in(seed_key, ids[0]), ids[1]))(row_ids)


def step_keys(keys: jax.Array, step: jax.Array) -> jax.Array:
    """The rows' keys for generated token `step`."""
    return jax.vmap(jax.random.fold_in, (0, None))(keys, step)


def prefill(config: ModelConfig, sampling: SamplingParams, mesh: Mesh | None, params: Any,
            prompt_tokens: jax.Array, prompt_segments: jax.Array, seed_key: jax.Array,
            row_ids: jax.Array) -> SamplingState:
    """Runs the left-padded prompts through the model into a fresh cache and samples token 0.

    Args:
      prompt_tokens, prompt_segments: [B, P] int32; segment 1 on prompt tokens, 0 on left padding.
        A row that is all padding is a batch-bucket filler: it starts done and counts no tokens.
      seed_key: the call's PRNG key (SamplingParams.seed); row_ids: [B, 2] int32 (global prompt index,
        sample index) of each row, which with it key the row's stream (`row_keys`).
    Returns: the state after one generated token (step = 1).
    """
    B, T = prompt_tokens.shape
    M = sampling.max_tokens
    with jax.named_scope("prefill"):
        cache = init_cache(config, B, T + M)  # the cache is born inside the jit: no host copy
        positions = positions_from_segments(prompt_segments)  # [B, T]
        hidden, cache = forward(config, params, prompt_tokens, positions, prompt_segments, cache,
                                return_hidden=True)  # [B, T, D]
        kernel = output_kernel(config, params)  # [D, V]: only the last position needs logits
        logits = jnp.dot(hidden[:, -1].astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)  # [B, V]
        keys = row_keys(seed_key, row_ids)  # [B]
        token, logprob = sample(step_keys(keys, jnp.zeros((), jnp.int32)), logits, sampling)  # [B], [B]
    real = prompt_segments[:, -1] != 0  # [B]
    state = SamplingState(
        cache=cache,
        last_token=token,
        position=positions[:, -1] + 1,
        done=~real | _is_stop(token, sampling.stop_token_ids),
        tokens=jnp.zeros((B, M), jnp.int32).at[:, 0].set(jnp.where(real, token, 0)),
        logprobs=jnp.zeros((B, M), jnp.float32).at[:, 0].set(jnp.where(real, logprob, 0.0)),
        lengths=real.astype(jnp.int32),
        rng=keys,
        step=jnp.ones((), jnp.int32),
    )
    return _constrain(state, mesh)


def decode(config: ModelConfig, sampling: SamplingParams, mesh: Mesh | None, params: Any,
           state: SamplingState) -> SamplingState:
    """Samples one token per row per iteration until all rows are done or max_tokens tokens exist."""

    def not_finished(state: SamplingState) -> jax.Array:
        return (state.step < sampling.max_tokens) & ~jnp.all(state.done)

    def one_token(state: SamplingState) -> SamplingState:
        tokens = state.last_token[:, None]  # [B, 1]
        # Finished rows keep computing (a while_loop step is the same for all rows) but write nothing.
        segments = jnp.ones_like(tokens)
        logits, cache = forward(config, params, tokens, state.position[:, None], segments, state.cache)
        token, logprob = sample(step_keys(state.rng, state.step), logits[:, 0], sampling)  # [B], [B]
        live = ~state.done  # [B]
        column = lambda buffer, value: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
            buffer, jnp.where(live, value, 0).astype(buffer.dtype)[:, None], state.step, axis=1)
        state = state.replace(
            cache=cache,
            last_token=token,
            position=state.position + 1,
            done=state.done | (live & _is_stop(token, sampling.stop_token_ids)),
            tokens=column(state.tokens, token),
            logprobs=column(state.logprobs, logprob),
            lengths=state.lengths + live.astype(jnp.int32),
            step=state.step + 1,
        )
        return _constrain(state, mesh)

    with jax.named_scope("decode"):
        return jax.lax.while_loop(not_finished, one_token, state)


# ---------------------------------------------------------------------------------------------------
# Shapes: buckets.


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def bucket(value: int, multiple: int | None = None, minimum: int = 1) -> int:
    """`value` rounded up to a power of two (multiple=None) or to a multiple of `multiple`, >= minimum."""
    value = max(value, minimum)
    if multiple is None:
        return 1 << (value - 1).bit_length()
    return round_up(value, multiple)


class JaxSampler:
    """The `Rollout` protocol on JAX: holds the params and the compiled prefill/decode.

    The object only holds the weights, the shape settings and the jit caches; every array of a call
    flows through the pure `prefill` / `decode` above.
    """

    def __init__(self, config: ModelConfig, params: Any, *, max_length: int, mesh: Mesh | None = None,
                 rules: Sequence = sharding.LOGICAL_RULES, prompt_bucket: int | None = None,
                 min_prompt_bucket: int = 16):
        """
        Args:
          max_length: most tokens (prompt + response) a row may hold; bounds the KV cache (vLLM's
            max_model_len). A prompt longer than `max_length - max_tokens` is refused.
          mesh: a (data, fsdp, tensor) mesh (sharding.make_mesh): params, cache and batch are sharded
            on it as in training (module docstring).
          rules: the logical-axis rules of the params and activations (sharding.logical_rules of the
            run's mesh config); unused without a mesh.
          prompt_bucket: pad prompts to a multiple of this; None pads to a power of two.
          min_prompt_bucket: smallest padded prompt length (short prompts share one compile).
        """
        if max_length < 2:
            raise ValueError(f"max_length={max_length}: need room for a prompt token and a new token")
        if prompt_bucket is not None and prompt_bucket < 1:
            raise ValueError(f"prompt_bucket={prompt_bucket}: expected a positive length or None")
        if mesh is not None:
            # jax.make_mesh defaults to Explicit axes, whose sharding-in-types rejects the model's
            # embedding gather; the sampler relies on GSPMD propagation, so use the same devices
            # under Auto axes.
            mesh = Mesh(mesh.devices, mesh.axis_names)
        self.config = config
        self.max_length = max_length
        self.mesh = mesh
        self.prompt_bucket = prompt_bucket
        self.min_prompt_bucket = min_prompt_bucket
        self.batch_shards = 1 if mesh is None else sharding.data_parallel_size(mesh)
        # None without a mesh; else NamedShardings of the params (checks head/width divisibility).
        self.param_shardings = None if mesh is None else sharding.param_shardings(config, mesh, rules)
        self.trace_counts: collections.Counter = collections.Counter()
        prefill_shardings, decode_shardings = {}, {}
        self.prompt_sharding = None if mesh is None else NamedSharding(mesh, P(sharding.BATCH_AXES, None))  # [B, P]
        if mesh is not None:
            prompts = self.prompt_sharding
            state = state_shardings(mesh)
            prefill_shardings = dict(in_shardings=(self.param_shardings, prompts, prompts, sharding.replicated(mesh),
                                                   prompts), out_shardings=state)
            decode_shardings = dict(in_shardings=(self.param_shardings, state), out_shardings=state)
        # config, sampling and mesh are static (hashable); the state is donated so the while_loop's
        # cache and buffers (the bulk of the sampler's memory) are updated in place, not copied.
        self._prefill = self._jit("prefill", prefill, rules, donate_argnums=(), **prefill_shardings)
        self._decode = self._jit("decode", decode, rules, donate_argnums=(4,), **decode_shardings)
        self.params = None
        self.update_weights(params)

    def _jit(self, name: str, function: Callable, rules: Sequence, **jit_kwargs) -> Callable:
        @functools.wraps(function)
        def traced(*args):
            self.trace_counts[name] += 1  # runs only while tracing: counts compiles, not calls
            return function(*args)

        return MeshJit(traced, self.mesh, rules, static_argnums=(0, 1, 2), **jit_kwargs)

    def sleep(self) -> None:
        """Nothing to release: the sampler allocates its cache per call and shares JAX's memory pool."""

    def update_weights(self, params: Any) -> None:
        """Swaps in new weights (same tree and shapes as the config's params); no recompile.

        With a mesh the sampler keeps its own copy in `param_shardings`, made on the devices.
        """
        expected = {jax.tree_util.keystr(path): leaf.shape
                    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(self.config))[0]}
        got = {jax.tree_util.keystr(path): tuple(np.shape(leaf))
               for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
        for name, shape in expected.items():
            if name not in got:
                raise ValueError(f"update_weights: params lack {name} (expected shape {shape})")
            if got[name] != tuple(shape):
                raise ValueError(f"update_weights: {name} has shape {got[name]}, expected {tuple(shape)}")
        extra = sorted(set(got) - set(expected))
        if extra:
            raise ValueError(f"update_weights: unexpected params {extra[:5]} for this model config")
        leaves = [leaf for leaf in jax.tree.leaves(params) if isinstance(leaf, jax.Array)]
        if self.mesh is None and any(not leaf.is_fully_addressable for leaf in leaves):
            # The trainer's params span other processes' devices: this process's own full copy.
            from jax.experimental import multihost_utils

            params = jax.device_put(multihost_utils.process_allgather(params, tiled=True), jax.local_devices()[0])
        elif self.mesh is not None:
            # A copy, not an alias: the trainer passes its params, which the next train step donates.
            # Params already in these shardings (training's) are copied shard by shard on the devices;
            # others are resharded (JAX may then alias a source shard that already sits in place).
            params = jax.device_put(params, self.param_shardings, may_alias=False)
        self.params = params

    def shapes(self, num_rows: int, longest_prompt: int, max_tokens: int) -> tuple[int, int]:
        """The bucketed (B, P) a call with these sizes compiles for."""
        prompt = min(bucket(longest_prompt, self.prompt_bucket, self.min_prompt_bucket), self.max_length - max_tokens)
        rows = round_up(bucket(num_rows), self.batch_shards)
        return rows, prompt

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 first_prompt: int = 0) -> RolloutBatch:
        """n responses to each prompt, prompt-major; `first_prompt` is the index of prompts[0] in the
        step's whole batch (rollout/base.py: samples are keyed by seed, prompt index and sample index)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"generate() takes a SamplingParams, got {type(params).__name__}")
        M = params.max_tokens
        if M >= self.max_length:
            raise ValueError(f"max_tokens={M} leaves no room for a prompt in max_length={self.max_length}")
        prompts = check_prompts(prompts, vocab_size=self.config.vocab_size,
                                max_prompt_length=self.max_length - M, max_tokens=M)
        rows = [prompt for prompt in prompts for _ in range(params.n)]  # prompt-major
        B, T = self.shapes(len(rows), max(map(len, prompts)), M)
        tokens = np.zeros((B, T), np.int32)  # [B, P]
        segments = np.zeros((B, T), np.int32)  # [B, P]
        for r, prompt in enumerate(rows):
            tokens[r, T - len(prompt):] = prompt
            segments[r, T - len(prompt):] = 1
        row_ids = np.zeros((B, 2), np.int32)  # (prompt index, sample index); filler rows draw nothing used
        row_ids[:len(rows), 0] = first_prompt + np.repeat(np.arange(len(prompts)), params.n)
        row_ids[:len(rows), 1] = np.tile(np.arange(params.n), len(prompts))
        seed_key = jax.random.key(params.seed)
        if self.mesh is not None:
            tokens, segments, row_ids = jax.device_put((tokens, segments, row_ids), self.prompt_sharding)
            seed_key = jax.device_put(seed_key, sharding.replicated(self.mesh))
        static = params.replace(n=1, seed=0)  # n and seed must not key the compile cache
        state = self._prefill(self.config, static, self.mesh, self.params, tokens, segments, seed_key, row_ids)
        if M > 1:
            state = self._decode(self.config, static, self.mesh, self.params, state)
        out_tokens, out_logprobs, lengths, done = jax.device_get(
            (state.tokens, state.logprobs, state.lengths, state.done))
        R = len(rows)
        width = int(lengths[:R].max())
        return RolloutBatch(
            prompt_index=np.repeat(np.arange(len(prompts), dtype=np.int32), params.n),
            token_ids=np.asarray(out_tokens[:R, :width], np.int32),
            logprobs=np.asarray(out_logprobs[:R, :width], np.float32),
            lengths=np.asarray(lengths[:R], np.int32),
            finish_reasons=tuple("stop" if d else "length" for d in done[:R]),
        )
