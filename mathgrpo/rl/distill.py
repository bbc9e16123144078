"""On-policy distillation (OPD): token rewards from a teacher, their advantages and the top-k policy loss.

The semantics are those of the OPD fork of verl 0.7 ("Rethinking On-Policy Distillation of Large Language
Models", thunlp/OPD): `dp_actor.compute_distillation_reward`, `fsdp_workers.RewardModelWorker.compute_rm_score`
and `_compute_teacher_top_k_log_probs`, and in `core_algos` the estimators `token_reward_direct`,
`token_reward_direct_plus_grpo` and the 3-D branch of `compute_policy_loss_vanilla`. The student π_S samples
the response; the teacher π_T scores the same tokens (its logits divided by `teacher_temperature`). All
log-probs are fp32 log-softmaxes of temperature-scaled logits; everything here is elementwise over
[B, T(, K)] and jit-compatible (the string options are static).

Sampled-token OPD (`log_prob_top_k = 0`), `sampled_token_rewards`, per response token y_t:

    r_t = −(log π_S(y_t) − log π_T(y_t))                          k1, `compute_rm_score`
    r_t = −k3,  k3 = clamp(e^δ − δ − 1, ±10),  δ = clamp(log π_T − log π_S, ±20)     verl `kl_penalty("k3")`,
                                                                      here `losses.kl_penalty("low_var_kl")`

  The fork reads a `kl_estimator` option but never uses it: its rewards are always k1. k3 is verl's
  low-variance estimator of the same KL(π_S‖π_T) at y_t, offered for comparison.

Top-k OPD (`log_prob_top_k = K > 0`). S = the student's top-K ids at a position, Te = the teacher's; each
set comes from a top-k, so its ids are distinct. `topk_id_sets` builds the candidate ids v_k and a mask of
those that count (`top_k_strategy`):

    only_stu            ids = S                valid = all
    only_tch            ids = Te               valid = all
    intersection        ids = S                valid = [v ∈ Te]                         (`overlap_mask`)
    union               ids = S ++ Te  (2K)    valid = all ++ [v ∉ S]                   (`teacher_in_student_mask`)
    union-intersection  ids = S ++ Te  (2K)    valid = [v ∉ Te] ++ [v ∉ S]              (symmetric difference)

  so an id in both sets counts once (union: in the student half) or not at all (union-intersection).
  With S_k = log π_S(v_k), T_k = log π_T(v_k) (`strategy_logprobs` assembles them from the four gathers
  the fork makes: student and teacher at S, student and teacher at Te), `topk_reverse_kl_rewards`:

    r_k = −w_k · (S_k − T_k)          (S_k − T_k taken as 0 where not valid)
    w_k = exp(ℓ_k − logsumexp_{j valid} ℓ_j)      ℓ = S (student_p), T (teacher_p), 0 (none)
          ℓ_k = −∞ where not valid; w = nan_to_num(w, 0): a position with no valid id gets w = 0, r = 0.
    union-intersection uses the raw w_k = exp(ℓ_k) (no renormalisation; 1 for `none`).

  The rewards, like everything the fork computes before the update, carry no gradient.

Advantages (`core_algos`), mask m_t = response mask:

    token_reward_direct:            A = r · m                     ([B, T] or [B, T, K]; no normalisation)
    token_reward_direct_plus_grpo:  A = r · m + λ · (Â_i · m)     Â_i = GRPO outcome advantage of the
                                    sequence's true reward, λ = `grpo_outcome_weight`
                                    (for [B, T, K] rewards the fork's sum does not broadcast, so it runs
                                    with K = 0 only; here the outcome term goes to every valid k)

Policy loss, 3-D branch of `compute_policy_loss_vanilla` (verl's per-token PPO loss with clip-higher
and dual clip, `policy_token_losses`, at every (t, k), then summed over k):

    ℓ_t = Σ_k ppo(log π_θ(v_k) − log π_old(v_k), A_{t,k})      L = agg_loss(ℓ, m)   (token-mean default)
    ppo_kl      = masked_mean_t(−Σ_k clamp(log-ratio, ±20))
    pg_clipfrac = Σ_{t,k} m_t [clipped] / Σ_t m_t     (a mean over tokens of the number of clipped ids:
                                                       it can exceed 1, as in the fork)
    pg_clipfrac_lower = 0                             (the fork's 3-D branch reports a placeholder 0)

  Ids that do not count carry A = 0 and so add nothing to the loss or the gradient; their log-ratio still
  enters ppo_kl, as in the fork. In the recipe the update is on-policy (π_old = sg(π_θ)): the ratio is 1
  and the gradient is −Σ_k A_k ∇log π_θ(v_k) per token, a top-K-restricted reverse-KL gradient.
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp

from mathgrpo.config import DistillEstimator, RewardWeightMode, SampledKL, TopKStrategy
from mathgrpo.rl.losses import aggregate, kl_penalty, masked_mean, policy_token_losses

STRATEGIES = typing.get_args(TopKStrategy)
WEIGHT_MODES = typing.get_args(RewardWeightMode)
SAMPLED_KL_KINDS = typing.get_args(SampledKL)
ADV_ESTIMATORS = typing.get_args(DistillEstimator)


def _check(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r}; expected one of {accepted}")


def _member(ids, others):
    """[..., K] bool: whether each id of `ids` [..., K] is among `others` [..., K2] (same leading axes)."""
    return jnp.any(ids[..., :, None] == others[..., None, :], axis=-1)


# ---------------------------------------------------------------------------------------------------
# Candidate ids and their rewards.


def topk_id_sets(student_topk_ids, teacher_topk_ids, strategy: str = "only_stu"):
    """The candidate ids of `strategy` and the mask of those that count (module docstring's table).

    student_topk_ids, teacher_topk_ids: [B, T, K] int (teacher ids may be None for only_stu).
    Returns: (ids [B, T, K'], valid [B, T, K'] bool), K' = K, or 2K for union / union-intersection
    (student ids first, then the teacher's: the fork's `union_top_k_ids`).
    """
    _check("top_k_strategy", strategy, STRATEGIES)
    student = jnp.asarray(student_topk_ids)
    if strategy == "only_stu":
        return student, jnp.ones(student.shape, bool)
    if teacher_topk_ids is None:
        raise ValueError(f"top_k_strategy={strategy!r} needs the teacher's top-k ids")
    teacher = jnp.asarray(teacher_topk_ids)
    if strategy == "only_tch":
        return teacher, jnp.ones(teacher.shape, bool)
    student_in_teacher = _member(student, teacher)
    if strategy == "intersection":
        return student, student_in_teacher
    teacher_in_student = _member(teacher, student)
    ids = jnp.concatenate([student, teacher], axis=-1)
    if strategy == "union":
        return ids, jnp.concatenate([jnp.ones(student.shape, bool), ~teacher_in_student], axis=-1)
    return ids, jnp.concatenate([~student_in_teacher, ~teacher_in_student], axis=-1)


def strategy_logprobs(student_on_student, teacher_on_student, student_on_teacher=None, teacher_on_teacher=None,
                      *, strategy: str = "only_stu"):
    """(S, T) [B, T, K'] at the ids of `topk_id_sets`, from the four [B, T, K] gathers of the fork:
    the student's and the teacher's log-probs at the student's top-k ids (`student_top_k_log_probs`,
    `teacher_on_student_log_probs`) and at the teacher's (`student_log_probs_on_teacher_ids`,
    `teacher_top_k_log_probs`); the last two are not needed for only_stu / intersection.
    Gathering both models' log-probs at `ids` directly gives the same arrays."""
    _check("top_k_strategy", strategy, STRATEGIES)
    if strategy in ("only_stu", "intersection"):
        return jnp.asarray(student_on_student, jnp.float32), jnp.asarray(teacher_on_student, jnp.float32)
    if student_on_teacher is None or teacher_on_teacher is None:
        raise ValueError(f"top_k_strategy={strategy!r} needs the log-probs at the teacher's top-k ids")
    if strategy == "only_tch":
        return jnp.asarray(student_on_teacher, jnp.float32), jnp.asarray(teacher_on_teacher, jnp.float32)
    student = jnp.concatenate([student_on_student, student_on_teacher], axis=-1).astype(jnp.float32)
    teacher = jnp.concatenate([teacher_on_student, teacher_on_teacher], axis=-1).astype(jnp.float32)
    return student, teacher


