"""Token log-probs, entropies and top-k of temperature-scaled logits, computed in blocks so that [T, V] fp32
logits never exist at once (the fused head on one device, vocabulary-parallel blocks on a mesh).

Position t is scored from the hidden state at t − 1: log p(v | tokens[<t]) = x_v − lse(x) with x the logits
of hidden[t − 1] divided by the temperature. `hidden_logprobs` gives it at one id per position (the token
itself) or at K ids per position ([B, T, K] targets, e.g. a top-k set), differentiably; `hidden_topk` gives
each position's k most likely ids and their log-probs (lax.top_k's order and ties), without gradient, and
optionally the log-probs at given ids in the same pass over the vocabulary."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mathgrpo.config import ModelConfig
from mathgrpo.model import forward, output_kernel
from mathgrpo.rl import fused_head


def _vocab_parallel_axes() -> tuple[str, ...] | None:
    """The mesh axes the LM head splits the vocabulary over: all of them, when a mesh of more than
    one device is active (train step, log-prob pass); None otherwise (the fused head runs)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    return tuple(name for name, size in zip(mesh.axis_names, mesh.axis_sizes) if size > 1)


def _pad_columns(logits, vocab_axes: tuple[str, ...]):
    """[R, V] → [R, V'] with V' a multiple of the devices over `vocab_axes` (shard_map splits evenly); the
    padding columns hold the lowest finite float and the highest ids, so no top-k or id picks them."""
    mesh = jax.sharding.get_abstract_mesh()
    pad = -logits.shape[1] % math.prod(mesh.shape[name] for name in vocab_axes)
    return jnp.pad(logits, ((0, 0), (0, pad)), constant_values=jnp.finfo(logits.dtype).min) if pad else logits


def _take_columns(logits, ids, vocab_axes: tuple[str, ...]):
    """logits [R, V] split by columns over `vocab_axes`, ids [R, K] → logits[r, ids[r, k]], [R, K] on every
    device. Each device picks the ids that fall in its own columns (0 for the others) and a psum adds the
    K values up (an id lives on exactly one device): only [R, K] crosses devices, never the logits.
    Differentiable: the transpose is a scatter-add into each device's own columns (repeated ids add up)."""

    def local(x, ids):
        width = x.shape[1]
        local_ids = ids - jax.lax.axis_index(vocab_axes) * width
        hit = (local_ids >= 0) & (local_ids < width)
        picked = jnp.take_along_axis(x, jnp.clip(local_ids, 0, width - 1), axis=1)
        return jax.lax.psum(jnp.where(hit, picked, 0.0), vocab_axes)

    return jax.shard_map(local, in_specs=(P(None, vocab_axes), P()), out_specs=P())(
        _pad_columns(logits, vocab_axes), ids)


def _sharded_top_k(logits, k: int, vocab_axes: tuple[str, ...]):
    """jax.lax.top_k(logits, k) of [R, V] logits split by columns over `vocab_axes`: (values, ids) [R, k] on
    every device. Each device takes the top-k of its own columns; the devices' lists are all-gathered in
    device order, which is column order, and a last top_k picks the k best of the k·devices candidates.
    Among equal values the concatenation puts lower ids first (lower devices first, each list lower ids
    first), so lax.top_k's tie-break (lower index first) gives the ids lax.top_k gives on the whole row."""

    def local(x):
        width = x.shape[1]
        values, columns = jax.lax.top_k(x, min(k, width))
        ids = columns + jax.lax.axis_index(vocab_axes) * width
        values = jax.lax.all_gather(values, vocab_axes, axis=1, tiled=True)  # [R, devices·k]
        ids = jax.lax.all_gather(ids, vocab_axes, axis=1, tiled=True)
        values, position = jax.lax.top_k(values, k)
        return values, jnp.take_along_axis(ids, position, axis=1)

    # all_gather's result is the same on every device, but shard_map's replication check counts it as varying
    # over the gathered axes; the check only guards transposes, and this has no gradient.
    return jax.shard_map(local, in_specs=P(None, vocab_axes), out_specs=(P(), P()), check_vma=False)(
        _pad_columns(logits, vocab_axes))


