"""Next-token sampling as pure functions of (logits, key): temperature, top-k, top-p, greedy.

The pipeline is vLLM's and HF's: logits / T → top-k → top-p (on the top-k-renormalized
distribution) → draw. Truncation is done by setting excluded logits to -inf, so a draw never lands
outside the support. The log-prob returned with each token is `log_softmax(logits / T)` over the FULL
vocabulary, before any truncation, so it equals the trainer's recomputed log-prob at the same
temperature (see rollout/base.py). Greedy (T = 0) takes the argmax and returns `log_softmax(logits)`.

Which filters run is decided by Python values (static under jit): with the recipe's training
settings (T = 1, top_p = 1, top-k off) no truncation pass over the vocabulary is ever traced.
Top-k is a `lax.top_k`; top-p sorts nothing (a 32-step bisection, see `top_p_mask`).

Ties: top-k and top-p keep every token whose logit equals the last kept one (HF's threshold rule);
with fp32 logits of a real model exact ties are vanishingly rare.

Logits are **vocab-major**, [V, B] (one column per row), because that is how the sampler's LM head
is fastest on CPU: the head weights as the left operand, W [V, D] · hᵀ [D, B]. XLA:CPU's GEMM
(YNNPACK) packs its right operand on every call; as [B, D] · [D, V] that operand is the 311 MB head
of the bench model, and a 64-row decode step's head plus draw took 32.8 ms instead of 31.5 (standard
bench call 12.3 -> 11.9 s; BENCHMARKS.md, session 18). The draw reads the vocabulary in strided
groups (`categorical`) so that every pass reduces over the leading axis, and with the sampler's
carried shift it makes one pass for the group sums instead of two (max, then sums).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mathgrpo.rollout.base import SamplingParams


def scale_logits(logits: jax.Array, temperature: float) -> jax.Array:
    """fp32 logits / T; T = 0 (greedy) leaves them unscaled so log-probs are at T = 1."""
    logits = logits.astype(jnp.float32)
    return logits if temperature == 0 else logits / temperature


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """[V, ...] bool: the k largest logits of each column (and any tied with the k-th). k >= V keeps
    everything. `lax.top_k` works on the last axis: it reads a transposed copy (top-k is off in the
    recipe)."""
    if k >= logits.shape[0]:
        return jnp.ones(logits.shape, bool)
    kth = jax.lax.top_k(jnp.moveaxis(logits, 0, -1), k)[0][..., -1]  # [...]
    return logits >= kth[None]


def _float_to_key(x: jax.Array) -> jax.Array:
    """fp32 → uint32 whose unsigned order is the float order (-0.0 just below +0.0; NaN not handled)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _key_to_float(key: jax.Array) -> jax.Array:
    """The inverse of `_float_to_key`."""
    bits = jnp.where(key >> 31 == 1, key ^ jnp.uint32(0x80000000), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    """[V, ...] bool: each column's nucleus, the smallest set of most likely tokens whose probability reaches p.

    A token is kept iff the probability of all tokens strictly more likely than it is < p, so the most
    likely token is always kept (0 < p) and the set stops at the first token whose cumulative
    probability reaches p; tokens tied with the last kept one are kept. Excluded (-inf) logits have
    probability 0 and are never kept.

    Sort-free and exact: with mass(t) = the fp32 sum of probs over logits > t (non-increasing in t
    also as computed, since each term only switches between 0 and its prob within one fixed
    reduction), a token with logit l is kept iff mass(l) < p. Bisection over the 2^32 fp32 bit
    patterns, in an order-preserving uint32 encoding, keeps mass(hi) < p (hi starts at the max logit)
    and mass(lo) >= p (lo starts at -inf); after 32 halvings hi is the key right after lo, so no logit
    lies strictly between them and `logits > lo` is exactly the kept set, with no snapping to a
    token's value needed. If the whole fp32 mass rounds below p (p within ~1e-7 of 1), lo never moves
    and every finite logit is kept, which is the definition too. Each step is one fused
    compare-select-sum pass over [V, ...]; vs the full sort of the vocabulary it replaced see
    BENCHMARKS.md, "Sampler: sort-free top-p".
    """
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=0)  # [V, ...]
    batch = (1,) + logits.shape[1:]
    lo = jnp.full(batch, _float_to_key(jnp.float32(-jnp.inf)))  # [1, ...] mass(-inf) ≈ 1 (>= p)
    hi = _float_to_key(jnp.max(logits, axis=0, keepdims=True))  # [1, ...] mass(max) = 0 < p

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2  # [1, ...] no overflow: hi >= lo
        mass = jnp.sum(jnp.where(logits > _key_to_float(mid), probs, 0.0), axis=0, keepdims=True)
        reached = mass >= p
        return jnp.where(reached, mid, lo), jnp.where(reached, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return logits > _key_to_float(lo)


def truncate(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Temperature-scaled logits with everything outside top-k, then outside the top-p nucleus, at -inf."""
    if top_k >= 1:
        logits = jnp.where(top_k_mask(logits, top_k), logits, -jnp.inf)
    if top_p < 1.0:
        logits = jnp.where(top_p_mask(logits, top_p), logits, -jnp.inf)
    return logits


def uniforms(rng: jax.Array, rows: int) -> jax.Array:
    """One uniform in [0, 1) per row: from one key, or from each row's own key (`rng` of shape [rows]),
    so that a row's draw does not depend on which other rows share its batch."""
    if rng.shape == ():
        return jax.random.uniform(rng, (rows,), jnp.float32)
    return jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(rng)


def vocab_block(vocab_size: int, target: int = 1024) -> int:
    """How many tokens each of `categorical`'s groups holds: a divisor of the vocabulary near `target`
    (within 4×), so the [V, B] logits reshape to [block, V / block, B] in place; else `target` (and a
    padded copy). Qwen3's 151,936 = 1,187 × 128: 128 groups of 1,187 tokens."""
    divisors = [d for d in range(max(1, target // 4), min(vocab_size, 4 * target) + 1) if vocab_size % d == 0]
    return min(divisors, key=lambda d: abs(d - target)) if divisors else min(target, vocab_size)


# `categorical`'s shifted draw keeps a column's Σw = Σ exp(logits − shift) inside this range; outside it
# (the shift was off by more than ~41 nats) the column is redone shifted by its max. Within it no weight
# overflows and the largest is at least 2^-60 / V: fp32 keeps every weight that can move the sums.
SHIFT_RANGE = (2.0**-60, 2.0**60)


def categorical(rng: jax.Array, logits: jax.Array, block: int | None = None,
                shift: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """One draw per column from softmax(logits) ([V, B] fp32, -inf = excluded) by inverse CDF.

    `jax.random.categorical` draws a Gumbel per vocabulary entry (two logs each): on CPU that cost
    more per decode step than the whole LM head at V = 151,936 (BENCHMARKS.md). This uses ONE uniform
    per row and two passes over the logits: their max, then the totals of w = exp(logits − max) over
    G = V / `block` groups (`block` default `vocab_block(V)`, a divisor of V). Given `shift` ([B], an
    estimate of each column's log-normalizer: the sampler carries a row's previous one), w = exp(logits −
    shift) and the pass for the max is skipped; a column whose Σw falls outside `SHIFT_RANGE` is redone
    shifted by its max, in a branch that runs only when some column needs it and replaces only those
    columns, so a column's draw depends on its own logits and shift alone. Group g holds the tokens
    g, g + G, g + 2G, ...: the logits reshape in place to [block, G, B] and both passes reduce over the
    leading axis, which XLA:CPU does at memory speed on vocab-major logits (contiguous groups, a reduce
    over the middle axis, took 5.0–6.6 ms instead of 2.4 at 64 rows). The group where u·Σw falls comes from
    the cumulative sum over the G groups; the token inside it from the cumulative sum over that group's
    weights, recomputed from its `block` logits. Any fixed partition of the vocabulary draws from the
    same distribution. Exact up to fp32 rounding of the sums; a token of weight 0 (excluded) is never
    returned: a draw rounding past the last positive weight takes that token.

    Returns (tokens [B] int32, logsumexp(logits) [B]): the normalizer comes free with the group totals.
    """
    V, B = logits.shape
    block = block or vocab_block(V)
    groups = -(-V // block)
    if V % block:  # no divisor near the target: a padded copy, excluded (-inf) entries at the end
        logits = jnp.pad(logits, ((0, groups * block - V), (0, 0)), constant_values=-jnp.inf)
    grid = logits.reshape(block, groups, B)  # grid[j, g] = token j·G + g

    def group_totals(peak: jax.Array) -> jax.Array:  # [B, G]: the running totals of exp(grid − peak)
        return jnp.cumsum(jnp.sum(jnp.exp(grid - peak), axis=0), axis=0).T

    if shift is None:
        peak = jnp.max(logits, axis=0)  # [B]
        group_cdf = group_totals(peak)
    else:
        group_cdf = group_totals(shift)
        off = ~((group_cdf[:, -1] >= SHIFT_RANGE[0]) & (group_cdf[:, -1] <= SHIFT_RANGE[1]))  # [B] (NaN: off)

        def refit(group_cdf):
            peak = jnp.where(off, jnp.max(logits, axis=0), shift)
            return peak, jnp.where(off[:, None], group_totals(peak), group_cdf)

        peak, group_cdf = jax.lax.cond(jnp.any(off), refit, lambda group_cdf: (shift, group_cdf), group_cdf)
    target = uniforms(rng, B)[:, None] * group_cdf[:, -1:]  # [B, 1] in [0, Σw)
    positive = group_cdf > jnp.concatenate([jnp.zeros((B, 1)), group_cdf[:, :-1]], axis=-1)
    chosen = jnp.sum(group_cdf <= target, axis=-1)  # [B] first group whose cdf exceeds the target
    last_positive = groups - 1 - jnp.argmax(positive[:, ::-1], axis=-1)
    chosen = jnp.minimum(chosen, last_positive)
    before = jnp.where(chosen > 0, jnp.take_along_axis(group_cdf, jnp.maximum(chosen - 1, 0)[:, None], -1)[:, 0], 0.0)
    inner = jnp.exp(grid[:, chosen, jnp.arange(B)].T - peak[:, None])  # [B, block]: the chosen groups' weights
    inner_cdf = jnp.cumsum(inner, axis=-1)
    index = jnp.sum(inner_cdf <= (target[:, 0] - before)[:, None], axis=-1)  # [B]
    last_inner = block - 1 - jnp.argmax((inner > 0)[:, ::-1], axis=-1)
    lse = peak + jnp.log(group_cdf[:, -1])
    return (jnp.minimum(index, last_inner) * groups + chosen).astype(jnp.int32), lse


def sample(rng: jax.Array, logits: jax.Array, params: SamplingParams,
           shift: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws one token per row and returns it with its untruncated log-prob.

    Args:
      rng: a PRNG key, or one per row ([B]); used once (derive a fresh one per step at the call site).
      logits: [V, B] raw model logits, vocab-major (the module docstring).
      params: temperature, top_k, top_p are read (as Python values: static under jit).
      shift: [B] or None: `categorical`'s shift, the previous step's third output for the same rows.
    Returns: (tokens [B] int32, logprobs [B] fp32, normalizer [B] fp32) with logprobs =
      log_softmax(logits / T)[token] (greedy: at T = 1) and normalizer the log of the drawn
      distribution's total (the next step's `shift`).
    """
    scaled = scale_logits(logits, params.temperature)  # [V, B]
    if params.greedy:
        tokens, lse = jnp.argmax(scaled, axis=0).astype(jnp.int32), jax.nn.logsumexp(scaled, axis=0)
        normalizer = lse
    else:
        truncated = truncate(scaled, params.top_k, params.top_p)
        tokens, normalizer = categorical(rng, truncated, shift=shift)  # [B] each
        # The log-prob's normalizer is over the full vocabulary.
        lse = normalizer if truncated is scaled else jax.nn.logsumexp(scaled, axis=0)
    token_logprobs = scaled[tokens, jnp.arange(tokens.shape[0])] - lse  # [B]: each column's token
    return tokens, token_logprobs, normalizer
