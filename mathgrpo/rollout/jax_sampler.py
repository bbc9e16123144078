"""The JAX rollout engine: jitted prefill and decode over an explicit state, as a static batch or as
continuous batching over a pool of KV slots.

Over ~500 lines on purpose: the host scheduler (queue, admission, tail shrink) and the device functions
it drives share their buffer layout; docs/sampler.md describes both.

**Static batch** (`max_slots=None`): every row of a call in one batch, decoded until the longest ends.
1. Repeats each prompt n times (prompt-major: rows i*n .. i*n+n-1 answer prompt i) and LEFT-pads them
   into a [B, P] batch, so every row's last prompt token sits in column P-1 and the KV cache writes
   the same slot for all rows. Padding has segment id 0 and is never attended.
2. Buckets the shapes so new prompt lengths don't recompile: P is the longest prompt rounded up to a
   power of two (or to a multiple of `prompt_bucket`), capped at `max_length - max_tokens`; B is the
   row count rounded up to a power of two and to a multiple of the mesh's batch shards. Extra rows are
   empty (segment 0), start `done` and are dropped. The cache holds S = P + max_tokens slots.
3. `prefill` runs the prompts through the model, writing the cache, and samples the first token.
4. `decode` loops one token at a time inside `lax.while_loop` until every row is done.

**Continuous batching** (`max_slots=N`): a pool of N rows ("slots"), each with S = P + max_tokens KV
slots, serves the call's requests (prompt i, sample j) through a host-side queue (docs/sampler.md):
1. `admit` prefills up to `width` prompts (right-padded to P), each once, samples the first token of
   each of their n samples and copies each prompt's KV into n free rows: the n samples share one
   prefill. A prompt waits until n rows are free.
2. `burst` decodes every row one token per step inside `lax.while_loop`, for at most `burst_steps`
   steps, and returns to the host early once `refill` rows are free for waiting prompts (`admission`).
   Each row writes its own KV slot (KVCache's per-row index: a request's prompt starts at slot 0
   whatever row it sits in).
3. Between bursts the host collects finished rows and admits waiting prompts. Once none wait, the live
   rows move to a smaller pool (`gather_rows`, `tail_widths`: 3/4, 1/2, ... down to an eighth of the
   rows) whenever they fit: the tail's decode steps cost what its live rows need. Shapes never change
   within a pool (N, P, S fixed) and the smaller pools are compiled ahead: rows coming and going
   never recompile.

Both paths: a row ends once it samples one of `stop_token_ids` (kept) or has its request's
`max_tokens` tokens; nothing after that is written (tokens 0, log-probs 0) or counted (`lengths`).

**Samples are keyed, not scheduled**: token t of sample j of prompt i is drawn with the key
fold_in(fold_in(fold_in(seed, i), j), t), whatever slot, burst or batch the row runs in, so the
static and continuous paths draw the same samples and a call's samples do not depend on the pool
size, the burst length or which rows finished first. What remains is floating point: XLA's CPU GEMMs
round a row the same at every batch size at the shapes the tests use, which makes the continuous
path's tokens and log-probs exact across pool sizes there; kernels that pick their reduction order by
batch size (cuBLAS on GPUs) can differ in the last bits, as vLLM does without its batch-invariant mode.

Compiled once per (model config, sampling settings without n and seed, shapes, mesh): the sampling
settings are static because they pick which filters are traced (see sampling.py) and set the buffer
width. `trace_counts` counts traces per function, so tests can prove a call did not recompile.

Log-probs follow rollout/base.py: log_softmax(logits / T) of the sampled token over the full vocab,
never renormalized by top-k/top-p (greedy: at T = 1).

Sharding: with a `mesh` (sharding.make_mesh's data/fsdp/tensor axes), the KV cache has
`cache_shardings` (batch over data × fsdp, kv heads over tensor) and the prompts and every [B, ...]
buffer of the state split their batch over data × fsdp. The sampler's copy of the weights (`hold`:
compute dtype) is, by default, whole on every batch shard and split over tensor only, as vLLM's replicas
hold theirs ("replicated", `weight_rules`); "sharded" keeps training's `param_shardings` (FSDP over
"fsdp"), and each decode step then all-gathers the weights it reads. The jitted functions take these as
explicit in/out shardings and are traced with the mesh and the sampler's rules active, so the model's
activation constraints resolve to the same layout. Without a mesh everything lives on the first device.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mathgrpo.config import ModelConfig
from mathgrpo.model import (
    KVCache,
    abstract_params,
    cpu_kernels,
    forward,
    init_cache,
    positions_from_segments,
    unstack_layers,
    write_prompts,
)
from mathgrpo.model.layers import cast_sharded, target_platform
from mathgrpo.parallel import mesh as parallel_mesh
from mathgrpo.parallel import shardings as parallel_shardings
from mathgrpo.parallel.mesh import MeshJit
from mathgrpo.rollout.base import RolloutBatch, SamplingParams, check_max_tokens, check_prompts
from mathgrpo.rollout.sampling import sample


@flax.struct.dataclass
class SamplingState:
    """Everything the decode loop carries. M = the call's max_tokens."""

    cache: KVCache  # k [L, B, K, H, S], v [L, B, K, S, H], or per layer; index [] (static) or [B] (pool: = position)
    last_token: jax.Array  # [B] int32, the token fed to the next step
    position: jax.Array  # [B] int32, its position in its sequence
    done: jax.Array  # [B] bool, row has ended (or is padding / a free slot)
    tokens: jax.Array  # [B, M] int32, generated tokens, 0 after a row is done
    logprobs: jax.Array  # [B, M] fp32, their log-probs, 0 after a row is done
    lengths: jax.Array  # [B] int32, tokens counted per row (the stop token included)
    rng: jax.Array  # [B] PRNG keys, one stream per row: (seed, prompt index, sample index); token t folds in t
    limit: jax.Array  # [B] int32, the row's own max_tokens (<= M)
    shift: jax.Array  # [B] fp32, the row's last draw's log-normalizer: its next draw's shift (sampling.categorical)
    step: jax.Array  # [] int32, decode steps taken in this loop


