"""The LM head's log-probs, entropy and top-k, fused: vocabulary blocks, online log-sum-exp, hand-written VJP.

For N rows of final hidden states h [N, D], the head W [D, V] and K target ids v_1 … v_K per row (a [N]
target vector is K = 1 with the K axis dropped):

    x = h·W / T                      logits at temperature T, [N, V], never materialized whole
    logprob_k = x[v_k] − lse(x)      entropy = lse(x) − Σ_v p_v x_v  (verl's entropy_from_logits)
    top-k: the k largest x_v of the row, their ids, and x_v − lse(x)  (`fused_topk`; equal values: lower id first)

The forward pass walks the rows in blocks of `row_block` and, inside each, the vocabulary in blocks of
~`vocab_block` columns, keeping a running max m, Σexp(x − m) and Σexp(x − m)·x per row (the online
softmax of flash attention), plus x[v_k] picked from the block holding v_k. A [row_block, vocab_block] tile
of logits is all that exists at once, so its max, exp and both sums run out of cache instead of making four
passes over a [N, V] array in memory (XLA:CPU, [1280, 512] × [512, 151,936]: matmul + log-sum-exp 1.84 s
whole, 1.21 s in vocabulary blocks; BENCHMARKS.md).

Rows from `count` on are skipped (the loops run over ceil(count / row_block) blocks and those rows
give 0): the caller puts the rows it needs first, so a micro-batch pays only for its response tokens.

Top-k rides on the same walk. Each row carries its k best (value, id) pairs so far; a tile adds its own k
best (lax.top_k of the tile), the running list and the tile's are concatenated running first, and lax.top_k
keeps the k best of the 2k. lax.top_k breaks ties by position, lower first, so the order it realizes on the
whole row is "larger value, then lower id"; the merge keeps exactly that order: the running ids all come
from earlier blocks and are lower than every id of the tile, they sit first in the concatenation, and each
list is itself in that order, so among equal values concatenation position follows id. Every one of a row's
k best ids is among its own block's k best, so each merge holds the k best of the columns walked so far,
and after the last block the ids equal lax.top_k of the full row, ties included (within a block, across
block boundaries). A last block that runs past V has padding columns at the lowest finite float with the
highest ids: they lose to every real column, one of equal value as well, so with k ≤ V none is ever picked.
The log-probs are value − lse with the lse of the same walk. The top-k carries no gradient (its ids are data
for the scoring pass); with `targets` the same walk also returns the log-probs at given ids, so a teacher's
own top-k and its log-probs at the student's ids cost one matmul over the vocabulary.

Backward, with g [N, K] and e [N] the cotangents of logprob and entropy, p = softmax(x) and x̄ = Σ p·x:

    ∂/∂x = Σ_k g_k·onehot(v_k) − (Σ_k g_k)·p + e·p·(x̄ − x)        then ∂h = ∂x·Wᵀ / T,  ∂W = hᵀ·∂x / T

walked vocabulary block by vocabulary block (each block's ∂W is one matmul over all the scored rows,
∂h is carried). The one-hot sum is a scatter-add of the g_k into the [row_block, vocab_block] tile, so an
id listed twice in a row gets both cotangents and nothing of size [N, V] or [rows, V, K] exists.
`save_logits=False` recomputes each tile's logits (memory O(row_block·vocab_block), two matmuls in the
backward pass besides the forward's one: the recipe's setting); `save_logits=True` keeps the forward's fp32
tiles ([N, V] bytes) and skips that matmul.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def vocab_block_size(vocab: int, target: int) -> int:
    """The largest divisor of `vocab` in [target / 4, target] (Qwen3's 151,936 and 8,192 → 4,748), so
    blocks tile the vocabulary without padding; `target` itself when no such divisor exists."""
    if vocab <= target:
        return vocab
    for size in range(target, max(target // 4, 1) - 1, -1):
        if vocab % size == 0:
            return size
    return target


def _padded_kernel(kernel, block: int):
    """[D, V] → [D, nb·block]: zero columns pad the last block (no copy when block divides V)."""
    pad = -kernel.shape[1] % block
    return jnp.pad(kernel, ((0, 0), (0, pad))) if pad else kernel


def _kernel_block(kernel, b, block: int):
    """Columns [b·block, (b+1)·block) of the [D, nb·block] kernel: sliced where it is used, so the kernel
    is never copied into a blocked layout (a [D, V] transpose each way: 311 MB for the bench's fp32
    head, 0.78 GB for 4B's bf16 one)."""
    return jax.lax.dynamic_slice_in_dim(kernel, b * block, block, axis=1)


def _tile_logits(h, w, b, vocab: int, temperature: float):
    """Logits of rows h [r, D] against block b, w [D, vb] → fp32 [r, vb]. Padding columns get the lowest
    finite float, not −inf: exp gives 0 there and 0·x stays 0 in the entropy sums."""
    x = jnp.dot(h, w, preferred_element_type=jnp.float32) / temperature
    vb = w.shape[1]
    if vocab % vb:  # only a padded last block has columns ≥ vocab
        columns = b * vb + jnp.arange(vb)
        x = jnp.where(columns[None, :] < vocab, x, jnp.finfo(jnp.float32).min)
    return x


def _row_blocks(h, targets, count, row_block: int):
    """h [N, D] → [nr, rb, D], targets [N, K] → [nr, rb, K], and how many row blocks hold rows < count."""
    N, D = h.shape
    nr = N // row_block
    active = (jnp.minimum(count, N) + row_block - 1) // row_block
    return h.reshape(nr, row_block, D), targets.reshape(nr, row_block, targets.shape[1]), active


def _merge_top_k(values, ids, x, offset, k: int):
    """The k best of a running list (values, ids [rb, k], best first) and a tile x [rb, vb] whose column j is
    id offset + j, in lax.top_k's order (larger value, then lower id: see the module docstring)."""
    tile_values, tile_columns = jax.lax.top_k(x, min(k, x.shape[-1]))
    values = jnp.concatenate([values, tile_values], axis=-1)  # running first: its ids are the lower ones
    ids = jnp.concatenate([ids, tile_columns + offset], axis=-1)
    values, position = jax.lax.top_k(values, k)
    return values, jnp.take_along_axis(ids, position, axis=-1)


def _forward(h, kernel, targets, count, *, vocab: int, temperature: float, row_block: int, vocab_block: int,
             save: bool, top_k: int = 0):
    """A dict of per-row results: logprob [N, K] (at targets [N, K]; K may be 0), entropy, lse, mean logit x̄
    [N]; `tiles` [nr, nb, rb, vb] with `save`; with `top_k` the k best logits `top_values` (already minus
    lse: log-probs) and their `top_ids` [N, k].

    Vocabulary blocks outside, row blocks inside: each block of the kernel is sliced once (not once per
    row block) and each tile is written straight into the saved-tile buffer; the running max and sums
    of every row are carried across the vocabulary blocks."""
    N = h.shape[0]
    vb = vocab_block
    nb = kernel.shape[1] // vb
    rows, row_targets, active = _row_blocks(h, targets, count, row_block)
    nr, K = rows.shape[0], row_targets.shape[2]

    def vocab_step(carry, b):
        w = _kernel_block(kernel, b, vb)

        def row_body(r, carry):
            old = {name: value[r] for name, value in carry.items() if name != "tiles"}  # [rb] or [rb, ·] each
            x = _tile_logits(rows[r], w, b, vocab, temperature)  # [rb, vb]
            peak = jnp.maximum(old["peak"], jnp.max(x, axis=-1))
            scale = jnp.exp(old["peak"] - peak)
            e = jnp.exp(x - peak[:, None])
            new = dict(peak=peak, total=old["total"] * scale + jnp.sum(e, axis=-1),
                       weighted=old["weighted"] * scale + jnp.sum(e * x, axis=-1))
            if K:
                local = row_targets[r] - b * vb  # [rb, K]
                hit = (local >= 0) & (local < vb)
                picked = jnp.take_along_axis(x, jnp.clip(local, 0, vb - 1), axis=-1)
                new["target"] = old["target"] + jnp.where(hit, picked, 0.0)
            if top_k:
                new["top_values"], new["top_ids"] = _merge_top_k(old["top_values"], old["top_ids"], x, b * vb,
                                                                 top_k)
            out = {name: jax.lax.dynamic_update_index_in_dim(carry[name], value, r, 0) for name, value in new.items()}
            if save:
                out["tiles"] = jax.lax.dynamic_update_slice(carry["tiles"], x[None, None], (r, b, 0, 0))
            return out

        return jax.lax.fori_loop(0, active, row_body, carry), None

    zeros = jnp.zeros((nr, row_block), jnp.float32)
    init = dict(peak=jnp.full((nr, row_block), -jnp.inf, jnp.float32), total=zeros, weighted=zeros)
    if K:
        init["target"] = jnp.zeros((nr, row_block, K), jnp.float32)
    if top_k:  # −inf with id −1: every real column beats them, so after the walk none is left (k ≤ V)
        init["top_values"] = jnp.full((nr, row_block, top_k), -jnp.inf, jnp.float32)
        init["top_ids"] = jnp.full((nr, row_block, top_k), -1, jnp.int32)
    if save:
        init["tiles"] = jnp.zeros((nr, nb, row_block, vb), jnp.float32)
    carry, _ = jax.lax.scan(vocab_step, init, jnp.arange(nb))
    live = (jnp.arange(nr) < active)[:, None]  # row blocks past `active` were never computed: 0, not nan
    lse = jnp.where(live, carry["peak"] + jnp.log(carry["total"]), 0.0)
    mean_logit = jnp.where(live, carry["weighted"] / carry["total"], 0.0)
    out = dict(entropy=lse - mean_logit, lse=lse, mean_logit=mean_logit)
    out["logprob"] = (jnp.where(live[..., None], carry["target"] - lse[..., None], 0.0) if K
                      else jnp.zeros((nr, row_block, 0), jnp.float32))
    if top_k:
        out["top_values"] = jnp.where(live[..., None], carry["top_values"] - lse[..., None], 0.0)
        out["top_ids"] = jnp.where(live[..., None], carry["top_ids"], 0)
    out = {name: value.reshape(N, *value.shape[2:]) for name, value in out.items()}
    out["tiles"] = carry["tiles"] if save else None
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _fused(h, kernel, targets, count, vocab, temperature, row_block, vocab_block, save):
    out = _forward(h, kernel, targets, count, vocab=vocab, temperature=temperature, row_block=row_block,
                   vocab_block=vocab_block, save=False)
    return out["logprob"], out["entropy"]


def _fused_fwd(h, kernel, targets, count, vocab, temperature, row_block, vocab_block, save):
    out = _forward(h, kernel, targets, count, vocab=vocab, temperature=temperature, row_block=row_block,
                   vocab_block=vocab_block, save=save)
    return (out["logprob"], out["entropy"]), (h, kernel, targets, count, out["lse"], out["mean_logit"], out["tiles"])


def _fused_bwd(vocab, temperature, row_block, vocab_block, save, residuals, cotangents):
    h, kernel, targets, count, lse, mean_logit, tiles = residuals
    g_logprob, g_entropy = cotangents  # [N, K], [N]
    N, D = h.shape
    vb = vocab_block
    nb = kernel.shape[1] // vb
    rows, row_targets, active = _row_blocks(h, targets, count, row_block)
    nr, K = rows.shape[0], row_targets.shape[2]
    per_row = [a.reshape(nr, row_block, *a.shape[1:]) for a in (lse, mean_logit, g_logprob, g_entropy)]
    compute = kernel.dtype
    h_t = h.T  # [D, N]: ∂W = hᵀ·∂x as a plain row-major matmul

    def block_dw(blocks, dx):  # ∂W [D, vb] of the first `blocks` row blocks, one matmul over their rows
        return jnp.dot(h_t[:, :blocks * row_block], dx[:blocks * row_block], preferred_element_type=jnp.float32)

    # One ∂W matmul per vocabulary block over all scored rows (K = active·rb) instead of one per row
    # block summed: no [D, vb] read-modify-write per row block, and a longer contraction. `active` is
    # dynamic, so the matmul is chosen among nr static lengths.
    dw_branches = [functools.partial(block_dw, a) for a in range(1, nr + 1)]

    def vocab_step(carry, b):  # ∂h [nr, rb, D] fp32, ∂W [D, nb·vb] and this block's ∂x [N, vb] buffer
        dh, dkernel, dx_all = carry
        w = _kernel_block(kernel, b, vb)

        def row_body(r, carry):  # row block r's ∂x tile from this vocabulary block, and its ∂h term
            dh, dx_all = carry
            lse_r, mean_r, g_r, e_r = (a[r] for a in per_row)  # g_r [rb, K]
            if save:
                x = jax.lax.dynamic_slice(tiles, (r, b, 0, 0), (1, 1, row_block, vb))[0, 0]
            else:
                x = _tile_logits(rows[r], w, b, vocab, temperature)
            p = jnp.exp(x - lse_r[:, None])  # [rb, vb]; 0 on padding columns
            if K == 1:  # a compare against the one target is cheaper than a scatter
                onehot = (b * vb + jnp.arange(vb))[None, :] == row_targets[r]
                dx = g_r * (onehot - p)
            else:  # Σ_k g_k·onehot(v_k) as a scatter-add: an id listed twice gets both g's
                local = row_targets[r] - b * vb  # [rb, K]
                hit = (local >= 0) & (local < vb)
                picked = jnp.zeros((row_block, vb), jnp.float32).at[
                    jnp.arange(row_block)[:, None], jnp.clip(local, 0, vb - 1)].add(jnp.where(hit, g_r, 0.0))
                dx = picked - jnp.sum(g_r, axis=-1)[:, None] * p
            dx = dx + e_r[:, None] * p * (mean_r[:, None] - x)
            dx = (dx / temperature).astype(compute)  # [rb, vb]
            dh_r = jax.lax.dot_general(dx, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            return (jax.lax.dynamic_update_index_in_dim(dh, dh[r] + dh_r, r, 0),
                    jax.lax.dynamic_update_slice_in_dim(dx_all, dx, r * row_block, axis=0))

        dh, dx_all = jax.lax.fori_loop(0, active, row_body, (dh, dx_all))
        # No scored row (active = 0): no tile was written and the buffer still holds its zeros.
        dw = jax.lax.switch(jnp.clip(active - 1, 0, nr - 1), dw_branches, dx_all)
        return (dh, jax.lax.dynamic_update_slice_in_dim(dkernel, dw.astype(compute), b * vb, axis=1), dx_all), None

    init = (jnp.zeros((nr, row_block, D), jnp.float32), jnp.zeros_like(kernel), jnp.zeros((N, vb), compute))
    (dh, dkernel, _), _ = jax.lax.scan(vocab_step, init, jnp.arange(nb))
    return dh.reshape(N, D).astype(h.dtype), dkernel, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _prepare(hidden, kernel, targets, row_block: int, vocab_block: int):
    """Checks shapes; pads the rows to whole row blocks and the kernel to whole vocabulary blocks. targets:
    [N] or [N, K] int (None: K = 0). Returns (hidden, kernel, targets [N', K], row_block, vocab block)."""
    N, D = hidden.shape
    if kernel.shape[0] != D:
        raise ValueError(f"kernel {kernel.shape} does not match hidden size {D}; expected [D, V]")
    targets = jnp.zeros((N, 0), jnp.int32) if targets is None else jnp.asarray(targets, jnp.int32)
    if targets.ndim not in (1, 2) or targets.shape[0] != N:
        raise ValueError(f"targets {targets.shape} do not match {N} rows; expected [N] or [N, K]")
    targets = targets.reshape(N, -1)
    row_block = max(1, min(row_block, N))
    pad = -N % row_block
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, pad), (0, 0)))
    block = vocab_block_size(kernel.shape[1], vocab_block)
    return hidden, _padded_kernel(kernel, block), targets, row_block, block


