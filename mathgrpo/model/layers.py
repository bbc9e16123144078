"""Building blocks of the Qwen3 decoder: projections with logical axes, RMSNorm, RoPE, attention.

Dimension legend (used in einsum strings and shape comments across mathgrpo):
B batch · T query length · S key/cache length · D model width · N query heads · K kv heads ·
G = N/K · H head dim · F MLP hidden · V vocab · L layers.

Attention masking is expressed by segment ids and slot indices, never by a materialized mask passed
around: query t of row b may attend key s iff `kv_segment[b, s] == q_segment[b, t] != 0` and
`kv_index[s] <= q_index[t]`. Segment 0 is padding. This one rule covers packed rows (several
sequences, causal within each), left or right padding, and a KV cache whose empty slots have
segment 0. Each attention implementation builds the mask for the block it works on.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mathgrpo.config import DTYPES, FULL_REMAT

# Large negative instead of -inf: a fully masked query row (padding) stays finite, so no NaN reaches
# the gradients; its output is garbage that the loss masks out.
NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)




def dtype_name(dtype) -> str:
    """A floating dtype given by name ("bfloat16"), numpy dtype or JAX dtype (`jnp.bfloat16`) as its name,
    the form configs and files store; anything else is refused, naming what is accepted."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {DTYPES} (a name, numpy or JAX dtype)")
    return name


def cast_sharded(param: jax.Array, dtype, axes: tuple[str, ...]) -> jax.Array:
    """Casts a (sharded) parameter to the compute dtype *before* it is gathered for a matmul: the
    constraint keeps the cast on the shards, so FSDP all-gathers move and hold bf16, not fp32."""
    if param.dtype == dtype:
        return param
    return nn.with_logical_constraint(param.astype(dtype), axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4, 5))
def project(equation: str, x: jax.Array, kernel: jax.Array, compute_dtype, axes: tuple[str, ...], out_dtype=None):
    """`einsum(equation, x, kernel)` in the compute dtype, `kernel` the (sharded) master weight, whose
    gradient is formed in fp32: ∂W = einsum(x, ∂y) with fp32 accumulation *and output*, constrained to
    the kernel's sharding. Autodiff through `cast_sharded(kernel)` gives ∂W in the compute dtype: on a
    mesh the gradient was summed over a loop's token chunks and reduce-scattered in bf16 (XLA:GPU
    compile of the 4B step); verl's FSDP reduces in fp32 (MixedPrecision reduce_dtype=fp32). Here the
    sum over chunks and the reduce-scatter are fp32. `equation` is "lhs,rhs->out" with every index of
    rhs in lhs or out (a projection)."""
    return _project_value(equation, x, kernel, compute_dtype, axes, out_dtype)


def _project_value(equation, x, kernel, compute_dtype, axes, out_dtype):
    kernel = cast_sharded(kernel, compute_dtype, axes)
    return jnp.einsum(equation, x.astype(compute_dtype), kernel, preferred_element_type=out_dtype)


def _project_fwd(equation, x, kernel, compute_dtype, axes, out_dtype):
    return _project_value(equation, x, kernel, compute_dtype, axes, out_dtype), (x, kernel)


def _project_bwd(equation, compute_dtype, axes, out_dtype, residuals, grad):
    x, kernel = residuals
    lhs, rest = equation.split(",")
    rhs, out = rest.split("->")
    grad = grad.astype(compute_dtype)
    grad_x = jnp.einsum(f"{out},{rhs}->{lhs}", grad, cast_sharded(kernel, compute_dtype, axes))
    a, b = x.astype(compute_dtype), grad
    if target_platform() == "cpu" and a.dtype != jnp.float32:  # XLA:CPU: no bf16 x bf16 -> fp32 plain dot
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    grad_kernel = jnp.einsum(f"{lhs},{out}->{rhs}", a, b, preferred_element_type=jnp.float32)
    grad_kernel = nn.with_logical_constraint(grad_kernel.astype(kernel.dtype), axes)
    return grad_x.astype(x.dtype), grad_kernel


project.defvjp(_project_fwd, _project_bwd)