def _chunk_logits(hidden, kernel, temperature: float, vocab_axes: tuple[str, ...]):
    """hidden [B, c, D] → fp32 logits [B·c, V] split by columns over `vocab_axes`: every device takes the
    chunk's hidden states of ALL devices (an all-gather of [B·c, D]) and computes its own V / devices
    columns. Rows are flattened to 2-D: XLA:CPU reduces the last axis of a [1, c, V] array ~4× slower
    than of the same [c, V] one (measured, BENCHMARKS.md)."""
    B, C, D = hidden.shape
    rows = jax.lax.with_sharding_constraint(hidden.reshape(B * C, D).astype(kernel.dtype), P())  # all tokens
    logits = jnp.dot(rows, kernel, preferred_element_type=jnp.float32) / temperature  # [B·c, V]
    return jax.lax.with_sharding_constraint(logits, P(None, vocab_axes))


def _chunk_logprobs(hidden, kernel, targets, temperature: float, vocab_axes: tuple[str, ...]):
    """hidden [B, c, D], kernel [D, V] (compute dtype), targets [B, c] or [B, c, K] → (log-prob [B, c] or
    [B, c, K], entropy [B, c]) fp32, with the head vocabulary-parallel over the mesh axes `vocab_axes` (a
    sharded step).

    The logits are `_chunk_logits`': the [D, V] head is never gathered and its gradient never exists in
    full on one device (an FSDP head would gather 0.72 GiB of bf16 kernel and hold a 1.45 GiB fp32 full
    gradient per device at the 4B shapes). One exp pass over the [B·c, V] logits gives both outputs: with
    m the row max, x = exp(logits − m) and s = Σx, lse = m + log s and entropy = lse − Σ(x·logits)/s
    (verl's entropy_from_logits); the row max, Σexp and Σx·logits are small all-reduces. One target per
    position is a masked sum over the local columns (a gather along a sharded axis would gather the
    logits); K targets are picked on each device from its own columns (`_take_columns`)."""
    B, C, _ = hidden.shape
    extra = targets.shape[2:]  # () or (K,)
    targets = jax.lax.with_sharding_constraint(targets.reshape(B * C, *extra), P())
    logits = _chunk_logits(hidden, kernel, temperature, vocab_axes)
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # [B·c, 1]
    exp = jnp.exp(logits - peak)
    total = jnp.sum(exp, axis=-1)  # [B·c]
    lse = peak[:, 0] + jnp.log(total)
    entropy = lse - jnp.sum(exp * logits, axis=-1) / total
    if extra:
        logprob = _take_columns(logits, targets, vocab_axes) - lse[:, None]
    else:
        columns = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        logprob = jnp.sum(jnp.where(columns == targets[:, None], logits, 0.0), axis=-1) - lse
    return logprob.reshape(B, C, *extra), entropy.reshape(B, C)


def _chunk_topk(hidden, kernel, targets, k: int, temperature: float, vocab_axes: tuple[str, ...]):
    """hidden [B, c, D] → (ids [B, c, k] int32, log-probs [B, c, k]) of the k most likely ids, and with
    targets [B, c] or [B, c, K] their log-probs too; vocabulary-parallel like `_chunk_logprobs` (local
    top-k per device, then a top-k of the gathered candidates: `_sharded_top_k`). No gradient."""
    B, C, _ = hidden.shape
    logits = _chunk_logits(hidden, kernel, temperature, vocab_axes)
    peak = jnp.max(logits, axis=-1)
    lse = peak + jnp.log(jnp.sum(jnp.exp(logits - peak[:, None]), axis=-1))  # [B·c]
    values, ids = _sharded_top_k(logits, k, vocab_axes)
    out = (ids.reshape(B, C, k), (values - lse[:, None]).reshape(B, C, k))
    if targets is None:
        return out
    extra = targets.shape[2:]
    picked = _take_columns(logits, targets.reshape(B * C, -1), vocab_axes) - lse[:, None]
    return (*out, picked.reshape(B, C, *extra))


def _score_mask(mask, B: int, T: int):
    """[B, T] bool of the positions to score: `mask` (or all) without position 0 (nothing predicts it)."""
    score = jnp.ones((B, T), bool) if mask is None else jnp.asarray(mask) > 0
    return score.at[:, 0].set(False)


def _scored_rows(hidden, score):
    """Positions in the order `order` [B·T] (scored ones first, in order), the hidden state each is scored
    from (position j from j − 1) [B·T, D], and how many are scored."""
    B, T, D = hidden.shape
    flat = score.reshape(B * T)
    order = jnp.argsort(~flat, stable=True)
    return order, hidden.reshape(B * T, D)[jnp.maximum(order - 1, 0)], jnp.sum(flat)