# ---------------------------------------------------------------------------------------------------
# Pure functions (jitted by JaxSampler).


def _is_stop(tokens: jax.Array, stop_token_ids: tuple[int, ...]) -> jax.Array:
    if not stop_token_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(stop_token_ids, jnp.int32))


def state_shardings(mesh: Mesh, per_row_index: bool = False, layers: int | None = None) -> SamplingState:
    """Shardings of a SamplingState: the cache as sharding.cache_shardings (per layer when `layers` is
    given; its index split like the rows in a pool), every other [B, ...] buffer split on its batch
    dimension over (data, fsdp) (the rows' keys too), the step replicated."""
    rows = NamedSharding(mesh, P(parallel_mesh.BATCH_AXES))  # [B]
    columns = NamedSharding(mesh, P(parallel_mesh.BATCH_AXES, None))  # [B, M]
    cache = parallel_shardings.cache_shardings(mesh, layers)
    if per_row_index:
        cache = cache.replace(index=rows)
    return SamplingState(cache=cache, last_token=rows, position=rows, done=rows, tokens=columns,
                         logprobs=columns, lengths=rows, rng=rows, limit=rows, shift=rows,
                         step=parallel_shardings.replicated(mesh))


def _constrain(state: SamplingState, mesh: Mesh | None) -> SamplingState:
    """Pins the state to `state_shardings` (no-op without a mesh): inside the while_loop this keeps the
    carry in the layout the jit's in/out shardings expect."""
    if mesh is None:
        return state
    layers = len(state.cache.k) if state.cache.per_layer else None
    return jax.lax.with_sharding_constraint(state, state_shardings(mesh, state.cache.index.ndim == 1, layers))


def row_keys(seed_key: jax.Array, row_ids: jax.Array) -> jax.Array:
    """[B] PRNG keys, row r's from (seed, prompt index, sample index) = (seed_key, *row_ids[r]): a row's
    samples never depend on the other rows of its batch, the batch size or the process that draws them."""
    return jax.vmap(lambda ids: jax.random.fold_in(jax.random.fold_in(seed_key, ids[0]), ids[1]))(row_ids)


def step_keys(keys: jax.Array, step: jax.Array) -> jax.Array:
    """The rows' keys for generated token `step` ([] for all rows, or [B]: each row's own token index)."""
    return jax.vmap(jax.random.fold_in, (0, 0 if jnp.ndim(step) else None))(keys, step)


def per_layer_cache(mesh: Mesh | None, per_layer_weights: bool) -> bool:
    """Whether the sampler's KV caches are per layer (`init_cache(per_layer=True)`): beside per-layer
    weights (`holds_per_layer_weights`), on CPU, where a decode step then reads a short cache in one
    pass where it lies (`layers.decode_block_size`: the bench's 64-row step 52 -> 47 ms). GPUs keep the
    stacked cache: nothing was measured to gain there, and per layer XLA:GPU's admission held 1.6 GB
    more temporaries at the 4B training rollout's shapes (plan, 8 described H100s; BENCHMARKS.md,
    session 17)."""
    return per_layer_weights and target_platform(mesh) == "cpu"


def head_rows(config: ModelConfig, held: Any) -> Any:
    """The LM head of the sampler's copy (`hold`) as [V, D] rows: the embedding where it is tied, else
    the held `lm_head` `rows` (the kernel transposed once by `vocab_major`)."""
    return held["embed_tokens"]["embedding"] if config.tie_word_embeddings else held["lm_head"]["rows"]


def vocab_logits(config: ModelConfig, held: Any, hidden: jax.Array, mesh: Mesh | None = None) -> jax.Array:
    """fp32 logits [V, B] (vocab-major, as `sampling.sample` takes them) of final hidden states [B, D]:
    the head's rows as the left operand, W [V, D] · hᵀ (rollout/sampling.py says why).

    On one CPU device with fp32 compute the product is `cpu_kernels.rows_dot` where the machine can run
    it (AVX-512F): ~0.7 of the time of XLA:CPU's GEMM on this shape (model/cpu_kernels.py). Elsewhere
    XLA's dot; there one row is computed as two (a zero row beside it): XLA:CPU runs a [V, D] · [D, 1]
    product as a matrix-vector kernel that rounds differently from its GEMM, and a row's samples must not
    depend on how many rows share its step (an admission of one prompt, a pool of one row). The kernel's
    columns are independent by construction."""
    compute = jnp.dtype(config.compute_dtype)
    rows = cast_sharded(head_rows(config, held), compute, ("vocab", "embed"))
    hidden = hidden.astype(compute)
    columns = hidden.shape[0]
    if (compute == jnp.float32 and (mesh is None or mesh.size == 1) and target_platform(mesh) == "cpu"
            and cpu_kernels.rows_dot_available()):
        logits = cpu_kernels.rows_dot(rows, hidden)
    else:
        hidden = jnp.pad(hidden, ((0, 1), (0, 0))) if columns == 1 else hidden
        logits = jax.lax.dot_general(rows, hidden, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)[:, :columns]
    return flax.linen.with_logical_constraint(logits, ("vocab", "batch"))