def reward_weights(student_logprobs, teacher_logprobs, valid, *, weight_mode: str = "student_p",
                   normalize: bool = True):
    """w [B, T, K] of `compute_reward_weights`: softmax over the valid k of S (student_p), T (teacher_p) or 0
    (none), or without `normalize` the raw exp; 0 where not valid and on rows with no valid id."""
    _check("reward_weight_mode", weight_mode, WEIGHT_MODES)
    student = jnp.asarray(student_logprobs, jnp.float32)
    if weight_mode == "student_p":
        logits = student
    elif weight_mode == "teacher_p":
        logits = jnp.asarray(teacher_logprobs, jnp.float32)
    else:
        logits = jnp.zeros_like(student)
    logits = jnp.where(jnp.asarray(valid, bool), logits, -jnp.inf)
    if normalize:
        logits = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # all −∞: nan, zeroed below
    weights = jnp.nan_to_num(jnp.exp(logits), nan=0.0, posinf=0.0, neginf=0.0)
    return jax.lax.stop_gradient(weights)


def topk_reverse_kl_rewards(student_logprobs, teacher_logprobs, valid, *, weight_mode: str = "student_p",
                            normalize: bool = True):
    """r_k = −w_k (S_k − T_k), all [B, T, K]; S_k − T_k is taken as 0 where `valid` is False (there T_k may
    be −∞, as the fork's teacher gives for ids outside its top-k under `intersection`). No gradient."""
    student = jnp.asarray(student_logprobs, jnp.float32)
    teacher = jnp.asarray(teacher_logprobs, jnp.float32)
    valid = jnp.asarray(valid, bool)
    weights = reward_weights(student, teacher, valid, weight_mode=weight_mode, normalize=normalize)
    reverse_kl = jnp.where(valid, student - teacher, 0.0)
    return jax.lax.stop_gradient(-reverse_kl * weights)