def _unorder(values, order, B: int, T: int):
    """[B·T, …] rows in `order` → [B, T, …] by position (positions past the scored ones hold 0 already)."""
    return jnp.zeros_like(values).at[order].set(values).reshape(B, T, *values.shape[1:])


def _sequence_chunks(hidden, targets, chunk_size: int):
    """hidden [B, T, D] and targets [B, T, …] (or None) → positions 1 … T−1 in chunks of c: hidden states
    [nc, B, c, D] (position t from hidden[t − 1]), their targets [nc, B, c, …], and T − 1."""
    B, T, D = hidden.shape
    n = T - 1
    chunk = min(chunk_size, max(n, 1))
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n

    def split(x):  # [B, n, …] → [nc, B, c, …]
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(B, num_chunks, chunk, *x.shape[2:]).swapaxes(0, 1)

    return split(hidden[:, :-1]), (None if targets is None else split(targets[:, 1:])), n


def _unchunk(values, n: int):
    """[nc, B, c, …] chunk outputs → [B, T, …] with position 0 set to 0."""
    values = values.swapaxes(0, 1)
    values = values.reshape(values.shape[0], -1, *values.shape[3:])[:, :n]
    return jnp.concatenate([jnp.zeros_like(values[:, :1]), values], axis=1)


def hidden_logprobs(config: ModelConfig, kernel, hidden, tokens, *, temperature: float = 1.0,
                    chunk_size: int = 512, mask=None, vocab_block: int = 8192, save_logits: bool = False):
    """Log-probs (and entropy) of `tokens` from final hidden states.

    Position t gets log p(tokens[t] | tokens[<t]) from hidden[t-1]; position 0 gets 0 (it has no
    prediction; it is always a prompt token). `tokens` may also be [B, T, K]: K ids per position (repeats
    allowed), each scored as tokens[t] would be, giving [B, T, K] log-probs (a top-k distillation loss;
    the gradient flows through all K). With `mask` [B, T] only the positions where it is nonzero are
    scored (the rest give 0): the loss needs the response tokens only, so a micro-batch does not pay the
    head's [·, V] matmuls for its prompt and padding positions.

    On one device the head is `fused_head.fused_logprobs`: the scored positions are gathered to the
    front of a [B·T, D] list and walked in blocks of `chunk_size` rows × ~`vocab_block` columns;
    blocks past the last scored row do not run. `save_logits` keeps the fp32 tiles for the backward
    pass instead of recomputing them (one matmul fewer, [scored rows, V] fp32 bytes).

    With a multi-device mesh the head is vocabulary-parallel (`_chunk_logprobs`): sequence chunks of
    `chunk_size`, each rematerialized in the backward pass when there are several, so memory is
    O(B·c·V), not O(B·T·V).

    Returns: (logprobs [B, T] (or [B, T, K]), entropy [B, T]) fp32.
    """
    B, T, D = hidden.shape
    extra = tokens.shape[2:]  # () or (K,)
    score = _score_mask(mask, B, T)
    vocab_axes = _vocab_parallel_axes()
    if vocab_axes is None:
        order, rows, count = _scored_rows(hidden, score)
        logprobs, entropy = fused_head.fused_logprobs(
            rows.astype(kernel.dtype), kernel, tokens.reshape(B * T, *extra)[order], count,
            temperature=temperature, row_block=chunk_size, vocab_block=vocab_block, save_logits=save_logits)
        return _unorder(logprobs, order, B, T), _unorder(entropy, order, B, T)

    hidden_chunks, target_chunks, n = _sequence_chunks(hidden, tokens, chunk_size)
    # the head's columns split over every device (see _chunk_logprobs)
    kernel = jax.lax.with_sharding_constraint(kernel, P(None, vocab_axes))

    def one_chunk(args):
        return _chunk_logprobs(args[0], kernel, args[1], temperature, vocab_axes)

    if hidden_chunks.shape[0] > 1:  # keep one chunk's logits at a time; a single chunk is the last op
        one_chunk = jax.checkpoint(one_chunk)
    logprobs, entropy = jax.lax.map(one_chunk, (hidden_chunks, target_chunks))  # [nc, B, c(, K)] each
    logprobs, entropy = _unchunk(logprobs, n), _unchunk(entropy, n)
    return jnp.where(score.reshape(B, T, *(1,) * len(extra)), logprobs, 0.0), jnp.where(score, entropy, 0.0)


