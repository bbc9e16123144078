"""GRPO as verl computes it: token log-probs, group advantages, the clipped policy loss, TIS.

The objective of one training step (recipe_spec §0, §2). For a prompt q with G responses o_1..o_G
(config `algorithm.group_size`, verl `rollout.n`) and binary scores r_i:

    A_i   = (r_i - mean(r)) / (std(r) + eps)                       grpo.group_advantages
            std unbiased (/(G-1)); G = 1 → mean 0, std 1; eps = 1e-6 (`adv_eps`);
            `norm_adv_by_std=False` drops the division (Dr.GRPO).
    ρ_t   = exp(clamp(log π_θ(o_t) - log π_old(o_t), -20, 20))
    ℓ_t   = max(-A ρ_t, -A clip(ρ_t, 1-ε_low, 1+ε_high))            (`clip_ratio_low/high`)
            and for A < 0: min(ℓ_t, -A c)                            dual clip, c = `clip_ratio_c` = 3
    ℓ_t  *= w_t   with w_t = min(exp(clamp(log π_old - log π_rollout, -20, 20)), 2)   TIS (`rollout_is`)
    L     = Σ_t ℓ_t m_t / Σ_t m_t                                    `loss_agg_mode: token-mean`
    L    += β·KL(π_θ‖π_ref) (`use_kl_loss`, off) − α·entropy (`entropy_coeff`, 0)

Log-probs are of temperature-scaled logits (logits / T, T = rollout temperature), as verl's
actor. In the recipe (one mini-batch, one epoch) π_old = π_θ at the step, so ρ ≡ 1, clipping is
inert, pg_clipfrac = ppo_kl = 0 and the gradient is −A·w·∇log π_θ: the train step therefore takes
π_old as the detached current log-probs of the same forward pass (no second pass; DESIGN.md).

Where we depart from verl, on purpose:
- `token-mean` is by default the true token mean over the whole mini-batch (all micro-batches and
  devices), like upstream verl's new engine (`batch_num_tokens`). The recipe's legacy dp_actor
  weighted each micro-batch's token mean by its share of sequences (§2.4); `loss_scaling:
  verl_legacy` in the train step reproduces that.
- The seq-mean modes divide by the number of non-empty sequences in the mini-batch, and
  `seq-mean-token-sum-norm` also by a fixed horizon (the max response length), as upstream's
  global agg_loss; verl 0.7's legacy per-micro-batch forms differ only by that weighting.
- Gradient clipping is optax's (scale by max_norm/‖g‖ when ‖g‖ > max_norm); torch adds 1e-6 to ‖g‖.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mathgrpo import fused_head
from mathgrpo.config import ModelConfig
from mathgrpo.model import forward, output_kernel

LOG_RATIO_BOUND = 20.0  # verl's clamp on log-ratios before exp
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("low_var_kl", "kl", "mse")


# ---------------------------------------------------------------------------------------------------
# Log-probs and entropy, in blocks, so [T, V] fp32 logits never exist at once.


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


# ---------------------------------------------------------------------------------------------------
# Advantages.


def group_advantages(scores, group_size: int, eps: float = 1e-6, norm_by_std: bool = True):
    """GRPO outcome advantages [B] for scores [B]; the group_size responses of a prompt are contiguous.

    verl `compute_grpo_outcome_advantage`: (r - mean) / (std_unbiased + eps); a group of one has
    mean 0 and std 1; equal scores give exactly 0. `norm_by_std=False` is Dr.GRPO (r - mean).
    """
    scores = jnp.asarray(scores, jnp.float32)
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size}")
    groups = scores.reshape(-1, group_size)  # [P, G]
    if group_size == 1:
        mean, std = jnp.zeros_like(groups), jnp.ones_like(groups)
    else:
        mean = groups.mean(axis=1, keepdims=True)
        std = jnp.sqrt(jnp.sum((groups - mean) ** 2, axis=1, keepdims=True) / (group_size - 1))
    centered = groups - mean
    advantages = centered / (std + eps) if norm_by_std else centered
    return advantages.reshape(-1)


# ---------------------------------------------------------------------------------------------------
# Policy loss.


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


# ---------------------------------------------------------------------------------------------------
# Truncated importance sampling between trainer and rollout log-probs (verl rollout_corr_helper).


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
