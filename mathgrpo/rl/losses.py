"""The GRPO objective as verl computes it: the clipped policy loss, its one aggregation, the KL penalty.

The objective of one training step (docs/recipe.md §0, §2). For a prompt q with G responses o_1..o_G
(config and verl: `rollout.n`) and binary scores r_i:

    A_i   = (r_i - mean(r)) / (std(r) + eps)                       advantages.py
            std unbiased (/(G-1)); G = 1 → mean 0, std 1; eps = 1e-6 (`adv_eps`);
            `norm_adv_by_std=False` drops the division (Dr.GRPO).
    ρ_t   = exp(clamp(log π_θ(o_t) - log π_old(o_t), -20, 20))
    ℓ_t   = max(-A ρ_t, -A clip(ρ_t, 1-ε_low, 1+ε_high))            (`clip_ratio_low/high`)
            and for A < 0: min(ℓ_t, -A c)                            dual clip, c = `clip_ratio_c` = 3
    ℓ_t  *= w_t   with w_t = min(exp(clamp(log π_old - log π_rollout, -20, 20)), 2)   TIS (rollout_correction.py)
    L     = Σ_t ℓ_t m_t / Σ_t m_t                                    `loss_agg_mode: token-mean`
    L    += β·KL(π_θ‖π_ref) (`use_kl_loss`, off) − α·entropy (`entropy_coeff`, 0)

Log-probs are of temperature-scaled logits (logits / T, T = rollout temperature), as verl's
actor. In the recipe (one mini-batch, one epoch) π_old = π_θ at the step, so ρ ≡ 1, clipping is
inert, pg_clipfrac = ppo_kl = 0 and the gradient is −A·w·∇log π_θ: the train step therefore takes
π_old as the detached current log-probs of the same forward pass (no second pass; docs/design.md, "On-policy fusion").

Where we depart from verl, on purpose:
- `token-mean` is by default the true token mean over the whole mini-batch (all micro-batches and
  devices), like upstream verl's new engine (`batch_num_tokens`). The recipe's legacy dp_actor
  weighted each micro-batch's token mean by its share of sequences (docs/recipe.md §2.4); `loss_scaling:
  verl_legacy` in the train step reproduces that.
- The seq-mean modes divide by the number of non-empty sequences in the mini-batch, and
  `seq-mean-token-sum-norm` also by a fixed horizon (the max response length), as upstream's
  global agg_loss; verl 0.7's legacy per-micro-batch forms differ only by that weighting.
- Gradient clipping is optax's (scale by max_norm/‖g‖ when ‖g‖ > max_norm); torch adds 1e-6 to ‖g‖.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mathgrpo.config import KL_TYPES, LOSS_AGG_MODES

LOG_RATIO_BOUND = 20.0  # verl's clamp on log-ratios before exp
AGGREGATIONS = LOSS_AGG_MODES


def masked_mean(values, mask, axis=None):
    """verl_F.masked_mean: Σ(v·m) / (Σm + 1e-8)."""
    return jnp.sum(values * mask, axis=axis) / (jnp.sum(mask, axis=axis) + 1e-8)


def sequence_sums(values, mask, *, sequence_index=None, num_sequences: int | None = None):
    """Per-sequence Σ values·mask and token counts Σ mask, [S] each.

    Rows are sequences ([B, T], S = B) unless `sequence_index` is given: then the rows are packed and
    each token carries the index of its sequence (`num_sequences` for tokens of none), S = num_sequences.
    """
    mask = mask.astype(jnp.float32)
    if sequence_index is None:
        return jnp.sum(values * mask, axis=-1), jnp.sum(mask, axis=-1)
    ids = sequence_index.ravel()
    sums = jax.ops.segment_sum((values * mask).ravel(), ids, num_sequences + 1)[:num_sequences]
    counts = jax.ops.segment_sum(mask.ravel(), ids, num_sequences + 1)[:num_sequences]
    return sums, counts


def sequence_log_ratio(logprobs, old_logprobs, mask, *, sequence_index=None, num_sequences: int | None = None):
    """GSPO's detached per-sequence mean log-ratio, broadcast back to every token (verl divides by the
    token count clamped to 1). Rows are sequences, or packed ones (`sequence_sums`)."""
    sums, counts = sequence_sums(jax.lax.stop_gradient(logprobs - old_logprobs), mask,
                                 sequence_index=sequence_index, num_sequences=num_sequences)
    means = sums / jnp.maximum(counts, 1.0)
    if sequence_index is None:
        return jnp.broadcast_to(means[:, None], logprobs.shape)
    return jnp.concatenate([means, jnp.zeros((1,), means.dtype)])[sequence_index]  # none: 0


def policy_token_losses(logprobs, old_logprobs, advantages, *, clip_low: float = 0.2,
                        clip_high: float = 0.2, clip_c: float = 3.0, is_weights=None, seq_log_ratio=None):
    """Per-token PPO losses (verl compute_policy_loss_vanilla): clip-higher and dual clip.

    With `seq_log_ratio` (see `sequence_log_ratio`) it is verl's GSPO instead: the ratio of every
    token is exp(sg(sequence mean log-ratio) + log π_t − sg(log π_t)), clamped above at e^10, with
    the two-sided clip and no dual clip.
    Returns: (pg_losses, log_ratio, clipped [bool], clipped_lower [bool]), each like logprobs.
    """
    if clip_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual clip), got {clip_c}")
    log_ratio = logprobs - old_logprobs
    if seq_log_ratio is not None:
        gspo_log_ratio = jnp.minimum(jax.lax.stop_gradient(seq_log_ratio) + logprobs
                                     - jax.lax.stop_gradient(logprobs), 10.0)
        ratio = jnp.exp(gspo_log_ratio)
    else:
        log_ratio = jnp.clip(log_ratio, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        ratio = jnp.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clip1 = jnp.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    if seq_log_ratio is not None:
        pg_losses, clipped_lower = clip1, jnp.zeros_like(clipped)
    else:
        loss_dual = -advantages * clip_c
        pg_losses = jnp.where(advantages < 0, jnp.minimum(loss_dual, clip1), clip1)
        clipped_lower = (clip1 > loss_dual) & (advantages < 0)
    if is_weights is not None:
        pg_losses = pg_losses * jax.lax.stop_gradient(is_weights)
    return pg_losses, log_ratio, clipped, clipped_lower


def aggregate(per_token, mask, mode: str = "token-mean", *, token_count=None, sequence_count=None,
              horizon: int | None = None, sequence_index=None, num_sequences: int | None = None):
    """verl agg_loss: the one aggregation, used by `policy_loss` and the train step.

    Rows are sequences ([B, T]), or packed rows whose tokens carry their sequence's index
    (`sequence_index`, `num_sequences`: see `sequence_sums`). Without counts: verl's per-batch forms
    (masked means with its 1e-8). With `token_count` / `sequence_count` (totals over a whole
    mini-batch): the global forms, so partial sums over micro-batches add up to the mini-batch loss
    exactly. `seq-mean-token-sum-norm` also divides by `horizon` (default T).
    """
    mask = mask.astype(per_token.dtype)
    if mode == "token-mean":
        total = jnp.sum(per_token * mask)
        return total / (jnp.sum(mask) + 1e-8) if token_count is None else total / token_count
    if mode not in AGGREGATIONS:
        raise ValueError(f"loss_agg_mode={mode!r}; expected one of {AGGREGATIONS}")
    seq_losses, tokens_per_seq = sequence_sums(per_token, mask, sequence_index=sequence_index,
                                               num_sequences=num_sequences)
    if mode == "seq-mean-token-mean":
        seq_losses = seq_losses / (tokens_per_seq + 1e-8)
    seq_mask = (tokens_per_seq > 0).astype(per_token.dtype)
    if sequence_count is None:
        loss = masked_mean(seq_losses, seq_mask)
    else:
        loss = jnp.sum(seq_losses * seq_mask) / sequence_count
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (horizon if horizon is not None else per_token.shape[-1])
    return loss


def policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low: float = 0.2, clip_high: float = 0.2,
                clip_c: float = 3.0, is_weights=None, agg: str = "token-mean", importance_level: str = "token",
                token_count=None, sequence_count=None, horizon: int | None = None):
    """verl's vanilla PPO policy loss, aggregated. All inputs [B, T] (advantages broadcast per token).

    `importance_level="sequence"` is verl's GSPO loss (pass agg="seq-mean-token-mean", as verl forces).

    Returns: (loss, metrics) with metrics `pg_loss`, `pg_clipfrac`, `pg_clipfrac_lower`, `ppo_kl`
    (verl: masked means over the response tokens; ppo_kl = mean(-log-ratio)).
    """
    mask = mask.astype(jnp.float32)
    if importance_level not in ("token", "sequence"):
        raise ValueError(f"importance_level={importance_level!r}; expected 'token' or 'sequence'")
    seq_ratio = sequence_log_ratio(logprobs, old_logprobs, mask) if importance_level == "sequence" else None
    pg_losses, log_ratio, clipped, clipped_lower = policy_token_losses(
        logprobs, old_logprobs, advantages, clip_low=clip_low, clip_high=clip_high, clip_c=clip_c,
        is_weights=is_weights, seq_log_ratio=seq_ratio)
    loss = aggregate(pg_losses, mask, agg, token_count=token_count, sequence_count=sequence_count,
                     horizon=horizon)
    metrics = {
        "pg_loss": loss,
        "pg_clipfrac": masked_mean(clipped.astype(jnp.float32), mask),
        "pg_clipfrac_lower": masked_mean(clipped_lower.astype(jnp.float32), mask),
        "ppo_kl": masked_mean(-log_ratio, mask),
    }
    return loss, metrics


def kl_penalty(logprobs, ref_logprobs, kind: str = "low_var_kl"):
    """Per-token KL estimate to a reference policy (verl kl_penalty): `kl` (k1), `mse` (k2),
    `low_var_kl` (k3, clamped to ±10)."""
    if kind == "kl":
        return logprobs - ref_logprobs
    if kind == "mse":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if kind == "low_var_kl":
        kl = jnp.clip(ref_logprobs - logprobs, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        return jnp.clip(jnp.exp(kl) - kl - 1.0, -10.0, 10.0)
    raise ValueError(f"kl_loss_type={kind!r}; expected one of {KL_TYPES}")
