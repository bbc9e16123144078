"""rl/distill.py against a PyTorch transcription of the OPD fork of verl (thunlp/OPD).

The `fork_*` functions below follow the fork's code: `fsdp_workers._compute_teacher_top_k_log_probs` and
`compute_rm_score` (the teacher's top-k, its log-probs at the student's ids, the overlap masks, the k1
reward), `dp_actor.compute_distillation_reward` (the five id-set strategies, the three weight modes),
`core_algos.compute_token_reward_direct_advantage`, `compute_token_reward_direct_plus_grpo_advantage`,
`compute_grpo_outcome_advantage`, the 3-D branch of `compute_policy_loss_vanilla` and `agg_loss`, and
`dp_actor.update_policy`'s on-policy shortcut. Ours must agree to 1e-6 in fp32, gradients included, with
edge cases: tied logits, student and teacher sets that coincide or are disjoint (positions with no valid id),
log-probs near -1e4, the teacher's -inf outside its top-k, empty responses, log-ratios beyond the ±20 clamp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mathgrpo.rl import distill

K = 4
B, T, V = 3, 5, 24
TOL = dict(rtol=1e-6, atol=1e-7)

# --- the reference: the fork in torch -------------------------------------------------------------


def fork_masked_mean(values, mask):
    """verl_F.masked_mean: Σ where(mask, v, 0)·mask / (Σ mask + 1e-8) (mask may broadcast)."""
    return (torch.where(mask.bool(), values, 0.0) * mask).sum() / (mask.sum() + 1e-8)


def fork_agg_loss(loss_mat, loss_mask, mode):
    if mode == "token-mean":
        return fork_masked_mean(loss_mat, loss_mask)
    if mode == "seq-mean-token-sum":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        return fork_masked_mean(seq_losses, (torch.sum(loss_mask, dim=-1) > 0).float())
    if mode == "seq-mean-token-mean":
        seq_mask = torch.sum(loss_mask, dim=-1)
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
        return fork_masked_mean(seq_losses, (seq_mask > 0).float())
    if mode == "seq-mean-token-sum-norm":
        return torch.sum(torch.sum(loss_mat * loss_mask, dim=-1)) / loss_mask.shape[-1]
    raise ValueError(mode)


def fork_teacher_topk(teacher_logits, student_ids, top_k, strategy):
    """_compute_teacher_top_k_log_probs (one chunk): teacher log-probs at the student ids (−inf outside the
    teacher's top-k unless only_stu/union/union-intersection), overlap_mask, teacher top-k, T_in_S."""
    t_logits, t_ids = torch.topk(teacher_logits, k=top_k, dim=-1)
    t_logsumexp = torch.logsumexp(teacher_logits, dim=-1, keepdim=True)
    t_log_probs_top_k = t_logits - t_logsumexp
    matches = student_ids.unsqueeze(-1) == t_ids.unsqueeze(-2)
    is_in_teacher = matches.any(dim=-1)
    is_in_student = matches.any(dim=-2)
    if strategy in ["only_stu", "union", "union-intersection"]:
        on_student = torch.gather(teacher_logits, dim=-1, index=student_ids) - t_logsumexp
    else:
        vals_masked = t_log_probs_top_k.unsqueeze(-2).masked_fill(~matches, float("-inf"))
        on_student, _ = vals_masked.max(dim=-1)
    return on_student, is_in_teacher.float(), t_ids, t_log_probs_top_k, is_in_student.float()


def fork_compute_reward_weights(S_logp, T_logp, valid_mask, weight_mode, normalize=True):
    if weight_mode == "student_p":
        log_probs = S_logp
    elif weight_mode == "teacher_p":
        log_probs = T_logp
    elif weight_mode == "none":
        log_probs = torch.zeros_like(S_logp)
    else:
        raise ValueError(weight_mode)
    log_probs = torch.where(valid_mask, log_probs, torch.full_like(log_probs, -float("inf")))
    if normalize:
        weights = torch.exp(log_probs - torch.logsumexp(log_probs, dim=-1, keepdim=True))
    else:
        weights = torch.exp(log_probs)
    return torch.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0)