def prefill(config: ModelConfig, sampling: SamplingParams, mesh: Mesh | None, params: Any,
            prompt_tokens: jax.Array, prompt_segments: jax.Array, seed_key: jax.Array,
            row_ids: jax.Array, limits: jax.Array, source: jax.Array) -> SamplingState:
    """Static batch: runs each distinct left-padded prompt through the model once, copies its cache and
    its last position's logits into the rows that sample it, and samples token 0 of every row.

    Args:
      prompt_tokens, prompt_segments: [U, P] int32, the distinct prompts; segment 1 on prompt tokens, 0
        on left padding.
      seed_key: the call's PRNG key (SamplingParams.seed); row_ids: [B, 2] int32 (global prompt index,
        sample index) of each row, which with it key the row's stream (`row_keys`).
      limits: [B] int32, each row's max_tokens (<= sampling.max_tokens).
      source: [B] int32, the prompt row each row samples (its n samples share the prompt's prefill, as
        the continuous path's admissions do); -1: a batch-bucket filler, which starts done and counts no
        tokens.
    Returns: the state after one generated token (step = 1).
    """
    T = prompt_tokens.shape[1]
    B = source.shape[0]
    M = sampling.max_tokens
    with jax.named_scope("prefill"):
        # Born inside the jit (no host copy); per layer as `per_layer_cache` says.
        cache = init_cache(config, prompt_tokens.shape[0], T + M,
                           per_layer_cache(mesh, isinstance(params["layers"], tuple)))
        positions = positions_from_segments(prompt_segments)  # [U, T]
        hidden, cache = forward(config, params, prompt_tokens, positions, prompt_segments, cache,
                                return_hidden=True)  # [U, T, D]
        logits = vocab_logits(config, params, hidden[:, -1], mesh)  # [V, U]: one head pass per prompt
        rows = jnp.maximum(source, 0)  # [B]
        cache, logits = take_cache_rows(cache, rows), jnp.take(logits, rows, axis=1)  # B rows, [V, B]
        keys = row_keys(seed_key, row_ids)  # [B]
        token, logprob, shift = sample(step_keys(keys, jnp.zeros((), jnp.int32)), logits, sampling)  # [B] each
    real = source >= 0  # [B]: a real prompt's last (left-padded) position is a prompt token
    state = SamplingState(
        cache=cache,
        last_token=token,
        position=positions[rows, -1] + 1,
        done=~real | _is_stop(token, sampling.stop_token_ids) | (limits <= 1),
        tokens=jnp.zeros((B, M), jnp.int32).at[:, 0].set(jnp.where(real, token, 0)),
        logprobs=jnp.zeros((B, M), jnp.float32).at[:, 0].set(jnp.where(real, logprob, 0.0)),
        lengths=real.astype(jnp.int32),
        rng=keys,
        limit=limits,
        shift=shift,
        step=jnp.ones((), jnp.int32),
    )
    return _constrain(state, mesh)


def _one_token(config: ModelConfig, sampling: SamplingParams, mesh: Mesh | None, params: Any,
               state: SamplingState) -> SamplingState:
    """One decode step for every row: feed `last_token`, sample the next. Done rows compute too (a
    step is the same for all rows) but record nothing; token t of a row goes to its column t and is
    drawn with its key folded with t."""
    tokens = state.last_token[:, None]  # [B, 1]
    cache = state.cache
    if cache.index.ndim == 1:  # a pool: each row writes the slot of its own position
        cache = cache.replace(index=state.position)
    segments = jnp.ones_like(tokens)
    hidden, cache = forward(config, params, tokens, state.position[:, None], segments, cache, return_hidden=True)
    logits = vocab_logits(config, params, hidden[:, 0], mesh)  # [V, B]
    # Every row carries its own shift, done rows too (they repeat one step, so theirs stays valid).
    token, logprob, shift = sample(step_keys(state.rng, state.lengths), logits, sampling, state.shift)  # [B] each
    live = ~state.done  # [B]
    rows = jnp.arange(token.shape[0])
    column = lambda buffer, value: buffer.at[rows, state.lengths].set(  # noqa: E731 (a full row: dropped)
        jnp.where(live, value, 0).astype(buffer.dtype), mode="drop")
    lengths = state.lengths + live.astype(jnp.int32)
    state = state.replace(
        cache=cache,
        last_token=token,
        position=state.position + live.astype(jnp.int32),
        done=state.done | (live & (_is_stop(token, sampling.stop_token_ids) | (lengths >= state.limit))),
        tokens=column(state.tokens, token),
        logprobs=column(state.logprobs, logprob),
        lengths=lengths,
        shift=shift,
        step=state.step + 1,
    )
    return _constrain(state, mesh)


def decode(config: ModelConfig, sampling: SamplingParams, mesh: Mesh | None, params: Any,
           state: SamplingState) -> SamplingState:
    """Static batch: samples one token per row per iteration until all rows are done."""

    def not_finished(state: SamplingState) -> jax.Array:
        return (state.step < sampling.max_tokens) & ~jnp.all(state.done)

    with jax.named_scope("decode"):
        return jax.lax.while_loop(not_finished, functools.partial(_one_token, config, sampling, mesh, params), state)


def empty_pool(config: ModelConfig, sampling: SamplingParams, mesh: Mesh | None, slots: int,
               length: int, per_layer: bool) -> SamplingState:
    """A pool of `slots` free rows of `length` KV slots each (M = sampling.max_tokens columns), its
    cache per layer if `per_layer` (`per_layer_cache`)."""
    M = sampling.max_tokens
    cache = init_cache(config, slots, length, per_layer)
    rows = jnp.zeros((slots,), jnp.int32)
    state = SamplingState(
        cache=cache.replace(index=rows), last_token=rows, position=rows, done=jnp.ones((slots,), bool),
        tokens=jnp.zeros((slots, M), jnp.int32), logprobs=jnp.zeros((slots, M), jnp.float32), lengths=rows,
        rng=jax.random.split(jax.random.key(0), slots), limit=rows, shift=jnp.zeros((slots,), jnp.float32),
        step=jnp.zeros((), jnp.int32))
    return _constrain(state, mesh)


