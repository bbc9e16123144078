"""The LM head's log-prob and entropy, fused: vocabulary blocks, online log-sum-exp, hand-written VJP.

For N rows of final hidden states h [N, D], the head W [D, V] and one target token per row:

    x = h·W / T                      logits at temperature T, [N, V], never materialized whole
    logprob = x[target] − lse(x)     entropy = lse(x) − Σ_v p_v x_v  (verl's entropy_from_logits)

The forward pass walks the rows in blocks of `row_block` and, inside each, the vocabulary in blocks of
~`vocab_block` columns, keeping a running max m, Σexp(x − m) and Σexp(x − m)·x per row (the online
softmax of flash attention). A [row_block, vocab_block] tile of logits is all that exists at once, so
its max, exp and both sums run out of cache instead of making four passes over a [N, V] array in
memory (XLA:CPU, [1280, 512] × [512, 151,936]: matmul + log-sum-exp 1.84 s whole, 1.21 s in vocabulary
blocks; BENCHMARKS.md).

Rows from `count` on are skipped (the loops run over ceil(count / row_block) blocks and those rows
give 0): the caller puts the rows it needs first, so a micro-batch pays only for its response tokens.

Backward, with g and e the cotangents of logprob and entropy, p = softmax(x) and x̄ = Σ p·x:

    ∂/∂x = g·(onehot(target) − p) + e·p·(x̄ − x)        then ∂h = ∂x·Wᵀ / T,  ∂W = hᵀ·∂x / T

walked vocabulary block by vocabulary block (each block's ∂W is one matmul over all the scored rows,
∂h is carried). `save_logits=False` recomputes each tile's logits (memory O(row_block·vocab_block),
two matmuls in the backward pass besides the forward's one: the recipe's setting); `save_logits=True`
keeps the forward's fp32 tiles ([N, V] bytes) and skips that matmul.
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
    """h [N, D] → [nr, rb, D], targets → [nr, rb], and how many row blocks hold rows < count."""
    N, D = h.shape
    nr = N // row_block
    active = (jnp.minimum(count, N) + row_block - 1) // row_block
    return h.reshape(nr, row_block, D), targets.reshape(nr, row_block), active


def _forward(h, kernel, targets, count, *, vocab: int, temperature: float, row_block: int, vocab_block: int,
             save: bool):
    """(logprob [N], entropy [N], lse [N], mean logit x̄ [N], saved tiles [nr, nb, rb, vb] or None).

    Vocabulary blocks outside, row blocks inside: each block of the kernel is sliced once (not once per
    row block) and each tile is written straight into the saved-tile buffer; the running max and sums
    of every row are carried across the vocabulary blocks."""
    N = h.shape[0]
    vb = vocab_block
    nb = kernel.shape[1] // vb
    rows, row_targets, active = _row_blocks(h, targets, count, row_block)
    nr = rows.shape[0]

    def vocab_step(carry, b):
        w = _kernel_block(kernel, b, vb)

        def row_body(r, carry):
            peak, total, weighted, target_logit = (a[r] for a in carry[:4])  # [rb] each
            x = _tile_logits(rows[r], w, b, vocab, temperature)  # [rb, vb]
            new_peak = jnp.maximum(peak, jnp.max(x, axis=-1))
            scale = jnp.exp(peak - new_peak)
            e = jnp.exp(x - new_peak[:, None])
            total = total * scale + jnp.sum(e, axis=-1)
            weighted = weighted * scale + jnp.sum(e * x, axis=-1)
            local = row_targets[r] - b * vb
            hit = (local >= 0) & (local < vb)
            picked = jnp.take_along_axis(x, jnp.clip(local, 0, vb - 1)[:, None], axis=-1)[:, 0]
            target_logit = target_logit + jnp.where(hit, picked, 0.0)
            out = tuple(jax.lax.dynamic_update_index_in_dim(a, v, r, 0)
                        for a, v in zip(carry[:4], (new_peak, total, weighted, target_logit)))
            if save:
                out += (jax.lax.dynamic_update_slice(carry[4], x[None, None], (r, b, 0, 0)),)
            return out

        return jax.lax.fori_loop(0, active, row_body, carry), None

    zeros = jnp.zeros((nr, row_block), jnp.float32)
    init = (jnp.full((nr, row_block), -jnp.inf, jnp.float32), zeros, zeros, zeros)
    if save:
        init += (jnp.zeros((nr, nb, row_block, vb), jnp.float32),)
    carry, _ = jax.lax.scan(vocab_step, init, jnp.arange(nb))
    peak, total, weighted, target_logit = carry[:4]
    live = (jnp.arange(nr) < active)[:, None]  # row blocks past `active` were never computed: 0, not nan
    lse = jnp.where(live, peak + jnp.log(total), 0.0)
    mean_logit = jnp.where(live, weighted / total, 0.0)
    logprob, entropy = jnp.where(live, target_logit - lse, 0.0), lse - mean_logit
    return (*(o.reshape(N) for o in (logprob, entropy, lse, mean_logit)), (carry[4] if save else None))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _fused(h, kernel, targets, count, vocab, temperature, row_block, vocab_block, save):
    logprob, entropy, *_ = _forward(h, kernel, targets, count, vocab=vocab, temperature=temperature,
                                    row_block=row_block, vocab_block=vocab_block, save=False)
    return logprob, entropy


def _fused_fwd(h, kernel, targets, count, vocab, temperature, row_block, vocab_block, save):
    logprob, entropy, lse, mean_logit, tiles = _forward(
        h, kernel, targets, count, vocab=vocab, temperature=temperature, row_block=row_block,
        vocab_block=vocab_block, save=save)
    return (logprob, entropy), (h, kernel, targets, count, lse, mean_logit, tiles)


def _fused_bwd(vocab, temperature, row_block, vocab_block, save, residuals, cotangents):
    h, kernel, targets, count, lse, mean_logit, tiles = residuals
    g_logprob, g_entropy = cotangents  # [N] each
    N, D = h.shape
    vb = vocab_block
    nb = kernel.shape[1] // vb
    rows, row_targets, active = _row_blocks(h, targets, count, row_block)
    nr = rows.shape[0]
    per_row = [a.reshape(nr, row_block) for a in (lse, mean_logit, g_logprob, g_entropy)]
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
            lse_r, mean_r, g_r, e_r = (a[r] for a in per_row)
            if save:
                x = jax.lax.dynamic_slice(tiles, (r, b, 0, 0), (1, 1, row_block, vb))[0, 0]
            else:
                x = _tile_logits(rows[r], w, b, vocab, temperature)
            p = jnp.exp(x - lse_r[:, None])  # [rb, vb]; 0 on padding columns
            onehot = (b * vb + jnp.arange(vb))[None, :] == row_targets[r][:, None]
            dx = g_r[:, None] * (onehot - p) + e_r[:, None] * p * (mean_r[:, None] - x)
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


def fused_logprobs(hidden, kernel, targets, count, *, temperature: float = 1.0, row_block: int = 512,
                   vocab_block: int = 8192, save_logits: bool = False):
    """Log-prob of `targets` and entropy under logits hidden·kernel / temperature, row by row.

    hidden [N, D] and kernel [D, V] in the compute dtype, targets [N] int, count [] int: rows ≥ count
    are not computed and give 0 (put the needed rows first). Differentiable in hidden and kernel
    through both outputs. Returns (logprob [N], entropy [N]) fp32.
    """
    N, D = hidden.shape
    if kernel.shape[0] != D:
        raise ValueError(f"kernel {kernel.shape} does not match hidden size {D}; expected [D, V]")
    row_block = max(1, min(row_block, N))
    pad = -N % row_block
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    targets = jnp.pad(jnp.asarray(targets, jnp.int32), (0, pad))
    vocab = kernel.shape[1]
    block = vocab_block_size(vocab, vocab_block)
    padded = _padded_kernel(kernel, block)
    logprob, entropy = _fused(hidden, padded, targets, jnp.asarray(count, jnp.int32), vocab,
                              float(temperature), row_block, block, bool(save_logits))
    needed = jnp.arange(N) < count  # the last computed block may run past count
    return jnp.where(needed, logprob[:N], 0.0), jnp.where(needed, entropy[:N], 0.0)