def fork_distillation_reward(d, strategy, weight_mode):
    """compute_distillation_reward → (rm_scores, the ids update_policy recomputes, valid_mask)."""
    S_ids, S_logp, T_on_S = d["S_ids"], d["S_logp"], d["T_on_S"]
    T_ids, T_logp, S_on_T = d["T_ids"], d["T_logp"], d["S_on_T"]
    if strategy == "only_stu":
        kl_val = S_logp - T_on_S
        valid_mask = torch.ones_like(S_logp, dtype=torch.bool)
        rm_scores = -kl_val * fork_compute_reward_weights(S_logp, T_on_S, valid_mask, weight_mode)
        return rm_scores, S_ids, valid_mask
    if strategy == "only_tch":
        kl_val = S_on_T - T_logp
        valid_mask = torch.ones_like(S_on_T, dtype=torch.bool)
        rm_scores = -kl_val * fork_compute_reward_weights(S_on_T, T_logp, valid_mask, weight_mode)
        return rm_scores, T_ids, valid_mask
    if strategy == "intersection":
        valid_mask = d["overlap_mask"].bool()
        kl_val = torch.where(valid_mask, S_logp - T_on_S, torch.zeros_like(S_logp))
        rm_scores = -kl_val * fork_compute_reward_weights(S_logp, T_on_S, valid_mask, weight_mode)
        return rm_scores, S_ids, valid_mask
    union_ids = torch.cat([S_ids, T_ids], dim=-1)
    S_logp_union = torch.cat([S_logp, S_on_T], dim=-1)
    T_logp_union = torch.cat([T_on_S, T_logp], dim=-1)
    T_in_S = d["teacher_in_student_mask"].bool()
    if strategy == "union":
        valid_mask = torch.cat([torch.ones_like(S_ids, dtype=torch.bool), ~T_in_S], dim=-1)
        normalize = True
    else:
        valid_mask = torch.cat([~d["overlap_mask"].bool(), ~T_in_S], dim=-1)
        normalize = False
    kl_val = torch.where(valid_mask, S_logp_union - T_logp_union, torch.zeros_like(S_logp_union))
    weights = fork_compute_reward_weights(S_logp_union, T_logp_union, valid_mask, weight_mode, normalize=normalize)
    return -kl_val * weights, union_ids, valid_mask


def fork_kl_penalty_k3(logprob, ref_logprob):
    kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


def fork_token_reward_direct(token_level_rewards, response_mask):
    if token_level_rewards.dim() == 3:
        response_mask = response_mask.unsqueeze(-1)
    return token_level_rewards * response_mask


def fork_grpo_outcome(token_level_rewards, response_mask, index, epsilon=1e-6):
    """compute_grpo_outcome_advantage, grouping by uid; returns the [B, T] broadcast advantages."""
    scores = token_level_rewards.sum(dim=-1)
    groups = {}
    for i, uid in enumerate(index):
        groups.setdefault(uid, []).append(scores[i])
    stats = {}
    for uid, values in groups.items():
        stacked = torch.stack(values)
        stats[uid] = (torch.tensor(0.0), torch.tensor(1.0)) if len(values) == 1 else (stacked.mean(), stacked.std())
    out = torch.stack([(scores[i] - stats[uid][0]) / (stats[uid][1] + epsilon) for i, uid in enumerate(index)])
    return out.unsqueeze(-1) * response_mask


def fork_direct_plus_grpo(token_level_rewards, response_mask, index, true_reward_score, weight):
    direct_adv = fork_token_reward_direct(token_level_rewards, response_mask)
    grpo_adv = fork_grpo_outcome(true_reward_score, response_mask, index)
    return direct_adv + weight * grpo_adv


def fork_policy_loss_3d(old_log_prob, log_prob, advantages, response_mask, low, high, c, mode,
                        rollout_is_weights=None):
    """compute_policy_loss_vanilla, `log_prob.dim() == 3` branch, and agg_loss."""
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_losses = torch.sum(pg_losses, dim=-1)
    with torch.no_grad():
        ppo_kl = fork_masked_mean(-negative_approx_kl.sum(dim=-1), response_mask)
        pg_clipfrac = fork_masked_mean((pg_losses2 > pg_losses1).float(), response_mask.unsqueeze(-1))
        pg_clipfrac_lower = torch.tensor(0.0)
        dual_hit = bool(((clip_pg_losses1 > pg_losses3) & (advantages < 0)).any())
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = fork_agg_loss(pg_losses, response_mask, mode)
    return pg_loss, {"pg_clipfrac": pg_clipfrac, "ppo_kl": ppo_kl, "pg_clipfrac_lower": pg_clipfrac_lower,
                     "dual_hit": dual_hit}


# --- inputs ---------------------------------------------------------------------------------------