def admit(config: ModelConfig, sampling: SamplingParams, mesh: Mesh | None, params: Any, state: SamplingState,
          prompt_tokens: jax.Array, prompt_lengths: jax.Array, slots: jax.Array, seed_key: jax.Array,
          row_ids: jax.Array, limits: jax.Array) -> SamplingState:
    """Continuous batching: prefills A prompts once each and starts each one's n samples in pool rows.

    Args:
      prompt_tokens: [A, P] int32 prompts, right-padded; prompt_lengths: [A] int32, 0 for a padding
        prompt (nothing of it is written).
      slots: [A, n] int32 free pool rows for each prompt's samples (the pool size for a padding prompt);
        row_ids: [A, n, 2] (prompt index, sample index) keying each sample's stream; limits: [A] int32,
        each request's max_tokens.
    Returns: the pool with those rows holding their prompt's KV in slots 0..length-1 and one new token.
    """
    A, T = prompt_tokens.shape
    n = slots.shape[1]
    S = state.cache.max_length
    with jax.named_scope("admit"):
        segments = (jnp.arange(T)[None, :] < prompt_lengths[:, None]).astype(jnp.int32)  # [A, P]
        positions = jnp.where(segments != 0, jnp.arange(T, dtype=jnp.int32), 0)
        hidden, prompt_cache = forward(config, params, prompt_tokens, positions, segments,
                                       init_cache(config, A, T, state.cache.per_layer), return_hidden=True)
        last = jnp.take_along_axis(hidden, jnp.maximum(prompt_lengths - 1, 0)[:, None, None], axis=1)[:, 0]
        logits = jnp.repeat(vocab_logits(config, params, last, mesh), n, axis=1)  # [V, A·n]: one head pass per prompt
        keys = row_keys(seed_key, row_ids.reshape(A * n, 2))  # [A·n]
        token, logprob, shift = sample(step_keys(keys, jnp.zeros((), jnp.int32)), logits, sampling)  # [A·n] each
    rows = slots.reshape(A * n)
    pool_k, pool_v = write_prompts(state.cache.k, state.cache.v, prompt_cache.k, prompt_cache.v, rows, n)
    segment_rows = jnp.pad(jnp.repeat(segments, n, axis=0), ((0, 0), (0, S - T)))  # clears a previous request's
    lengths = jnp.repeat(prompt_lengths, n)
    limit = jnp.repeat(limits, n)
    put = lambda buffer, value: buffer.at[rows].set(value, mode="drop")  # noqa: E731 (padding rows: dropped)
    state = state.replace(
        cache=state.cache.replace(k=pool_k, v=pool_v, segment_ids=put(state.cache.segment_ids, segment_rows),
                                  index=put(state.cache.index, lengths)),
        last_token=put(state.last_token, token),
        position=put(state.position, lengths),
        done=put(state.done, _is_stop(token, sampling.stop_token_ids) | (limit <= 1)),
        tokens=put(state.tokens, jnp.zeros((A * n,) + state.tokens.shape[1:], jnp.int32).at[:, 0].set(token)),
        logprobs=put(state.logprobs, jnp.zeros((A * n,) + state.logprobs.shape[1:], jnp.float32).at[:, 0].set(logprob)),
        lengths=put(state.lengths, jnp.ones((A * n,), jnp.int32)),
        rng=put(state.rng, keys),
        limit=put(state.limit, limit),
        shift=put(state.shift, shift),
    )
    return _constrain(state, mesh)


def burst(config: ModelConfig, sampling: SamplingParams, mesh: Mesh | None, params: Any, state: SamplingState,
          max_steps: jax.Array, wake_free: jax.Array) -> SamplingState:
    """Continuous batching: decode steps over the whole pool until `max_steps` steps ran, or at least
    `wake_free` rows are done (free for the next prompt; pass the pool size to run until all are done)."""

    def go_on(state: SamplingState) -> jax.Array:
        return (state.step < max_steps) & (jnp.sum(state.done) < wake_free)

    with jax.named_scope("burst"):
        state = state.replace(step=jnp.zeros((), jnp.int32))
        return jax.lax.while_loop(go_on, functools.partial(_one_token, config, sampling, mesh, params), state)


def gather_rows(config: ModelConfig, sampling: SamplingParams, mesh: Mesh | None, state: SamplingState,
                rows: jax.Array) -> SamplingState:
    """Continuous batching's tail: the pool rows `rows` ([W] indices) as a pool of W rows. Once no
    prompt waits, the live rows move to a smaller pool whose decode steps cost less."""
    del config, sampling
    state = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), state.replace(cache=None, step=None)).replace(
        cache=take_cache_rows(state.cache, rows), step=state.step)
    return _constrain(state, mesh)


def take_cache_rows(cache: KVCache, rows: jax.Array) -> KVCache:
    """The cache's rows `rows` ([W] indices, repeats allowed) as a cache of W rows; a per-row `index` is
    taken too, one slot for all rows kept."""
    take = lambda x: jnp.take(x, rows, axis=0)  # noqa: E731
    take_kv = (lambda x: tuple(map(take, x))) if cache.per_layer else (lambda x: jnp.take(x, rows, axis=1))  # noqa: E731
    return cache.replace(k=take_kv(cache.k), v=take_kv(cache.v), segment_ids=take(cache.segment_ids),
                         index=cache.index if cache.index.ndim == 0 else take(cache.index))


FUNCTIONS = {"prefill": prefill, "decode": decode, "empty_pool": empty_pool, "admit": admit, "burst": burst,
             "gather_rows": gather_rows}


def abstract_pool(config: ModelConfig, sampling: SamplingParams, mesh: Mesh | None, rows: int,
                  length: int, per_layer: bool) -> SamplingState:
    """`empty_pool`'s shapes and dtypes, in the pool's shardings on `mesh` (None: unsharded), traced
    under the mesh so that its KV storage dtype is its devices' (`layers.kv_storage_dtype`: `plan`
    describes GPUs from a CPU process)."""
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        state = jax.eval_shape(lambda: empty_pool(config, sampling, None, rows, length, per_layer))
    if mesh is None:
        return state
    layers = config.num_hidden_layers if per_layer else None
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                        state_shardings(mesh, per_row_index=True, layers=layers))


WEIGHTS = ("replicated", "sharded")  # rollout.sampler_weights