def distillation_token_rewards(student_logprobs, teacher_logprobs, valid, *, strategy: str = "only_stu",
                               weight_mode: str = "student_p"):
    """The fork's `rm_scores` [B, T, K'] for `strategy`: `topk_reverse_kl_rewards` at the ids of
    `topk_id_sets` (S, T from `strategy_logprobs`), renormalised weights except for union-intersection."""
    _check("top_k_strategy", strategy, STRATEGIES)
    return topk_reverse_kl_rewards(student_logprobs, teacher_logprobs, valid, weight_mode=weight_mode,
                                   normalize=strategy != "union-intersection")


def sampled_token_rewards(student_logprobs, teacher_logprobs, kind: str = "k1"):
    """[B, T] rewards of sampled-token OPD (top_k = 0): −k1 = −(log π_S − log π_T) (the fork's), or −k3
    (verl kl_penalty "k3" of the same pair, module docstring). No gradient."""
    _check("kl_estimator", kind, SAMPLED_KL_KINDS)
    student = jnp.asarray(student_logprobs, jnp.float32)
    teacher = jnp.asarray(teacher_logprobs, jnp.float32)
    if kind == "k1":
        return jax.lax.stop_gradient(-(student - teacher))
    return jax.lax.stop_gradient(-kl_penalty(student, teacher, "low_var_kl"))


def topk_overlap_mask(student_topk_ids, teacher_topk_ids):
    """[B, T, K] bool: whether each of the student's top-k ids is among the teacher's (the fork's `overlap_mask`)."""
    return _member(jnp.asarray(student_topk_ids), jnp.asarray(teacher_topk_ids))


def topk_overlap_ratio(student_topk_ids, teacher_topk_ids, mask):
    """Share of the student's top-k ids that are in the teacher's top-k, over the response tokens (the fork's
    `val-topk/overlap_ratio` = Σ overlap_mask·m / (K Σ m)); 0 when there are no tokens (the fork logs none)."""
    student = jnp.asarray(student_topk_ids)
    overlap = topk_overlap_mask(student, teacher_topk_ids).astype(jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)[..., None]
    return masked_mean(overlap, mask) / student.shape[-1]


# ---------------------------------------------------------------------------------------------------
# Advantages.