class Proj(nn.Module):
    """A bias-free projection `einsum(x, kernel)` whose kernel carries logical axis names.

    The kernel is stored in `param_dtype` (fp32 master weights) and cast to `compute_dtype` at use
    (`project`: its gradient stays fp32).
    """

    equation: str  # e.g. "BTD,DNH->BTNH"
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    param_dtype: str
    compute_dtype: str
    init_std: float
    out_dtype: str | None = None  # e.g. "float32" for the logits: fp32 accumulation and output

    @nn.compact
    def __call__(self, x: jax.Array | None):
        """`einsum(x, kernel)`; with x None, a function `rows -> einsum(rows, kernel)` (for callers that
        apply it inside their own loop, e.g. the token-chunked MLP) taking its own equation."""
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes),
            self.shape,
            dtype_of(self.param_dtype),
        )
        compute = dtype_of(self.compute_dtype)
        out_dtype = dtype_of(self.out_dtype) if self.out_dtype else None
        if x is None:
            return lambda rows, equation=self.equation: project(equation, rows, kernel, compute, self.axes, out_dtype)
        return project(self.equation, x, kernel, compute, self.axes, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def scale_by_weight(normed: jax.Array, weight: jax.Array, compute_dtype, axes: tuple[str, ...]) -> jax.Array:
    """`weight.astype(compute) * normed` (normed in the compute dtype), the norm weight's gradient formed
    like `project`'s: ∂w = Σ ∂y·normed over every token with fp32 accumulation *and output*, constrained
    to the weight's sharding. Autodiff through the cast sums it in the compute dtype (bf16 over each
    token chunk, then a bf16 reduce-scatter: the one left in the 4B step's XLA:GPU compile); verl's FSDP
    reduces gradients in fp32."""
    return weight.astype(compute_dtype) * normed


def _scale_fwd(normed, weight, compute_dtype, axes):
    return scale_by_weight(normed, weight, compute_dtype, axes), (normed, weight)


def _scale_bwd(compute_dtype, axes, residuals, grad):
    normed, weight = residuals
    grad = grad.astype(compute_dtype)
    grad_normed = (grad * weight.astype(compute_dtype)).astype(normed.dtype)
    products = grad.astype(jnp.float32) * normed.astype(jnp.float32)
    grad_weight = jnp.sum(products.reshape(-1, products.shape[-1]), axis=0)
    return grad_normed, nn.with_logical_constraint(grad_weight.astype(weight.dtype), axes)


scale_by_weight.defvjp(_scale_fwd, _scale_bwd)


class RMSNorm(nn.Module):
    """HF Qwen3RMSNorm: statistics in fp32, cast back to the compute dtype, *then* times the weight
    (`scale_by_weight`: the weight's gradient stays fp32)."""

    eps: float
    axis_name: str
    param_dtype: str
    compute_dtype: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param(
            "weight",
            nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],),
            dtype_of(self.param_dtype),
        )
        compute = dtype_of(self.compute_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale_by_weight(normed.astype(compute), weight, compute, (self.axis_name,))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half (non-interleaved) RoPE, as HF: angles in fp32, cos/sin cast to x's dtype.

    Args:
      x: [B, T, n, H] queries or keys.
      positions: [B, T] integer positions.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)  # rotate_half
    return x * cos + rotated * sin


def attention_mask(q_segment, kv_segment, q_index, kv_index) -> jax.Array:
    """[B, T, S] bool: same non-zero segment and key slot not after the query slot. `q_index` is [T],
    or [B, T] when rows sit at different slots (the continuous sampler's pool)."""
    same = (q_segment[:, :, None] == kv_segment[:, None, :]) & (kv_segment[:, None, :] != 0)
    q_index = q_index if q_index.ndim == 2 else q_index[None]  # [B or 1, T]
    causal = kv_index[None, None, :] <= q_index[:, :, None]
    return same & causal


def reference_attention(q, k, v, q_segment, kv_segment, q_index, kv_index) -> jax.Array:
    """Plain softmax attention, [B, K, G, T, S] scores in fp32. The reference every path must match.

    Args:
      q: [B, T, N, H] (already scaled is NOT assumed; scale is H^-0.5 here).
      k, v: [B, S, K, H].
      q_segment: [B, T]; kv_segment: [B, S]; q_index: [T]; kv_index: [S].
    Returns: [B, T, N, H] in q's dtype.
    """
    # The same computation as over [B, K, S, H] keys and values; XLA folds the transposes into the
    # matmuls.
    return cached_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), q_segment, kv_segment, q_index, kv_index)