CASES = ("random", "ties", "overlap", "disjoint", "extreme")


def make_logits(case, seed=0):
    """Student and teacher logits [B, T, V] (fp32) for an edge case."""
    rng = np.random.default_rng(seed)
    student = rng.normal(0.0, 2.0, (B, T, V))
    teacher = student + rng.normal(0.0, 1.0, (B, T, V))  # correlated: partly shared top-k sets
    if case == "ties":  # many equal logits: torch.topk picks among tied ids
        student, teacher = rng.integers(0, 3, (B, T, V)), rng.integers(0, 3, (B, T, V))
    elif case == "overlap":  # the same top-k set at every position
        teacher = student + 0.5 * (student > np.sort(student, -1)[..., -K - 1:-K])
    elif case == "disjoint":  # no id in common: intersection has no valid id anywhere
        teacher = -student
    elif case == "extreme":  # log-probs down to about -1e4
        student, teacher = student * 2500.0, teacher * 2500.0
    return student.astype(np.float32), teacher.astype(np.float32)


def fork_inputs(student_logits, teacher_logits, strategy):
    """What the fork holds when compute_distillation_reward runs (the student's top-k from compute_log_prob,
    the teacher's outputs of compute_rm_score, the student's log-probs at the teacher's ids)."""
    s_logits, t_logits = torch.from_numpy(student_logits), torch.from_numpy(teacher_logits)
    s_all = torch.log_softmax(s_logits, dim=-1)  # the actor's log-probs
    _, S_ids = torch.topk(s_logits, k=K, dim=-1)
    T_on_S, overlap, T_ids, T_logp, T_in_S = fork_teacher_topk(t_logits, S_ids, K, strategy)
    return {"S_ids": S_ids, "S_logp": s_all.gather(-1, S_ids), "T_on_S": T_on_S, "T_ids": T_ids, "T_logp": T_logp,
            "S_on_T": s_all.gather(-1, T_ids), "overlap_mask": overlap, "teacher_in_student_mask": T_in_S,
            # full log-probs, for gathers at any ids: the teacher's as the fork computes them (logits - lse)
            "student_all": s_all.numpy(), "teacher_all": (t_logits - torch.logsumexp(t_logits, -1, True)).numpy()}


id_sets = jax.jit(distill.topk_id_sets, static_argnames="strategy")
pair_logprobs = jax.jit(distill.strategy_logprobs, static_argnames="strategy")
token_rewards = jax.jit(distill.distillation_token_rewards, static_argnames=("strategy", "weight_mode"))


def gather(logprobs, ids):
    """Log-probs [B, T, V] at ids [B, T, K']. The reward tests gather the reference's own fp32 log-probs: a
    last-ulp difference in a log-softmax near -1e4 is amplified by S - T."""
    return jnp.take_along_axis(jnp.asarray(logprobs), ids, axis=-1)


def response_mask(seed=0):
    mask = (np.random.default_rng(seed + 100).random((B, T)) > 0.2).astype(np.float32)
    mask[1] = 0.0  # an empty response
    return mask


# --- id sets and rewards --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("weight_mode", distill.WEIGHT_MODES)
@pytest.mark.parametrize("strategy", distill.STRATEGIES)
def test_id_sets_and_rewards_match_fork(strategy, weight_mode, case):
    student_logits, teacher_logits = make_logits(case)
    d = fork_inputs(student_logits, teacher_logits, strategy)
    expected, expected_ids, expected_valid = fork_distillation_reward(d, strategy, weight_mode)

    ids, valid = id_sets(d["S_ids"].numpy(), d["T_ids"].numpy(), strategy=strategy)
    np.testing.assert_array_equal(ids, expected_ids.numpy())
    np.testing.assert_array_equal(valid, expected_valid.numpy())
    # the ids that count are distinct: an id in both top-k sets counts once (union) or not at all
    ids_np, valid_np = np.asarray(ids), np.asarray(valid)
    for row_ids, row_valid in zip(ids_np.reshape(-1, ids_np.shape[-1]), valid_np.reshape(-1, ids_np.shape[-1])):
        assert len(set(row_ids[row_valid])) == row_valid.sum()

    # both models' log-probs gathered at the ids (the JAX pipeline) ...
    got = token_rewards(gather(d["student_all"], ids), gather(d["teacher_all"], ids), valid, strategy=strategy,
                        weight_mode=weight_mode)
    np.testing.assert_allclose(got, expected.numpy(), **TOL)
    # ... and the fork's four gathers (its -inf teacher log-probs outside the teacher's top-k included)
    student, teacher = pair_logprobs(d["S_logp"].numpy(), d["T_on_S"].numpy(), d["S_on_T"].numpy(),
                                     d["T_logp"].numpy(), strategy=strategy)
    got_fork_inputs = token_rewards(student, teacher, valid, strategy=strategy, weight_mode=weight_mode)
    np.testing.assert_allclose(got_fork_inputs, expected.numpy(), **TOL)

    assert np.all(np.isfinite(got)) and np.all(np.asarray(got)[~valid_np] == 0.0)
    empty = ~valid_np.any(-1)  # positions with no valid id get reward 0
    if (strategy, case) in (("intersection", "disjoint"), ("union-intersection", "overlap")):
        assert empty.all()
    assert np.all(np.asarray(got)[empty] == 0.0)