def token_reward_direct(token_rewards, mask):
    """`compute_token_reward_direct_advantage`: A = r · m, with m [B, T] broadcast over k for [B, T, K]
    rewards. No gradient."""
    rewards = jnp.asarray(token_rewards, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    if rewards.ndim == 3:
        mask = mask[..., None]
    return jax.lax.stop_gradient(rewards * mask)


def token_reward_direct_plus_grpo(token_rewards, mask, grpo_advantages, *, weight: float = 1.0, valid=None):
    """`compute_token_reward_direct_plus_grpo_advantage`: A = r·m + weight·(Â·m), Â [B] the GRPO outcome
    advantages of the sequences' true rewards (group_advantages), broadcast over the tokens; or Â [B, T]
    already per token (a packed batch's `advantages`, each sequence's Â on its response tokens).

    For [B, T, K] rewards the outcome term is broadcast over k too, and with `valid` [B, T, K] it is kept
    to the ids that count, so an id duplicated in a union set does not get it twice. (The fork adds the
    [B, T] GRPO term to the [B, T, K] direct term as is, which does not broadcast: it runs with k = 0 only.)
    No gradient."""
    direct = token_reward_direct(token_rewards, mask)
    mask = jnp.asarray(mask, jnp.float32)
    outcome = jnp.asarray(grpo_advantages, jnp.float32)
    outcome = (outcome if outcome.ndim == mask.ndim else outcome[:, None]) * mask  # [B, T]
    if direct.ndim == 3:
        outcome = outcome[..., None]
        if valid is not None:
            outcome = jnp.where(jnp.asarray(valid, bool), outcome, 0.0)
    return jax.lax.stop_gradient(direct + weight * outcome)


# ---------------------------------------------------------------------------------------------------
# Policy loss over the candidate ids.


def topk_token_losses(logprobs, old_logprobs, advantages, *, clip_low: float = 0.2, clip_high: float = 0.2,
                      clip_c: float = 3.0, valid=None, is_weights=None):
    """The per-token pieces of the 3-D loss (module docstring): `policy_token_losses` at every candidate id,
    summed over k. The train step aggregates these (`aggregate`, or verl's legacy weighting) as GRPO's.

    logprobs, old_logprobs, advantages: [B, T, K]; `valid` [B, T, K] zeroes the advantages of the ids that
    do not count; is_weights [B, T] multiply the per-token sums (rollout correction).
    Returns (per_token [B, T], log_ratio [B, T, K] (clamped, detached), clipped [B, T, K] bool).
    """
    logprobs = jnp.asarray(logprobs, jnp.float32)
    if logprobs.ndim != 3:
        raise ValueError(f"the top-k policy loss takes [B, T, K] log-probs, got shape {logprobs.shape}")
    advantages = jnp.asarray(advantages, jnp.float32)
    if valid is not None:
        advantages = jnp.where(jnp.asarray(valid, bool), advantages, 0.0)
    pg_losses, log_ratio, clipped, _ = policy_token_losses(logprobs, old_logprobs, advantages, clip_low=clip_low,
                                                           clip_high=clip_high, clip_c=clip_c)
    per_token = jnp.sum(pg_losses, axis=-1)  # [B, T]
    if is_weights is not None:
        per_token = per_token * jax.lax.stop_gradient(is_weights)
    return per_token, jax.lax.stop_gradient(log_ratio), clipped


def topk_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low: float = 0.2, clip_high: float = 0.2,
                     clip_c: float = 3.0, agg: str = "token-mean", valid=None, is_weights=None, token_count=None,
                     sequence_count=None, horizon: int | None = None):
    """The 3-D branch of verl's vanilla PPO loss (module docstring): `topk_token_losses` (`policy_token_losses`
    at every candidate id, summed over k), then aggregated over the [B, T] response `mask` like `policy_loss`.

    logprobs, old_logprobs, advantages: [B, T, K] (log-probs of the candidate ids now / at the rollout);
    ids that do not count are passed with advantage 0, as the fork does (or with `valid` [B, T, K], which
    zeroes their advantages). is_weights [B, T] multiply the per-token sums (rollout correction, none in the
    recipe); token_count / sequence_count / horizon select `aggregate`'s global forms.

    Returns: (loss, metrics) with `pg_loss`, `pg_clipfrac`, `ppo_kl`, `pg_clipfrac_lower` as the fork's.
    """
    mask = jnp.asarray(mask, jnp.float32)
    per_token, log_ratio, clipped = topk_token_losses(logprobs, old_logprobs, advantages, clip_low=clip_low,
                                                      clip_high=clip_high, clip_c=clip_c, valid=valid,
                                                      is_weights=is_weights)
    loss = aggregate(per_token, mask, agg, token_count=token_count, sequence_count=sequence_count,
                     horizon=horizon)
    metrics = {
        "pg_loss": jax.lax.stop_gradient(loss),
        "pg_clipfrac": masked_mean(clipped.astype(jnp.float32), mask[..., None]),
        "ppo_kl": masked_mean(-jnp.sum(log_ratio, axis=-1), mask),
        "pg_clipfrac_lower": jnp.zeros((), jnp.float32),
    }
    return loss, metrics
