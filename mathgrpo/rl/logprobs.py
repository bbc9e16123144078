"""Token log-probs and entropies of temperature-scaled logits, computed in blocks so that
[T, V] fp32 logits never exist at once (the fused head on one device, vocabulary-parallel
blocks on a mesh)."""

from __future__ import annotations

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


def _chunk_logprobs(hidden, kernel, targets, temperature: float, vocab_axes: tuple[str, ...]):
    """hidden [B, c, D], kernel [D, V] (compute dtype), targets [B, c] → (log-prob, entropy) [B, c] fp32,
    with the head vocabulary-parallel over the mesh axes `vocab_axes` (a sharded step).

    Every device takes the chunk's hidden states of ALL devices (an all-gather of [B·c, D]) and
    computes the logits of its own V / devices columns, so the [D, V] head is never gathered and its
    gradient never exists in full on one device (an FSDP head would gather 0.72 GiB of bf16 kernel and
    hold a 1.45 GiB fp32 full gradient per device at the 4B shapes). One exp pass over the [B·c, V]
    logits gives both outputs: with m the row max, x = exp(logits − m) and s = Σx, lse = m + log s and
    entropy = lse − Σ(x·logits)/s (verl's entropy_from_logits); the row max, Σexp and Σx·logits are
    small all-reduces, and the target logit is a masked sum over the local columns (a gather along a
    sharded axis would gather the logits). Rows are flattened to 2-D first: XLA:CPU reduces the last
    axis of a [1, c, V] array ~4× slower than of the same [c, V] one (measured, BENCHMARKS.md)."""
    B, C, D = hidden.shape
    rows = jax.lax.with_sharding_constraint(hidden.reshape(B * C, D).astype(kernel.dtype), P())  # all tokens
    targets = jax.lax.with_sharding_constraint(targets.reshape(B * C), P())
    logits = jnp.dot(rows, kernel, preferred_element_type=jnp.float32) / temperature  # [B·c, V]
    logits = jax.lax.with_sharding_constraint(logits, P(None, vocab_axes))
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # [B·c, 1]
    exp = jnp.exp(logits - peak)
    total = jnp.sum(exp, axis=-1)  # [B·c]
    lse = peak[:, 0] + jnp.log(total)
    entropy = lse - jnp.sum(exp * logits, axis=-1) / total
    columns = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    target_logit = jnp.sum(jnp.where(columns == targets[:, None], logits, 0.0), axis=-1)
    return (target_logit - lse).reshape(B, C), entropy.reshape(B, C)


def hidden_logprobs(config: ModelConfig, kernel, hidden, tokens, *, temperature: float = 1.0,
                    chunk_size: int = 512, mask=None, vocab_block: int = 8192, save_logits: bool = False):
    """Log-probs (and entropy) of `tokens` from final hidden states.

    Position t gets log p(tokens[t] | tokens[<t]) from hidden[t-1]; position 0 gets 0 (it has no
    prediction; it is always a prompt token). With `mask` [B, T] only the positions where it is
    nonzero are scored (the rest give 0): the loss needs the response tokens only, so a micro-batch
    does not pay the head's [·, V] matmuls for its prompt and padding positions.

    On one device the head is `fused_head.fused_logprobs`: the scored positions are gathered to the
    front of a [B·T, D] list and walked in blocks of `chunk_size` rows × ~`vocab_block` columns;
    blocks past the last scored row do not run. `save_logits` keeps the fp32 tiles for the backward
    pass instead of recomputing them (one matmul fewer, [scored rows, V] fp32 bytes).

    With a multi-device mesh the head is vocabulary-parallel (`_chunk_logprobs`): sequence chunks of
    `chunk_size`, each rematerialized in the backward pass when there are several, so memory is
    O(B·c·V), not O(B·T·V).

    Returns: (logprobs [B, T], entropy [B, T]) fp32.
    """
    B, T, D = hidden.shape
    score = jnp.ones((B, T), bool) if mask is None else jnp.asarray(mask) > 0
    score = score.at[:, 0].set(False)  # nothing predicts position 0
    vocab_axes = _vocab_parallel_axes()
    if vocab_axes is None:
        flat = score.reshape(B * T)
        order = jnp.argsort(~flat, stable=True)  # scored positions first, in order
        rows = hidden.reshape(B * T, D)[jnp.maximum(order - 1, 0)]  # position j is scored from j - 1
        logprobs, entropy = fused_head.fused_logprobs(
            rows.astype(kernel.dtype), kernel, tokens.reshape(B * T)[order], jnp.sum(flat),
            temperature=temperature, row_block=chunk_size, vocab_block=vocab_block, save_logits=save_logits)
        zeros = jnp.zeros((B * T,), jnp.float32)
        return zeros.at[order].set(logprobs).reshape(B, T), zeros.at[order].set(entropy).reshape(B, T)

    hidden, targets = hidden[:, :-1], tokens[:, 1:]  # [B, T-1, D], [B, T-1]
    n = T - 1
    chunk = min(chunk_size, max(n, 1))
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hidden_chunks = hidden.reshape(B, num_chunks, chunk, D).swapaxes(0, 1)  # [nc, B, c, D]
    target_chunks = targets.reshape(B, num_chunks, chunk).swapaxes(0, 1)  # [nc, B, c]
    # the head's columns split over every device (see _chunk_logprobs)
    kernel = jax.lax.with_sharding_constraint(kernel, P(None, vocab_axes))

    def one_chunk(args):
        return _chunk_logprobs(args[0], kernel, args[1], temperature, vocab_axes)

    if num_chunks > 1:  # keep one chunk's logits at a time; a single chunk is the last op: nothing to save
        one_chunk = jax.checkpoint(one_chunk)
    logprobs, entropy = jax.lax.map(one_chunk, (hidden_chunks, target_chunks))  # [nc, B, c] each
    logprobs = logprobs.swapaxes(0, 1).reshape(B, -1)[:, :n]
    entropy = entropy.swapaxes(0, 1).reshape(B, -1)[:, :n]
    zero = jnp.zeros((B, 1), jnp.float32)
    logprobs, entropy = jnp.concatenate([zero, logprobs], 1), jnp.concatenate([zero, entropy], 1)
    return jnp.where(score, logprobs, 0.0), jnp.where(score, entropy, 0.0)


def token_logprobs(config: ModelConfig, params: Any, tokens, positions, segment_ids, *,
                   temperature: float = 1.0, chunk_size: int = 512, grad_sink: Any = None, mask=None,
                   vocab_block: int = 8192, save_logits: bool = False):
    """Log-prob and entropy of every token (or of the `mask`ed ones) under the model at `temperature`
    ([B, T] each, fp32); see `hidden_logprobs` for the head's knobs.

    Rows may pack several sequences (segment ids); position t is scored from t-1, so the first
    token of each packed sequence gets a meaningless value that the response mask excludes.
    `grad_sink`: an accumulator for the layers' gradient (model.full_remat_layers).
    """
    hidden, _ = forward(config, params, tokens, positions, segment_ids, return_hidden=True, grad_sink=grad_sink)
    return hidden_logprobs(config, output_kernel(config, params), hidden, tokens, temperature=temperature,
                           chunk_size=chunk_size, mask=mask, vocab_block=vocab_block, save_logits=save_logits)