def cached_attention(q, k, v, q_segment, kv_segment, q_index, kv_index) -> jax.Array:
    """`reference_attention` over [B, K, S, H] keys and values: each kv head's slots are contiguous, so
    both matmuls read them in place (a KV cache's values as they lie; its keys, stored [B, K, H, S]
    (qwen3.KVCache), as a transposed operand).

    Args: q [B, T, N, H]; k, v [B, K, S, H]; the rest as `reference_attention`.
    Returns: [B, T, N, H] in q's dtype.
    """
    B, T, N, H = q.shape
    K = k.shape[1]
    mask = attention_mask(q_segment, kv_segment, q_index, kv_index)  # [B, T, S]
    out = _softmax_attention(q.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4), k, v, mask)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q.dtype)


def kv_storage_dtype(dtype) -> jnp.dtype:
    """The dtype a KV cache of `dtype` values is stored in: `dtype`, except bfloat16 on CPU, whose bits
    the cache holds as uint16. XLA:CPU runs a bf16 dynamic-update-slice or slice through an fp32 copy of
    its whole operand: a decode step's per-row write into a 16-row, 4,096-slot bf16 cache took 77 ms
    per layer, against 0.01 ms for uint16 (and float16, which it runs natively); BENCHMARKS.md,
    session 15. Read and write a cache through `from_kv` and `to_kv`."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if dtype == jnp.bfloat16 and target_platform() == "cpu" else dtype


def to_kv(x: jax.Array, storage) -> jax.Array:
    """Keys or values as a cache of dtype `storage` (`kv_storage_dtype`) stores them."""
    if jnp.dtype(storage) == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(storage)


def from_kv(x: jax.Array, dtype) -> jax.Array:
    """A cache's (slice of) keys or values, as stored (`to_kv`), in `dtype`."""
    if x.dtype == jnp.uint16:
        x = jax.lax.bitcast_convert_type(x, jnp.bfloat16)
    return x.astype(dtype)


ONE_PASS_SLOTS = 512  # CPU: a per-layer cache of up to this many slots is read in one pass (`decode_block_size`)


def decode_block_size(slots: int, layers: int) -> int:
    """Slots per block of `decode_attention`'s loop when `model.decode_block_size` is 0 (`slots`: one
    pass). GPUs and TPUs: 512 (not yet measured there). CPU: one pass over a per-layer cache (`layers`
    == 1: `qwen3.init_cache(per_layer=True)`, the sampler's) of up to `ONE_PASS_SLOTS` slots, where
    `decode_one_pass` reads the layer's array in place; else blocks of 128 (the fastest of 32...512 for
    the bench's 64-row steps). A block is a copy on XLA:CPU (its dynamic slice feeds a product), and so
    is a whole layer sliced from a stacked cache: at 64 rows and 320 slots the 4 layers' attention took
    9.5 ms in blocks, 5.5 ms in one pass over per-layer arrays (BENCHMARKS.md, session 17)."""
    if target_platform() != "cpu":
        return 512
    return slots if layers == 1 and slots <= ONE_PASS_SLOTS else 128


def decode_one_pass(q, k, v, q_segment, kv_segment, q_index, kv_index) -> jax.Array:
    """`cached_attention` for one query per row, written as multiply-reduce passes over the slots
    instead of batched products: XLA:CPU fuses each into one loop that reads the layer's keys or values
    once, at memory speed, where the [B·K] batches of [G, H]·[H, S] products are bound by per-product
    overhead (BENCHMARKS.md, session 17). Each pass reduces over its operand's major axis (keys
    [B, K, H, S]: over H; values [B, K, S, H]: over S), so the loop's minor axis is a contiguous run of
    outputs: with keys stored [B, K, S, H], a reduction over their minor axis, the 4 layers' attention
    of the bench's 64-row step took 6.98 ms, 4.63 as stored now (BENCHMARKS.md, session 19). Products
    and sums in fp32. A row's result is its own: no reduction crosses rows.

    Args: q [B, 1, N, H]; k [B, K, H, S] and v [B, K, S, H] (already `from_kv`); the rest as
      `cached_attention`.
    Returns: [B, 1, N, H] in q's dtype.
    """
    B, T, N, H = q.shape
    K = k.shape[1]
    mask = attention_mask(q_segment, kv_segment, q_index, kv_index)[:, 0]  # [B, S]
    query = q.reshape(B, K, N // K, H, 1).astype(jnp.float32)
    scores = jnp.sum(query * k[:, :, None].astype(jnp.float32), axis=-2) * H**-0.5  # [B, K, G, S]
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, NEG_INF), axis=-1)
    out = jnp.sum(probs[..., None] * v[:, :, None].astype(jnp.float32), axis=-2)  # [B, K, G, H]
    return out.reshape(B, T, N, H).astype(q.dtype)