def test_reward_weights_hand_values():
    """Two valid ids with student probs .5/.25 → student_p weights 2/3, 1/3; the third id is masked out."""
    student = jnp.log(jnp.array([[[0.5, 0.25, 0.125]]]))
    teacher = jnp.log(jnp.array([[[0.25, 0.5, 0.125]]]))
    valid = jnp.array([[[True, True, False]]])
    w = distill.reward_weights(student, teacher, valid, weight_mode="student_p")
    np.testing.assert_allclose(w, [[[2 / 3, 1 / 3, 0.0]]], rtol=1e-6)
    w_raw = distill.reward_weights(student, teacher, valid, weight_mode="student_p", normalize=False)
    np.testing.assert_allclose(w_raw, [[[0.5, 0.25, 0.0]]], rtol=1e-6)
    r = distill.topk_reverse_kl_rewards(student, teacher, valid, weight_mode="none")
    np.testing.assert_allclose(r, [[[-0.5 * np.log(2), 0.5 * np.log(2), 0.0]]], rtol=1e-6)


@pytest.mark.parametrize("kind", distill.SAMPLED_KL_KINDS)
def test_sampled_token_rewards_match_fork(kind):
    rng = np.random.default_rng(7)
    student = rng.normal(-3.0, 2.0, (B, T)).astype(np.float32)
    teacher = rng.normal(-3.0, 2.0, (B, T)).astype(np.float32)
    teacher[0, :3] = student[0, :3] + np.array([30.0, -30.0, -1e4], np.float32)  # beyond the clamps
    s, t = torch.from_numpy(student), torch.from_numpy(teacher)
    expected = -(s - t) if kind == "k1" else -fork_kl_penalty_k3(s, t)
    got = jax.jit(distill.sampled_token_rewards, static_argnames="kind")(student, teacher, kind=kind)
    np.testing.assert_allclose(got, expected.numpy(), **TOL)


def test_overlap_ratio_matches_fork():
    student_logits, teacher_logits = make_logits("random", seed=3)
    d = fork_inputs(student_logits, teacher_logits, "only_stu")
    mask = torch.from_numpy(response_mask())
    valid_k = mask.unsqueeze(-1).expand_as(d["overlap_mask"]).float()
    expected = (d["overlap_mask"] * valid_k).sum() / valid_k.sum()
    got = distill.topk_overlap_ratio(d["S_ids"].numpy(), d["T_ids"].numpy(), mask.numpy())
    np.testing.assert_allclose(got, expected.item(), **TOL)
    assert 0.0 < float(got) < 1.0
    assert float(distill.topk_overlap_ratio(d["S_ids"].numpy(), d["S_ids"].numpy(), mask.numpy())) == pytest.approx(1)
    assert float(distill.topk_overlap_ratio(d["S_ids"].numpy(), d["T_ids"].numpy(), np.zeros((B, T)))) == 0.0


# --- advantages -----------------------------------------------------------------------------------