def weight_rules(rules: Sequence, weights: str) -> tuple:
    """The sampler's logical-axis rules for its `weights` layout.

    "replicated": each batch shard (data × fsdp) holds the whole model, split over tensor only — vLLM's
    layout in the recipe (TP = 1, one replica per GPU): training's `rules` with the batch mesh axes taken
    off every logical axis but "batch". A decode step then reads its weights from its own memory. Under
    training's fsdp shardings ("sharded") every decode step all-gathers every layer's weights and the LM
    head: ~7 GB received per device per step for Qwen3-4B on 8 H100s, against one local read
    (BENCHMARKS.md, session 16). "sharded": training's rules, 1/fsdp of the memory.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"sampler weights {weights!r}; expected one of {WEIGHTS}")
    if weights == "sharded":
        return tuple(rules)

    def off_batch(target):
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        kept = tuple(axis for axis in axes if axis not in parallel_mesh.BATCH_AXES)
        return kept[0] if len(kept) == 1 else (kept or None)

    return tuple((name, target if name == "batch" else off_batch(target)) for name, target in rules)


def holds_per_layer_weights(mesh: Mesh | None, weights: str = "replicated") -> bool:
    """Whether the sampler keeps its weights per layer (`unstack_layers`): unless they are sharded over
    fsdp (`weights="sharded"` on a mesh with fsdp > 1). Read from a stack, each layer's weights are
    copied at every decode step (XLA:GPU: a device-to-device memcpy per weight); but FSDP shards gathered
    per layer inside the layer scan become, per layer, loop invariants of the decode loop, and compilers
    hoist or prefetch their all-gathers: the 4B recipe's burst (fsdp8) peaked at 20.0 GiB with 2 rows per
    device on XLA:CPU (7.6 GiB at 3 rows stacked) and 2.9 GB higher on XLA:GPU (BENCHMARKS.md, session 15)."""
    return mesh is None or weights == "replicated" or mesh.shape.get("fsdp", 1) == 1


def narrow(config: ModelConfig, params: Any) -> Any:
    """Every weight in the narrower of its dtype and the compute dtype. The forward casts each weight to
    the compute dtype where it uses it (`cast_sharded`, the embedding lookup, the norms' scales), so
    narrowed weights compute bit for bit what `params` do; with fp32 master weights and bf16 compute
    they are half the bytes, and a decode step reads half, as vLLM holds its bf16 weights. Works on
    arrays and ShapeDtypeStructs."""
    compute = jnp.dtype(config.compute_dtype)

    def leaf_narrowed(leaf):
        if compute.itemsize >= jnp.dtype(leaf.dtype).itemsize:
            return leaf
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, compute, sharding=leaf.sharding)
        return leaf.astype(compute)

    return jax.tree.map(leaf_narrowed, params)


def vocab_major(config: ModelConfig, tree: Any) -> Any:
    """The sampler's layout of the LM head in a params-shaped tree (arrays, ShapeDtypeStructs or
    NamedShardings): an untied head's `lm_head` `kernel` [D, V] becomes `rows` [V, D], transposed once
    per weight update, which `vocab_logits` uses as the left operand; a tied head is the embedding
    [V, D] already. The forward never reads the held head (the sampler asks it for hidden states)."""
    if config.tie_word_embeddings:
        return tree

    def transposed(leaf):
        if isinstance(leaf, NamedSharding):
            spec = tuple(leaf.spec) + (None,) * (2 - len(leaf.spec))
            return NamedSharding(leaf.mesh, P(*spec[::-1]))
        if isinstance(leaf, jax.ShapeDtypeStruct):
            sharding = transposed(leaf.sharding) if isinstance(leaf.sharding, NamedSharding) else None
            return jax.ShapeDtypeStruct(leaf.shape[::-1], leaf.dtype, sharding=sharding)
        return leaf.T

    return {**tree, "lm_head": {"rows": transposed(tree["lm_head"]["kernel"])}}


def hold(config: ModelConfig, per_layer: bool, params: Any) -> Any:
    """The sampler's copy of `params`: `narrow`ed, the LM head `vocab_major`, per layer where
    `per_layer` (`holds_per_layer_weights`). Works on arrays and ShapeDtypeStructs."""
    params = vocab_major(config, narrow(config, params))
    return unstack_layers(config, params) if per_layer else params


def held_shardings(config: ModelConfig, mesh: Mesh, rules: Sequence, weights: str) -> Any:
    """NamedShardings of the sampler's copy (`hold`) on `mesh`: the params' under `weight_rules`, the
    LM head `vocab_major`, per layer where `holds_per_layer_weights`."""
    shardings = vocab_major(config, parallel_shardings.param_shardings(config, mesh, weight_rules(rules, weights)))
    return unstack_layers(config, shardings) if holds_per_layer_weights(mesh, weights) else shardings


def abstract_held_params(config: ModelConfig, mesh: Mesh | None, rules: Sequence, weights: str) -> Any:
    """ShapeDtypeStructs of the sampler's copy of the params, in `held_shardings` on a mesh (`plan`)."""
    per_layer = holds_per_layer_weights(mesh, weights)
    held = hold(config, per_layer, abstract_params(config))
    if mesh is None:
        return held
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), held,
                        held_shardings(config, mesh, rules, weights))