def decode_attention(q, cache_k, cache_v, layer, q_segment, kv_segment, q_index, kv_index, *,
                     block_size: int | None = None):
    """One query per row over layer `layer` of a KV cache (keys [L, B, K, H, S], values [L, B, K, S, H]):
    `cached_attention` for T = 1 that reads only the slots some row can see.

    The slots are read in blocks of `block_size` with an online softmax, up to the block holding the
    furthest row's slot, each block sliced straight out of the stacked cache: a decode step costs what
    the rows' contexts need, not the cache's length (the recipe's 8,192 and 32,768 slots; a 64-row step
    at 1,024 slots and position 192 went 218 -> 74 ms on CPU; BENCHMARKS.md, "Decode attention").
    A block past a row's own slot is an exact no-op for it (every score masked: nothing added, nothing
    rescaled), and each row's products are its own, so a row's output does not depend on the other
    rows of its batch: the continuous sampler's samples stay independent of the pool. A cache of at
    most one block is read in one pass over the layer: `decode_one_pass` on CPU, `cached_attention`
    elsewhere. A per-layer cache (the sampler's) comes as a stack of one layer ([1, B, K, ...]).

    The cache is read as stored (`kv_storage_dtype`): XLA:CPU slices a bf16 array by converting the
    slice's whole operand to fp32, and hoists that conversion of a loop-invariant operand out of the
    loop, which made an fp32 copy of the whole stacked pool (the 4B recipe's CPU plan: validation
    burst 17.73 -> 30.10 GiB); its uint16 bits are sliced as they are.

    Args: q [B, 1, N, H]; cache_k [L, B, K, H, S]; cache_v [L, B, K, S, H]; layer: [] int; q_segment [B, 1];
      kv_segment [B, S]; q_index [1] or [B, 1] (each row's slot); kv_index [S] must be the slot
      numbers 0..S-1 (the loop stops after the block holding max(q_index)).
    Returns: [B, 1, N, H] in q's dtype.
    """
    B, T, N, H = q.shape
    _, _, K, S, _ = cache_v.shape
    if T != 1:
        raise ValueError(f"decode_attention takes one query per row, got {T}")
    block = min(block_size or decode_block_size(S, cache_k.shape[0]), S)
    if block == S:
        k, v = (from_kv(jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False), q.dtype) for x in (cache_k, cache_v))
        if target_platform() == "cpu":
            return decode_one_pass(q, k, v, q_segment, kv_segment, q_index, kv_index)
        return cached_attention(q, k.swapaxes(-1, -2), v, q_segment, kv_segment, q_index, kv_index)
    G = N // K
    q_index = jnp.broadcast_to(q_index.reshape(-1, 1) if q_index.ndim == 2 else q_index[None], (B, 1))[:, 0]  # [B]
    query = q.reshape(B, K, G, H)
    blocks = jnp.max(q_index) // block + 1  # through the block of the furthest row's slot

    def one_block(carry):
        i, top, total, acc = carry
        # The last block may be partial: read the final `block` slots and mask those already counted.
        start = jnp.minimum(i * block, S - block)
        index = jax.lax.dynamic_slice_in_dim(kv_index, start, block)  # [s]
        segment = jax.lax.dynamic_slice_in_dim(kv_segment, start, block, 1)  # [B, s]
        allowed = attention_mask(q_segment, segment, q_index[:, None], index)[:, 0] & (index >= i * block)  # [B, s]
        keys = from_kv(jax.lax.dynamic_slice(cache_k, (layer, 0, 0, 0, start), (1, B, K, H, block))[0], q.dtype)
        values = from_kv(jax.lax.dynamic_slice(cache_v, (layer, 0, 0, start, 0), (1, B, K, block, H))[0], q.dtype)
        scores = jnp.einsum("BKGH,BKHS->BKGS", query, keys, preferred_element_type=jnp.float32) * H**-0.5
        scores = jnp.where(allowed[:, None, None], scores, NEG_INF)
        new_top = jnp.maximum(top, jnp.max(scores, axis=-1))  # [B, K, G]
        scale, probs = jnp.exp(top - new_top), jnp.exp(scores - new_top[..., None])
        acc = acc * scale[..., None] + jnp.einsum("BKGS,BKSH->BKGH", probs.astype(values.dtype), values,
                                                  preferred_element_type=jnp.float32)
        return i + 1, new_top, total * scale + jnp.sum(probs, axis=-1), acc

    init = (jnp.zeros((), jnp.int32), jnp.full((B, K, G), NEG_INF, jnp.float32), jnp.zeros((B, K, G), jnp.float32),
            jnp.zeros((B, K, G, H), jnp.float32))
    _, _, total, acc = jax.lax.while_loop(lambda carry: carry[0] < blocks, one_block, init)
    return (acc / total[..., None]).reshape(B, 1, N, H).astype(q.dtype)