def test_token_reward_direct_matches_fork():
    rng = np.random.default_rng(11)
    mask = response_mask(11)
    for shape in ((B, T), (B, T, 2 * K)):
        rewards = rng.normal(size=shape).astype(np.float32)
        expected = fork_token_reward_direct(torch.from_numpy(rewards), torch.from_numpy(mask))
        np.testing.assert_array_equal(distill.token_reward_direct(rewards, mask), expected.numpy())


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_token_reward_direct_plus_grpo_matches_fork(weight):
    """2-D (sampled-token OPD) as the fork; 3-D: the fork's sum does not broadcast, ours broadcasts over the
    valid k."""
    rng = np.random.default_rng(12)
    n, group = 6, 3
    mask = (rng.random((n, T)) > 0.2).astype(np.float32)
    rewards = rng.normal(size=(n, T)).astype(np.float32)
    true_reward = np.zeros((n, T), np.float32)
    true_reward[np.arange(n), T - 1] = [1, 0, 0, 1, 1, 1]  # the second group is all-equal: Â = 0
    uids = [i // group for i in range(n)]
    expected = fork_direct_plus_grpo(torch.from_numpy(rewards), torch.from_numpy(mask), uids,
                                     torch.from_numpy(true_reward), weight)
    seq_adv = fork_grpo_outcome(torch.from_numpy(true_reward), torch.ones(n, 1), uids)[:, 0].numpy()
    got = distill.token_reward_direct_plus_grpo(rewards, mask, seq_adv, weight=weight)
    np.testing.assert_allclose(got, expected.numpy(), **TOL)

    rewards_3d = rng.normal(size=(n, T, 2 * K)).astype(np.float32)
    valid = rng.random((n, T, 2 * K)) > 0.3
    with pytest.raises(RuntimeError):  # the fork's 3-D case
        fork_direct_plus_grpo(torch.from_numpy(rewards_3d), torch.from_numpy(mask), uids,
                              torch.from_numpy(true_reward), weight)
    got_3d = distill.token_reward_direct_plus_grpo(rewards_3d, mask, seq_adv, weight=weight, valid=valid)
    hand = rewards_3d * mask[..., None] + weight * np.where(valid, (seq_adv[:, None] * mask)[..., None], 0.0)
    np.testing.assert_allclose(got_3d, hand, **TOL)


# --- the top-k policy loss ------------------------------------------------------------------------


def loss_inputs(seed):
    """Union-strategy shaped inputs: [B, T, 2K] log-probs, old log-probs off-policy (clip, dual clip and the
    ±20 clamp all hit), advantages 0 on the ids that do not count."""
    rng = np.random.default_rng(seed)
    shape = (B, T, 2 * K)
    logprobs = rng.normal(-3.0, 1.5, shape).astype(np.float32)
    old = (logprobs + rng.normal(0.0, 0.8, shape)).astype(np.float32)
    old[0, 0, :3] += np.array([30.0, -30.0, 25.0], np.float32)
    valid = rng.random(shape) > 0.25
    advantages = np.where(valid, rng.normal(0.0, 1.0, shape), 0.0).astype(np.float32)
    return logprobs, old, advantages, response_mask(seed), valid


AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("seed", [0, 1])  # seed 1: with rollout IS weights
def test_topk_policy_loss_matches_fork(agg, seed):
    logprobs, old, advantages, mask, valid = loss_inputs(seed)
    is_weights = np.random.default_rng(seed).uniform(0.2, 2.0, (B, T)).astype(np.float32) if seed else None
    t_logprobs = torch.tensor(logprobs, requires_grad=True)
    loss_ref, metrics_ref = fork_policy_loss_3d(torch.from_numpy(old), t_logprobs, torch.from_numpy(advantages),
                                                torch.from_numpy(mask), 0.2, 0.28, 3.0, agg,
                                                None if is_weights is None else torch.from_numpy(is_weights))
    n_seqs = int((mask.sum(-1) > 0).sum())
    if agg == "seq-mean-token-sum-norm":  # global form (mathgrpo's aggregate): verl 0.7's value / sequences
        loss_ref = loss_ref / n_seqs
    loss_ref.backward()

    def ours(lp):
        return distill.topk_policy_loss(lp, jnp.asarray(old), jnp.asarray(advantages), jnp.asarray(mask),
                                        clip_low=0.2, clip_high=0.28, clip_c=3.0, agg=agg, is_weights=is_weights,
                                        sequence_count=n_seqs if agg == "seq-mean-token-sum-norm" else None)

    (loss, metrics), grad = jax.jit(jax.value_and_grad(ours, has_aux=True))(jnp.asarray(logprobs))
    np.testing.assert_allclose(loss, loss_ref.item(), **TOL)
    np.testing.assert_allclose(grad, t_logprobs.grad.numpy(), **TOL)
    for name in ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"):
        np.testing.assert_allclose(metrics[name], metrics_ref[name].item(), **TOL)
    np.testing.assert_allclose(metrics["pg_loss"], loss, **TOL)
    assert float(metrics["pg_clipfrac"]) > 0 and metrics_ref["dual_hit"]  # both clips are exercised
    assert np.all(np.asarray(grad)[~valid] == 0.0) and np.all(np.asarray(grad)[mask == 0] == 0.0)

    # `valid` zeroes the advantages of the ids that do not count, whatever they were
    noisy = np.where(valid, advantages, 5.0).astype(np.float32)
    loss_valid, _ = distill.topk_policy_loss(jnp.asarray(logprobs), jnp.asarray(old), jnp.asarray(noisy),
                                             jnp.asarray(mask), clip_low=0.2, clip_high=0.28, agg=agg,
                                             valid=jnp.asarray(valid), is_weights=is_weights,
                                             sequence_count=n_seqs if agg == "seq-mean-token-sum-norm" else None)
    np.testing.assert_allclose(loss_valid, loss, **TOL)


@pytest.mark.parametrize("strategy", distill.STRATEGIES)
def test_on_policy_pipeline_gradient_matches_fork(strategy):
    """Logits → rewards → token_reward_direct → on-policy top-k loss (old = detached current, as update_policy
    with one mini-batch): the loss, the metrics and d loss / d student logits agree with torch autograd."""
    student_logits, teacher_logits = make_logits("random", seed=5)
    mask = response_mask(5)
    d = fork_inputs(student_logits, teacher_logits, strategy)
    rm_scores, ids_ref, _ = fork_distillation_reward(d, strategy, "student_p")
    advantages_ref = fork_token_reward_direct(rm_scores, torch.from_numpy(mask))
    t_logits = torch.tensor(student_logits, requires_grad=True)
    logprob = torch.log_softmax(t_logits, dim=-1).gather(-1, ids_ref)
    loss_ref, metrics_ref = fork_policy_loss_3d(logprob.detach(), logprob, advantages_ref, torch.from_numpy(mask),
                                                0.2, 0.2, 3.0, "token-mean")
    loss_ref.backward()

    ids, valid = id_sets(d["S_ids"].numpy(), d["T_ids"].numpy(), strategy=strategy)
    rewards = token_rewards(gather(d["student_all"], ids), gather(d["teacher_all"], ids), valid, strategy=strategy,
                            weight_mode="student_p")
    advantages = distill.token_reward_direct(rewards, mask)

    def ours(logits):
        lp = gather(jax.nn.log_softmax(logits, axis=-1), ids)
        return distill.topk_policy_loss(lp, jax.lax.stop_gradient(lp), advantages, mask)

    (loss, metrics), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(student_logits))
    np.testing.assert_allclose(loss, loss_ref.item(), **TOL)
    np.testing.assert_allclose(grad, t_logits.grad.numpy(), **TOL)
    n = mask.sum()
    np.testing.assert_allclose(loss, -np.sum(np.asarray(advantages)) / (n + 1e-8), **TOL)  # ratio ≡ 1
    assert float(metrics["pg_clipfrac"]) == 0.0 and float(metrics["ppo_kl"]) == 0.0
    assert float(metrics_ref["pg_clipfrac"]) == 0.0 and float(metrics_ref["ppo_kl"]) == 0.0


def test_unknown_options_raise():
    ids = np.zeros((1, 1, 2), np.int32)
    lp = np.zeros((1, 1, 2), np.float32)
    with pytest.raises(ValueError, match=r"top_k_strategy='both'.*only_stu.*union-intersection"):
        distill.topk_id_sets(ids, ids, "both")
    with pytest.raises(ValueError, match=r"top_k_strategy='both'"):
        distill.distillation_token_rewards(lp, lp, lp > -1, strategy="both")
    with pytest.raises(ValueError, match=r"reward_weight_mode='uniform'.*student_p.*teacher_p.*none"):
        distill.topk_reverse_kl_rewards(lp, lp, lp > -1, weight_mode="uniform")
    with pytest.raises(ValueError, match=r"kl_estimator='k2'.*k1.*k3"):
        distill.sampled_token_rewards(lp[..., 0], lp[..., 0], kind="k2")
    with pytest.raises(ValueError, match=r"loss_agg_mode='mean'.*token-mean"):
        distill.topk_policy_loss(lp, lp, lp, np.ones((1, 1)), agg="mean")
    with pytest.raises(ValueError, match="needs the teacher's top-k ids"):
        distill.topk_id_sets(ids, None, "union")