def jit_shardings(mesh: Mesh | None, param_shardings: Any) -> dict[str, dict]:
    """`jax.jit` arguments of each function above: its static arguments, the state it donates (updated in
    place: the cache and buffers are the bulk of the sampler's memory) and, on a mesh, its in/out
    shardings. `plan` compiles the sampler's functions with these too."""
    kwargs = {name: dict(static_argnums=(0, 1, 2), donate_argnums=(4,)) for name in FUNCTIONS}
    kwargs["prefill"]["donate_argnums"] = ()
    kwargs["empty_pool"] = dict(static_argnums=(0, 1, 2, 3, 4, 5))
    kwargs["gather_rows"]["donate_argnums"] = ()
    if mesh is None:
        return kwargs
    prompts, one = NamedSharding(mesh, P(parallel_mesh.BATCH_AXES, None)), parallel_shardings.replicated(mesh)
    rows = NamedSharding(mesh, P(parallel_mesh.BATCH_AXES))
    held = param_shardings["layers"]
    layers = len(held) if per_layer_cache(mesh, isinstance(held, tuple)) else None
    state, pool = state_shardings(mesh, layers=layers), state_shardings(mesh, per_row_index=True, layers=layers)
    weights = param_shardings
    kwargs["prefill"].update(in_shardings=(weights, prompts, prompts, one, prompts, rows, rows), out_shardings=state)
    kwargs["decode"].update(in_shardings=(weights, state), out_shardings=state)
    kwargs["empty_pool"].update(out_shardings=pool)
    kwargs["admit"].update(in_shardings=(weights, pool, prompts, one, one, one, one, one), out_shardings=pool)
    kwargs["burst"].update(in_shardings=(weights, pool, one, one), out_shardings=pool)
    kwargs["gather_rows"].update(in_shardings=(pool, one), out_shardings=pool)
    return kwargs


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