def _attention_probs(q, k, mask):
    """softmax(q·kᵀ / √H) over the allowed keys: q [B, K, G, T, H], k [B, K, S, H] → fp32 [B, K, G, T, S]."""
    scores = jnp.einsum("BKGTH,BKSH->BKGTS", q, k, preferred_element_type=jnp.float32) * q.shape[-1]**-0.5
    return jax.nn.softmax(jnp.where(mask[:, None, None], scores, NEG_INF), axis=-1)


@jax.custom_vjp
def _softmax_attention(q, k, v, mask):
    """q [B, K, G, T, H], k and v [B, K, S, H], mask [B, T, S] → fp32 [B, K, G, T, H].

    Both forward matmuls run as [B·K] batches of (G·T rows) × (S or H): XLA:CPU's fast path (an output
    in [B, T, ...] order made it contract v's S axis as a transposed operand: 3x slower, and a plain
    dot it cannot run on bf16 operands). The backward is written out for the same reason: autodiff's
    ∂k = ∂Sᵀ·q contracts the [G·T, S] score gradient on its major axis, and XLA:CPU wrote that
    gradient out transposed first (a [B, K, S, G·T] fp32 copy, ~50 ms per layer of the bench's step);
    here ∂kᵀ = qᵀ·∂S and ∂vᵀ = ∂outᵀ·P read the big operands as they lie and transpose only [H, S].
    """
    return _softmax_attention_fwd(q, k, v, mask)[0]