def hidden_topk(config: ModelConfig, kernel, hidden, *, k: int, temperature: float = 1.0, chunk_size: int = 512,
                mask=None, vocab_block: int = 8192, targets=None):
    """The k most likely ids at each position and their log-probs, from final hidden states; no gradient.

    Position t's distribution is the one `hidden_logprobs` scores tokens[t] under (from hidden[t-1], at
    `temperature`); its ids and log-probs equal jax.lax.top_k(log_softmax(logits / T), k), ties broken
    toward the lower id. Position 0, and with `mask` [B, T] the positions where it is 0, give ids 0 and
    log-probs 0. With `targets` [B, T] or [B, T, K] the same pass over the vocabulary also gives the
    log-probs at those ids (a teacher's own top-k and its log-probs at the student's ids in one matmul).

    Dispatch as `hidden_logprobs`: on one device `fused_head.fused_topk` (scored rows first, blocks of
    `chunk_size` rows × ~`vocab_block` columns, a running top-k merged block by block); on a mesh
    sequence chunks of `chunk_size` with the vocabulary split over the devices (`_chunk_topk`).

    Returns (ids [B, T, k] int32, logprobs [B, T, k] fp32), and with targets their log-probs [B, T(, K)].
    """
    B, T, D = hidden.shape
    hidden, kernel = jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(kernel)
    score = _score_mask(mask, B, T)
    vocab_axes = _vocab_parallel_axes()
    if vocab_axes is None:
        order, rows, count = _scored_rows(hidden, score)
        picked = None if targets is None else targets.reshape(B * T, *targets.shape[2:])[order]
        out = fused_head.fused_topk(rows.astype(kernel.dtype), kernel, k, count, temperature=temperature,
                                    row_block=chunk_size, vocab_block=vocab_block, targets=picked)
        return tuple(_unorder(value, order, B, T) for value in out)

    if not 1 <= k <= kernel.shape[1]:
        raise ValueError(f"top-k of k={k} over a vocabulary of {kernel.shape[1]}; expected 1 ≤ k ≤ V")
    hidden_chunks, target_chunks, n = _sequence_chunks(hidden, targets, chunk_size)
    kernel = jax.lax.with_sharding_constraint(kernel, P(None, vocab_axes))
    if targets is None:
        out = jax.lax.map(lambda h: _chunk_topk(h, kernel, None, k, temperature, vocab_axes), hidden_chunks)
    else:
        out = jax.lax.map(lambda a: _chunk_topk(a[0], kernel, a[1], k, temperature, vocab_axes),
                          (hidden_chunks, target_chunks))
    out = [_unchunk(value, n) for value in out]
    return tuple(jnp.where(score.reshape(B, T, *(1,) * (value.ndim - 2)), value, 0) for value in out)


def token_logprobs(config: ModelConfig, params: Any, tokens, positions, segment_ids, *,
                   temperature: float = 1.0, chunk_size: int = 512, grad_sink: Any = None, mask=None,
                   vocab_block: int = 8192, save_logits: bool = False, targets=None):
    """Log-prob and entropy of every token (or of the `mask`ed ones) under the model at `temperature`
    ([B, T] each, fp32); see `hidden_logprobs` for the head's knobs. With `targets` [B, T, K] the log-probs
    are those of the K ids at each position instead of the token's ([B, T, K]).

    Rows may pack several sequences (segment ids); position t is scored from t-1, so the first
    token of each packed sequence gets a meaningless value that the response mask excludes.
    `grad_sink`: an accumulator for the layers' gradient (model.full_remat_layers).
    """
    hidden, _ = forward(config, params, tokens, positions, segment_ids, return_hidden=True, grad_sink=grad_sink)
    return hidden_logprobs(config, output_kernel(config, params), hidden, tokens if targets is None else targets,
                           temperature=temperature, chunk_size=chunk_size, mask=mask, vocab_block=vocab_block,
                           save_logits=save_logits)


def token_topk(config: ModelConfig, params: Any, tokens, positions, segment_ids, *, k: int,
               temperature: float = 1.0, chunk_size: int = 512, mask=None, vocab_block: int = 8192, targets=None):
    """The model's k most likely ids at every position (or the `mask`ed ones) and their log-probs at
    `temperature`, optionally with the log-probs at `targets` in the same pass; see `hidden_topk`."""
    hidden, _ = forward(config, params, tokens, positions, segment_ids, return_hidden=True)
    return hidden_topk(config, output_kernel(config, params), hidden, k=k, temperature=temperature,
                       chunk_size=chunk_size, mask=mask, vocab_block=vocab_block, targets=targets)