def admission(pool_rows: int, n: int, batch_shards: int = 1) -> tuple[int, int]:
    """(refill, width): a burst returns to the host once `refill` rows are free (at least a prompt's n,
    an eighth of the pool), and up to `width` prompts are then admitted per `admit` call: fewer host
    visits and LM-head passes than one prompt at a time, for a few idle rows."""
    refill = max(n, pool_rows // 8)
    return refill, round_up(max(refill // n, 1), batch_shards)


def tail_widths(pool_rows: int, batch_shards: int = 1) -> list[int]:
    """The smaller pools a call's tail moves to, largest first: 3/4, 1/2, 3/8, 1/4, 3/16 and 1/8 of the
    pool, in whole batch shards. Steps of a quarter rather than halvings: the long-tail bench's call
    15.8 -> 15.2 s (BENCHMARKS.md, session 13); the live rows leave the full pool sooner."""
    widths = {max(round_up(pool_rows * num // den, batch_shards), batch_shards)
              for num, den in ((3, 4), (1, 2), (3, 8), (1, 4), (3, 16), (1, 8))}
    return sorted(widths - {pool_rows}, reverse=True)


class JaxSampler:
    """The `Rollout` protocol on JAX: holds the params and the compiled functions.

    The object only holds the weights, the shape settings and the jit caches; every array of a call
    flows through the pure functions above.
    """

    def __init__(self, config: ModelConfig, params: Any, *, max_length: int, mesh: Mesh | None = None,
                 rules: Sequence = parallel_mesh.LOGICAL_RULES, prompt_bucket: int | None = None,
                 min_prompt_bucket: int = 16, max_slots: int | None = None, burst_steps: int = 64,
                 weights: str = "replicated"):
        """
        Args:
          max_length: most tokens (prompt + response) a row may hold; bounds the KV cache (vLLM's
            max_model_len). A prompt longer than `max_length - max_tokens` is refused.
          mesh: a (data, fsdp, tensor) mesh (sharding.make_mesh): the batch and KV cache are sharded on
            it as in training, the weights as `weights` says (module docstring).
          rules: the logical-axis rules of the params and activations (sharding.logical_rules of the
            run's mesh config); unused without a mesh.
          prompt_bucket: pad prompts to a multiple of this; None pads to a power of two.
          min_prompt_bucket: smallest padded prompt length (short prompts share one compile).
          max_slots: continuous batching over a pool of this many rows (rounded up to a multiple of
            the mesh's batch shards); None: the static batch of all a call's rows.
          burst_steps: most decode steps between two visits of the host (continuous batching).
          weights: on a mesh, "replicated" (each batch shard holds the whole model, split over tensor
            only) or "sharded" (training's shardings); `weight_rules`. Either way in the compute dtype
            (`hold`).
        """
        if max_length < 2:
            raise ValueError(f"max_length={max_length}: need room for a prompt token and a new token")
        if prompt_bucket is not None and prompt_bucket < 1:
            raise ValueError(f"prompt_bucket={prompt_bucket}: expected a positive length or None")
        if max_slots is not None and (isinstance(max_slots, bool) or not isinstance(max_slots, int) or max_slots < 1):
            raise ValueError(f"max_slots={max_slots!r}: expected a positive number of pool rows, or None (static)")
        if isinstance(burst_steps, bool) or not isinstance(burst_steps, int) or burst_steps < 1:
            raise ValueError(f"burst_steps={burst_steps!r}: expected a positive number of decode steps")
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
        self.batch_shards = 1 if mesh is None else parallel_mesh.data_parallel_size(mesh)
        self.max_slots = None if max_slots is None else round_up(max_slots, self.batch_shards)
        self.burst_steps = burst_steps
        self.rules = weight_rules(rules, weights)  # the sampler's: its weights' shardings and activations'
        # The params as the sampler holds them (`hold`): its own copy in the compute dtype, per layer
        # (`holds_per_layer_weights`) or stacked. On a mesh: `source_shardings` are where update_weights
        # takes the params (training's, checks head/width divisibility), `param_shardings` the copy's.
        self.per_layer = holds_per_layer_weights(mesh, weights)
        self.per_layer_cache = per_layer_cache(mesh, self.per_layer)  # its pools' KV layout
        self.source_shardings = None if mesh is None else parallel_shardings.param_shardings(config, mesh, rules)
        self.param_shardings = None if mesh is None else held_shardings(config, mesh, rules, weights)
        self._hold = jax.jit(functools.partial(hold, config, self.per_layer),
                             **({} if mesh is None else {"out_shardings": self.param_shardings}))
        self._narrow = jax.jit(functools.partial(narrow, config))  # in place: on each process's shards
        self.trace_counts: collections.Counter = collections.Counter()
        self.prompt_sharding = (None if mesh is None  # [B, P]
                                else NamedSharding(mesh, P(parallel_mesh.BATCH_AXES, None)))
        shardings = jit_shardings(mesh, self.param_shardings)
        jitted = {name: self._jit(name, function, **shardings[name]) for name, function in FUNCTIONS.items()}
        self._prefill, self._decode = jitted["prefill"], jitted["decode"]
        self._empty_pool, self._admit, self._burst = jitted["empty_pool"], jitted["admit"], jitted["burst"]
        self._gather_rows = jitted["gather_rows"]
        self._tails: dict = {}  # pool shape -> {smaller width: (compiled row gather, compiled burst)}
        self.params = None
        self.update_weights(params)

    def _jit(self, name: str, function: Callable, **jit_kwargs) -> Callable:
        @functools.wraps(function)
        def traced(*args):
            self.trace_counts[name] += 1  # runs only while tracing: counts compiles, not calls
            return function(*args)

        return MeshJit(traced, self.mesh, self.rules, **jit_kwargs)

    def sleep(self) -> None:
        """Nothing to release: the sampler allocates its cache per call and shares JAX's memory pool."""

    def update_weights(self, params: Any) -> None:
        """Swaps in new weights (same tree and shapes as the config's params); no recompile.

        The sampler keeps its own copy (`hold`: compute dtype, per layer or stacked); with a mesh, in
        `param_shardings`, made on the devices: cast on training's shards, then gathered where replicated.
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
        self.params = None  # the old copy goes before the new one is made
        leaves = [leaf for leaf in jax.tree.leaves(params) if isinstance(leaf, jax.Array)]
        if self.mesh is None and any(not leaf.is_fully_addressable for leaf in leaves):
            # The trainer's params span other processes' devices: this process's own full copy, gathered
            # in the compute dtype (cast on each process's shards first).
            from jax.experimental import multihost_utils

            params = jax.device_put(multihost_utils.process_allgather(self._narrow(params), tiled=True),
                                    jax.local_devices()[0])
        elif self.mesh is not None:
            # Training's params are in place already; others (host arrays, other shardings) are put there.
            params = jax.device_put(params, self.source_shardings)
        # A jitted function's outputs are new buffers: the copy outlives the trainer's params, which the
        # next train step donates.
        self.params = self._hold(params)

    def _prepare_tail(self, sampling: SamplingParams, rows: int, length: int) -> dict[int, tuple]:
        """The smaller pools the tail of a call moves to (`tail_widths`): their row gather and burst,
        compiled ahead the first time these shapes are seen and kept (which of them a call reaches
        depends on its samples, and none may compile later)."""
        key = (sampling, rows, length)
        if key in self._tails:
            return self._tails[key]
        widths = tail_widths(rows, self.batch_shards)
        one = None if self.mesh is None else parallel_shardings.replicated(self.mesh)
        config, mesh = self.config, self.mesh
        abstract = functools.partial(abstract_pool, config, sampling, mesh, length=length,
                                     per_layer=self.per_layer_cache)

        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=one)
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
                              self.params)
        tail, larger = {}, rows
        for width in widths:
            gather = self._gather_rows.lower(config, sampling, mesh, abstract(larger),
                                             jax.ShapeDtypeStruct((width,), jnp.int32, sharding=one)).compile()
            tail[width] = (gather, self._burst.lower(config, sampling, mesh, params, abstract(width), scalar,
                                                     scalar).compile())
            larger = width
        self._tails[key] = tail
        return tail

    def shapes(self, num_rows: int, longest_prompt: int, max_tokens: int) -> tuple[int, int]:
        """The bucketed (B, P) a call with these sizes compiles for (B: the pool's rows when continuous)."""
        prompt = min(bucket(longest_prompt, self.prompt_bucket, self.min_prompt_bucket), self.max_length - max_tokens)
        rows = self.max_slots if self.max_slots is not None else round_up(bucket(num_rows), self.batch_shards)
        return rows, prompt

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 first_prompt: int = 0, max_tokens: Sequence[int] | None = None) -> RolloutBatch:
        """n responses to each prompt, prompt-major; `first_prompt` is the index of prompts[0] in the
        step's whole batch (rollout/base.py: samples are keyed by seed, prompt index and sample index);
        `max_tokens`: each prompt's own limit (<= params.max_tokens), None: params.max_tokens for all."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"generate() takes a SamplingParams, got {type(params).__name__}")
        M = params.max_tokens
        if M >= self.max_length:
            raise ValueError(f"max_tokens={M} leaves no room for a prompt in max_length={self.max_length}")
        prompts = check_prompts(prompts, vocab_size=self.config.vocab_size,
                                max_prompt_length=self.max_length - M, max_tokens=M)
        limits = check_max_tokens(max_tokens, len(prompts), M)
        static = params.replace(n=1, seed=0)  # n and seed must not key the compile cache
        seed_key = jax.random.key(params.seed)
        if self.mesh is not None:
            seed_key = jax.device_put(seed_key, parallel_shardings.replicated(self.mesh))
        if self.max_slots is None:
            tokens, logprobs, lengths = self._generate_static(prompts, params, static, seed_key, first_prompt, limits)
        else:
            tokens, logprobs, lengths = self._generate_continuous(prompts, params, static, seed_key, first_prompt,
                                                                  limits)
        rows = np.repeat(np.arange(len(prompts), dtype=np.int32), params.n)
        stops = set(params.stop_token_ids)
        last = tokens[np.arange(len(rows)), lengths - 1]
        return RolloutBatch(
            prompt_index=rows, token_ids=tokens, logprobs=logprobs, lengths=lengths,
            # vLLM checks stop first: a stop token drawn as the last allowed token is a "stop"
            finish_reasons=tuple("stop" if int(t) in stops else "length" for t in last),
        )

    def _generate_static(self, prompts: list[list[int]], params: SamplingParams, static: SamplingParams,
                         seed_key: jax.Array, first_prompt: int, limits: np.ndarray):
        M = params.max_tokens
        R = len(prompts) * params.n  # rows, prompt-major: row r samples prompt r // n
        B, T = self.shapes(R, max(map(len, prompts)), M)
        U = self.shapes(len(prompts), 1, M)[0]  # the distinct prompts' rows, bucketed like the batch's
        tokens = np.zeros((U, T), np.int32)  # [U, P]
        segments = np.zeros((U, T), np.int32)  # [U, P]
        for i, prompt in enumerate(prompts):
            tokens[i, T - len(prompt):] = prompt
            segments[i, T - len(prompt):] = 1
        source = np.full((B,), -1, np.int32)  # -1: a filler row, which draws nothing used
        source[:R] = np.repeat(np.arange(len(prompts)), params.n)
        row_ids = np.zeros((B, 2), np.int32)  # (prompt index, sample index)
        row_ids[:R, 0] = first_prompt + source[:R]
        row_ids[:R, 1] = np.tile(np.arange(params.n), len(prompts))
        row_limits = np.full((B,), M, np.int32)
        row_limits[:R] = np.repeat(limits, params.n)
        if self.mesh is not None:
            tokens, segments, row_ids = jax.device_put((tokens, segments, row_ids), self.prompt_sharding)
            row_limits, source = jax.device_put((row_limits, source),
                                                NamedSharding(self.mesh, P(parallel_mesh.BATCH_AXES)))
        state = self._prefill(self.config, static, self.mesh, self.params, tokens, segments, seed_key, row_ids,
                              row_limits, source)
        if M > 1:
            state = self._decode(self.config, static, self.mesh, self.params, state)
        out_tokens, out_logprobs, lengths = jax.device_get((state.tokens, state.logprobs, state.lengths))
        width = int(lengths[:R].max())
        return (np.asarray(out_tokens[:R, :width], np.int32), np.asarray(out_logprobs[:R, :width], np.float32),
                np.asarray(lengths[:R], np.int32))

    def _generate_continuous(self, prompts: list[list[int]], params: SamplingParams, static: SamplingParams,
                             seed_key: jax.Array, first_prompt: int, limits: np.ndarray):
        n, M = params.n, params.max_tokens
        B, T = self.shapes(len(prompts) * n, max(map(len, prompts)), M)
        if n > B:
            raise ValueError(f"max_slots={B} < n={n}: a prompt's n samples start together (they share its "
                             f"prefill), so the pool needs at least n rows")
        config, mesh = self.config, self.mesh
        refill, width = admission(B, n, self.batch_shards)
        tail = self._prepare_tail(static, B, T + M)
        state = self._empty_pool(config, static, mesh, B, T + M, self.per_layer_cache)
        waiting = collections.deque(range(len(prompts)))
        owner = np.full((B,), -1)  # the row (prompt * n + sample) each slot serves, -1: free
        results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        while waiting or (owner >= 0).any():
            free = np.flatnonzero(owner < 0)
            while waiting and len(free) >= n:
                prompt_tokens = np.zeros((width, T), np.int32)
                prompt_lengths = np.zeros((width,), np.int32)  # 0: a padding prompt
                slots = np.full((width, n), B, np.int32)  # B: nothing written
                row_ids = np.zeros((width, n, 2), np.int32)
                limit = np.ones((width,), np.int32)
                for a in range(min(width, len(free) // n, len(waiting))):
                    i = waiting.popleft()
                    prompt_tokens[a, :len(prompts[i])], prompt_lengths[a] = prompts[i], len(prompts[i])
                    limit[a] = limits[i]
                    slots[a], free = free[:n], free[n:]
                    row_ids[a, :, 0], row_ids[a, :, 1] = first_prompt + i, np.arange(n)
                    owner[slots[a]] = i * n + np.arange(n)
                if mesh is not None:
                    prompt_tokens = jax.device_put(prompt_tokens, self.prompt_sharding)
                state = self._admit(config, static, mesh, self.params, state, prompt_tokens, prompt_lengths, slots,
                                    seed_key, row_ids, limit)
            # Back once the next prompts fit; with none waiting, once the live rows fit the next smaller
            # pool (or when all are done).
            pool = len(owner)
            wake = refill if waiting else pool - next((w for w in tail if w < pool), 0)
            steps, wake = np.int32(self.burst_steps), np.int32(wake)
            if pool == B:
                state = self._burst(config, static, mesh, self.params, state, steps, wake)
            else:
                state = tail[pool][1](self.params, state, steps, wake)
            done, lengths = jax.device_get((state.done, state.lengths))
            finished = np.flatnonzero((owner >= 0) & done)
            if len(finished):
                tokens, logprobs = jax.device_get((state.tokens, state.logprobs))
                for slot in finished:
                    results[int(owner[slot])] = (tokens[slot, :lengths[slot]], logprobs[slot, :lengths[slot]])
                owner[finished] = -1
            live = np.flatnonzero(owner >= 0)
            # The tail: the live rows move to a smaller pool, one width at a time (each compiled ahead).
            while not waiting and len(live) and (smaller := next((w for w in tail if w < len(owner)), 0)) >= len(live):
                rows = np.concatenate([np.flatnonzero(owner >= 0), np.flatnonzero(owner < 0)])[:smaller]
                state = tail[smaller][0](state, rows.astype(np.int32) if mesh is None else
                                         jax.device_put(rows.astype(np.int32), parallel_shardings.replicated(mesh)))
                owner = owner[rows]
        R = len(prompts) * n
        lengths = np.array([len(results[r][0]) for r in range(R)], np.int32)
        out_tokens = np.zeros((R, lengths.max()), np.int32)
        out_logprobs = np.zeros((R, lengths.max()), np.float32)
        for r in range(R):
            out_tokens[r, :lengths[r]], out_logprobs[r, :lengths[r]] = results[r]
        return out_tokens, out_logprobs, lengths