def _softmax_attention_fwd(q, k, v, mask):
    probs = _attention_probs(q, k, mask)
    out = jnp.einsum("BKGTS,BKSH->BKGTH", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out, (q, k, v, mask, probs)


def _softmax_attention_bwd(residuals, grad_out):
    q, k, v, mask, probs = residuals
    grad_out = grad_out.astype(v.dtype)
    grad_probs = jnp.einsum("BKGTH,BKSH->BKGTS", grad_out, v, preferred_element_type=jnp.float32)
    # softmax backward; masked keys get no gradient (rows with no allowed key have uniform probs)
    grad_scores = probs * (grad_probs - jnp.sum(grad_probs * probs, axis=-1, keepdims=True))
    grad_scores = jnp.where(mask[:, None, None], grad_scores, 0.0) * q.shape[-1]**-0.5
    grad_q = jnp.einsum("BKGTS,BKSH->BKGTH", grad_scores.astype(q.dtype), k, preferred_element_type=jnp.float32)
    # These two contract G·T, the big operand's major axis: XLA:CPU runs that as a plain dot, which
    # has no bf16 × bf16 → fp32 kernel, so they take the fp32 scores and probabilities as they are.
    grad_k = jnp.einsum("BKGTH,BKGTS->BKHS", q.astype(jnp.float32), grad_scores)
    grad_v = jnp.einsum("BKGTH,BKGTS->BKHS", grad_out.astype(jnp.float32), probs)
    return (grad_q.astype(q.dtype), grad_k.swapaxes(-1, -2).astype(k.dtype),
            grad_v.swapaxes(-1, -2).astype(v.dtype), None)


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def blockwise_attention(q, k, v, q_segment, kv_segment, q_index, kv_index, *, block_size: int):
    """Memory-efficient attention in pure JAX: queries in blocks of `block_size`.

    Each block's scores are [B, K, G, block, S]; the block body is rematerialized in the backward
    pass (`jax.checkpoint`), so neither pass keeps more than one block's scores alive:
    memory O(T·block), not O(T²). Runs anywhere (the CPU path and the GPU fallback).
    """
    B, T, N, H = q.shape
    if T <= block_size:
        return reference_attention(q, k, v, q_segment, kv_segment, q_index, kv_index)
    num_blocks = -(-T // block_size)
    pad = num_blocks * block_size - T
    if pad:  # padded queries get segment 0: they attend nothing and are cut off below
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        q_segment = jnp.pad(q_segment, ((0, 0), (0, pad)))
        q_index = jnp.pad(q_index, (0, pad))
    q_blocks = q.reshape(B, num_blocks, block_size, N, H).swapaxes(0, 1)  # [nb, B, bq, N, H]
    segment_blocks = q_segment.reshape(B, num_blocks, block_size).swapaxes(0, 1)  # [nb, B, bq]
    index_blocks = q_index.reshape(num_blocks, block_size)  # [nb, bq]

    @jax.checkpoint
    def one_block(args):
        q_block, segment_block, index_block = args
        return reference_attention(q_block, k, v, segment_block, kv_segment, index_block, kv_index)

    out = jax.lax.map(one_block, (q_blocks, segment_blocks, index_blocks))  # [nb, B, bq, N, H]
    return out.swapaxes(0, 1).reshape(B, num_blocks * block_size, N, H)[:, :T]


def target_platform(mesh: jax.sharding.Mesh | None = None) -> str:
    """The platform a trace is compiled for: that of `mesh`'s devices, else of the devices of the mesh
    in context (`plan` compiles for described GPUs from a process whose backend may be the CPU), else
    JAX's backend."""
    if mesh is not None:
        return mesh.devices.flat[0].platform
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)  # None outside a mesh
    return device.platform if device is not None else jax.default_backend()


def _require_gpu() -> None:
    platform = target_platform()
    if platform != "gpu":
        raise RuntimeError(
            f"model.attention='cudnn' needs a CUDA GPU, but the devices compiled for are {platform!r}; "
            "use 'blockwise' (memory-efficient, any backend) or 'reference'"
        )


def cudnn_packed_supported() -> bool:
    """Whether cuDNN's packed (varlen) layout runs on the GPUs compiled for: it needs compute capability
    >= 9.0 (Hopper). An A100/A800 (8.0, the recipe's own GPUs) takes the masked path instead. Asks
    JAX's own check (the process's GPU; `plan.described_gpu_checks` makes it answer for described
    ones); False off a GPU."""
    from jax._src.cudnn.fused_attention_stablehlo import check_compute_capability

    return check_compute_capability("9.0")


def cudnn_attention(q, k, v, q_segment, kv_segment, q_index, kv_index) -> jax.Array:
    """cuDNN flash attention through `jax.nn.dot_product_attention` (GPU only; bf16/fp16 inputs).

    The segment/causal rule is passed as a boolean mask broadcast over heads.
    """
    _require_gpu()
    dtype = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
    mask = attention_mask(q_segment, kv_segment, q_index, kv_index)[:, None]  # [B, 1, T, S]
    out = jax.nn.dot_product_attention(
        q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask, implementation="cudnn"
    )
    return out.astype(q.dtype)


def segment_layout(segment: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """cuDNN's packed ("THD") description of rows whose segments 1..k are contiguous runs: the
    length [B, M] and start offset [B, M + 1] of each segment, -1 for absent ones. Segment 0 tokens
    (padding, anywhere in the row) belong to none."""
    B, T = segment.shape
    ids = jnp.arange(1, max_segments + 1, dtype=segment.dtype)
    member = segment[:, :, None] == ids  # [B, T, M]
    lengths = jnp.sum(member, axis=1, dtype=jnp.int32)  # [B, M]
    starts = jnp.min(jnp.where(member, jnp.arange(T, dtype=jnp.int32)[None, :, None], T), axis=1)
    present = lengths > 0
    seqlen = jnp.where(present, lengths, -1)
    offsets = jnp.concatenate([jnp.where(present, starts, -1), jnp.full((B, 1), -1, jnp.int32)], axis=1)
    return seqlen, offsets


def cudnn_packed_attention(q, k, v, q_segment, kv_segment, q_index, kv_index, *, max_segments: int) -> jax.Array:
    """cuDNN flash attention over packed rows (self-attention without a KV cache: training and the
    log-prob pass). Each segment is passed to cuDNN as its own causal sequence (varlen layout with
    per-row segment lengths and offsets), so no [T, S] mask or bias is read and no block across
    sequences or above the diagonal is computed. Needs segment ids 1..k in contiguous runs (as
    train/packing.py lays them out) and at most `max_segments` per row (`model.attention_max_segments`;
    packing caps rows at it): a row with more gives NaN, which the train step's non-finite guard
    refuses, never a silently wrong result. Padding tokens get zeros.

    Memory: JAX's wrapper describes B × max_segments sequences of up to T tokens, and cuDNN's
    backward workspace grows with that (measured on H100, one 16,384-token row, 32/8 heads of 128,
    fwd+bwd temporaries: 4.3 GiB at 8 segments, 16.4 GiB at 32), which is why the bound is a config
    value and not T."""
    del kv_segment, q_index, kv_index  # self-attention: the same segments; causal within each
    _require_gpu()
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_dpa

    dtype = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
    max_segments = min(q.shape[1], max_segments)
    seqlen, offsets = segment_layout(q_segment, max_segments)
    out = cudnn_dpa(q.astype(dtype), k.astype(dtype), v.astype(dtype), None, None, seqlen, seqlen, offsets, offsets,
                    scale=float(q.shape[-1]) ** -0.5, mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
    valid = (q_segment > 0)[:, :, None, None]
    overflow = jnp.max(q_segment) > max_segments
    out = jnp.where(valid, out, 0).astype(q.dtype)
    return jnp.where(overflow, jnp.nan, out)


def attend(implementation: str, block_size: int) -> Callable:
    """The attention function behind the `model.attention` switch."""
    if implementation == "reference":
        return reference_attention
    if implementation == "blockwise":
        return lambda *args: blockwise_attention(*args, block_size=block_size)
    if implementation == "cudnn":
        return cudnn_attention
    raise ValueError(f"unknown attention implementation {implementation!r}")


def token_chunked(fn: Callable, inputs, chunk_size: int):
    """Applies a position-wise `fn` over chunks of `chunk_size` tokens, rematerializing each chunk in
    the backward pass, so its intermediates (an MLP's [B, T, F], fp32 norm statistics) exist for one
    chunk at a time: memory O(c·F) instead of O(T·F).

    `inputs` is an array or a pytree of arrays, all [B, T, ...]; `fn` maps one chunk of them
    ([B, c, ...]) to a pytree of [B, c, ...] arrays.
    """
    leaves = jax.tree.leaves(inputs)
    B, T = leaves[0].shape[:2]
    if chunk_size <= 0 or T <= chunk_size:
        return fn(inputs)
    num_chunks = -(-T // chunk_size)
    pad = num_chunks * chunk_size - T

    def split(a):  # [B, T, ...] -> [nc, B, c, ...]
        a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
        return a.reshape(B, num_chunks, chunk_size, *a.shape[2:]).swapaxes(0, 1)

    def join(a):  # [nc, B, c, ...] -> [B, T, ...]
        return a.swapaxes(0, 1).reshape(B, num_chunks * chunk_size, *a.shape[3:])[:, :T]

    out = jax.lax.map(jax.checkpoint(fn), jax.tree.map(split, inputs))
    return jax.tree.map(join, out)


def remat_policy(name: str):
    """Named remat policies for the decoder layer (`model.remat_policy`); None means no remat."""
    policies = jax.checkpoint_policies
    if name == "none":
        return None
    if name in FULL_REMAT:  # under full_offload qwen3.full_remat_layers keeps the saved inputs on the host
        return policies.nothing_saveable
    if name == "save_dots":
        return policies.dots_with_no_batch_dims_saveable
    if name == "save_qkv_proj":
        return policies.save_only_these_names("query_proj", "key_proj", "value_proj")
    if name == "save_attention_out":
        return policies.save_only_these_names("attention_out")
    raise ValueError(f"unknown remat policy {name!r}")


__all__ = [
    "NEG_INF", "Proj", "RMSNorm", "apply_rope", "attention_mask", "reference_attention", "cached_attention",
    "decode_attention",
    "blockwise_attention", "cudnn_attention", "cudnn_packed_supported", "attend", "remat_policy",
    "checkpoint_name", "token_chunked", "cast_sharded", "scale_by_weight",
]
