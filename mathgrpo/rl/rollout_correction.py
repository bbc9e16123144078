"""Rollout correction: truncated importance sampling (TIS) weights between the trainer's
π_old and the rollout engine's log-probs, and verl's rollout_corr/* diagnostics."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mathgrpo.rl.losses import LOG_RATIO_BOUND, masked_mean


def rollout_is_weights(old_logprobs, rollout_logprobs, mask, *, level: str = "token", threshold: float = 2.0):
    """TIS weights [B, T]: exp(clamp(old - rollout, ±20)) (per token, or per sequence = exp(Σ_t)),
    zero on padding, truncated above at `threshold`; no gradient. Returns (weights, untruncated)."""
    mask = mask.astype(jnp.float32)
    log_ratio = jax.lax.stop_gradient(old_logprobs - rollout_logprobs)
    if level == "token":
        weights = jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    elif level == "sequence":
        total = jnp.sum(log_ratio * mask, axis=-1, keepdims=True)
        weights = jnp.broadcast_to(jnp.exp(jnp.clip(total, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)), log_ratio.shape)
    else:
        raise ValueError(f"rollout_is={level!r}; expected 'token' or 'sequence'")
    untruncated = weights * mask
    return jnp.minimum(untruncated, threshold), untruncated


def rollout_correction_metrics(old_logprobs, rollout_logprobs, mask, *, threshold: float = 2.0) -> dict:
    """verl's `rollout_corr/*` diagnostics for token-level TIS ([B, T]; rows are sequences).

    IS statistics are of the untruncated weights (verl computes them before truncation), std and
    effective sample size of weights clamped to [1/threshold, threshold].
    """
    mask = mask.astype(jnp.float32)
    _, weights = rollout_is_weights(old_logprobs, rollout_logprobs, mask, threshold=threshold)
    valid = mask > 0
    lower = 1.0 / threshold
    clamped = jnp.clip(weights, lower, threshold)
    clamped_mean = masked_mean(clamped, mask)
    seq_valid = jnp.sum(mask, -1) > 0
    seq_weight = masked_mean(weights, mask, axis=-1)
    seq_count = jnp.sum(seq_valid)

    def seq_mean(x):
        return jnp.sum(jnp.where(seq_valid, x, 0.0)) / seq_count

    log_ratio = old_logprobs - rollout_logprobs
    mean_lp_train = masked_mean(old_logprobs, mask, axis=-1)
    mean_lp_rollout = masked_mean(rollout_logprobs, mask, axis=-1)
    log_ppl_diff = mean_lp_rollout - mean_lp_train
    safe = jnp.clip(log_ratio, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    seq_log_ratio = jnp.clip(jnp.sum(log_ratio * mask, -1), -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    seq_weight_valid = jnp.where(seq_valid, seq_weight, jnp.nan)
    metrics = {
        "rollout_is_mean": masked_mean(weights, mask),
        "rollout_is_max": jnp.max(jnp.where(valid, weights, -jnp.inf)),
        "rollout_is_min": jnp.min(jnp.where(valid, weights, jnp.inf)),
        "rollout_is_std": jnp.sqrt(jnp.maximum(masked_mean(clamped**2, mask) - clamped_mean**2, 0.0)),
        "rollout_is_eff_sample_size": 1.0 / masked_mean((clamped / (clamped_mean + 1e-8)) ** 2, mask),
        "rollout_is_ratio_fraction_high": masked_mean((weights > threshold).astype(jnp.float32), mask),
        "rollout_is_ratio_fraction_low": masked_mean((weights < lower).astype(jnp.float32), mask),
        "rollout_is_seq_mean": seq_mean(seq_weight),
        "rollout_is_seq_max": jnp.nanmax(seq_weight_valid),
        "rollout_is_seq_min": jnp.nanmin(seq_weight_valid),
        "rollout_is_seq_max_deviation": jnp.nanmax(jnp.abs(seq_weight_valid - 1.0)),
        "training_ppl": seq_mean(jnp.exp(-mean_lp_train)),
        "training_log_ppl": seq_mean(-mean_lp_train),
        "rollout_ppl": seq_mean(jnp.exp(-mean_lp_rollout)),
        "rollout_log_ppl": seq_mean(-mean_lp_rollout),
        "kl": masked_mean(rollout_logprobs - old_logprobs, mask),
        "k3_kl": masked_mean(jnp.exp(safe) - safe - 1.0, mask),
        "log_ppl_diff": seq_mean(log_ppl_diff),
        "log_ppl_abs_diff": seq_mean(jnp.abs(log_ppl_diff)),
        "ppl_ratio": seq_mean(jnp.exp(log_ppl_diff)),
        "chi2_token": masked_mean(jnp.exp(safe) ** 2, mask) - 1.0,
        "chi2_seq": seq_mean(jnp.exp(2.0 * seq_log_ratio)) - 1.0,
    }
    return {f"rollout_corr/{k}": v for k, v in metrics.items()}