def fused_logprobs(hidden, kernel, targets, count, *, temperature: float = 1.0, row_block: int = 512,
                   vocab_block: int = 8192, save_logits: bool = False):
    """Log-prob of `targets` and entropy under logits hidden·kernel / temperature, row by row.

    hidden [N, D] and kernel [D, V] in the compute dtype, targets [N] or [N, K] int (K ids per row, repeats
    allowed), count [] int: rows ≥ count are not computed and give 0 (put the needed rows first).
    Differentiable in hidden and kernel through both outputs. Returns (logprob [N] or [N, K] as targets,
    entropy [N]) fp32.
    """
    N = hidden.shape[0]
    vocab = kernel.shape[1]
    one = jnp.ndim(targets) == 1
    hidden, padded, targets, row_block, block = _prepare(hidden, kernel, targets, row_block, vocab_block)
    logprob, entropy = _fused(hidden, padded, targets, jnp.asarray(count, jnp.int32), vocab,
                              float(temperature), row_block, block, bool(save_logits))
    needed = jnp.arange(N) < count  # the last computed block may run past count
    logprob = jnp.where(needed[:, None], logprob[:N], 0.0)
    return logprob[:, 0] if one else logprob, jnp.where(needed, entropy[:N], 0.0)


def fused_topk(hidden, kernel, k: int, count, *, temperature: float = 1.0, row_block: int = 512,
               vocab_block: int = 8192, targets=None):
    """The k most likely ids of each row under logits hidden·kernel / temperature, and their log-probs, in
    one walk over the vocabulary blocks (no [N, V] array).

    hidden [N, D], kernel [D, V] as for `fused_logprobs`; 1 ≤ k ≤ V; rows ≥ count are not computed and give
    ids 0 and log-probs 0. The ids and order equal jax.lax.top_k(log_softmax(full logits), k), ties
    included (equal values: lower id first; see the module docstring). Not differentiable: the inputs
    are stop_gradient-ed. With `targets` [N] or [N, K] int the same walk also gives the log-probs at
    those ids (as `fused_logprobs`, without its gradient).

    Returns (ids [N, k] int32, logprobs [N, k] fp32), and with targets a third, logprob [N] or [N, K] fp32.
    """
    N = hidden.shape[0]
    vocab = kernel.shape[1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k of k={k} over a vocabulary of {vocab}; expected 1 ≤ k ≤ V")
    one = targets is not None and jnp.ndim(targets) == 1
    hidden, kernel = jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(kernel)
    hidden, padded, row_targets, row_block, block = _prepare(hidden, kernel, targets, row_block, vocab_block)
    out = _forward(hidden, padded, row_targets, jnp.asarray(count, jnp.int32), vocab=vocab,
                   temperature=float(temperature), row_block=row_block, vocab_block=block, save=False, top_k=k)
    needed = (jnp.arange(N) < count)[:, None]  # the last computed block may run past count
    ids = jnp.where(needed, out["top_ids"][:N], 0)
    result = (ids, jnp.where(needed, out["top_values"][:N], 0.0))
    if targets is None:
        return result
    logprob = jnp.where(needed, out["logprob"][:N], 0.0)
    return (*result, logprob[:, 0] if one else logprob)
