"""The scoring pass of on-policy distillation (OPD): the teacher scores the student's rollouts on device and
the packed batch gets its token-level advantages (docs/recipe.md §1.5).

One OPD step as the OPD fork of verl runs it (`ray_trainer.fit`), and where each part lives here:

1. The student samples (T = rollout temperature); the rule-based reward is still computed (rollout,
   reward; `critic/true_reward/*`). It enters the advantages only under `token_reward_direct_plus_grpo`,
   as the GRPO outcome advantage Â that `pack` writes on each response token (`batch.advantages`).
2. The actor's `compute_log_prob`: log π_S of the sampled tokens and, with K = `top_k` > 0, the
   student's top-K ids S and log-probs at them, all of logits / T.                       (this pass)
3. The teacher's `compute_rm_score`: a forward pass on the same tokens, logits / `teacher_temperature`:
   log π_T of the sampled tokens and, with K > 0, log π_T at the student's ids and the teacher's own
   top-K ids Te and log-probs; then `compute_distillation_reward` adds log π_S at the teacher's ids
   (only_tch, union, union-intersection).                                                (this pass)
4. Token rewards (rl/distill.py): K = 0, r_t = −(log π_S(y_t) − log π_T(y_t)) (k1; or −k3);
   K > 0, r_{t,k} = −w_k (S_k − T_k) over the id set of `top_k_strategy`, w by `reward_weight_mode`.
5. Advantages: `token_reward_direct` A = r·m, or `token_reward_direct_plus_grpo` A = r·m + λ·Â·m
   (λ = `grpo_outcome_weight`; for K > 0 on the ids that count).                         (this pass)
6. `update_actor`: the PPO loss per token, summed over the K ids when there are K, token-mean
   aggregated (train/step.py, on the batch this pass returns). On-policy the ratio is 1.

`make_score_fn` does 2–5 in one jitted function over the packed batch, micro-batch by micro-batch (a
`fori_loop`, as `step.make_logprob_fn`; no gradient), and writes the results into the batch in its packed
layout, so nothing goes back to the host: with K > 0 `topk_ids`, `topk_advantages` and `topk_old_logprobs`
[M, R, L, K'] (K' = K, or 2K for the union strategies), with K = 0 the `advantages` [M, R, L]; in both
cases `old_logprobs` = log π_S of the sampled tokens (what `make_logprob_fn` gives).

Per micro-batch the LM heads walk the vocabulary in blocks and never hold [tokens, V] logits
(rl/logprobs.py): the student's walk gives its top-K and the sampled token's log-prob together
(`hidden_topk` with targets), the teacher's walk its own top-K and its log-probs at the student's ids and
at the sampled token; a second student walk, at the teacher's ids, runs only for the strategies that need
it. K = 0 needs one walk per model at the sampled token. Both models run in their own compute dtype; the
teacher's params are an input like the student's, sharded by the same rules and never differentiated.

Metrics (means over the response tokens of the mini-batch, computed on device):

    distill/overlap_ratio        share of the student's top-K ids in the teacher's top-K (the paper's overlap
                                 ratio; the fork logs it as `val-topk/overlap_ratio`)              K > 0
    distill/valid_ids            ids that count per token (K for only_stu; up to 2K for union)      K > 0
    distill/reverse_kl           the per-token reverse KL the rewards estimate: K > 0,
                                 Σ_{k valid} p̃_k (S_k − T_k) with p̃ = the student's probabilities
                                 renormalised over the valid ids (whatever the weight mode; = −Σ_k r_k
                                 for student_p); K = 0, the reward's estimator at y_t (k1 or k3)
    distill/sampled_reverse_kl   log π_S(y_t) − log π_T(y_t), k1 at the sampled token (any K)
    distill/student_logprob      log π_S(y_t)        distill/teacher_logprob   log π_T(y_t)
    distill/token_reward/{mean,max,min}   the token reward r_t (Σ_k r_{t,k} for K > 0, the sum the loss
                                 takes), before the GRPO term
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mathgrpo.config import DistillConfig, GRPOConfig, ModelConfig
from mathgrpo.model import forward, output_kernel
from mathgrpo.parallel import mesh as parallel_mesh
from mathgrpo.parallel import shardings as parallel_shardings
from mathgrpo.parallel.mesh import MeshJit
from mathgrpo.rl import distill
from mathgrpo.rl import logprobs as rl_logprobs
from mathgrpo.train import packing
from mathgrpo.train.packing import PackedBatch
from mathgrpo.train.step import micro_batch_arrays

UNION_STRATEGIES = ("union", "union-intersection")
NEEDS_STUDENT_ON_TEACHER = ("only_tch",) + UNION_STRATEGIES  # strategies scored at the teacher's ids too
SUMS = ("tokens", "overlap", "valid_ids", "reverse_kl", "sampled_reverse_kl", "student_logprob",
        "teacher_logprob", "token_reward")


def candidate_width(config: DistillConfig) -> int:
    """K', the number of candidate ids per position the batch carries: K, 2K for the union strategies, 0 for
    sampled-token OPD."""
    return 2 * config.top_k if config.top_k_strategy in UNION_STRATEGIES else config.top_k


def _hidden(config: ModelConfig, params, mb: dict):
    """Final hidden states [R, L, D] and the [D, V] head of one model on the micro-batch's tokens."""
    hidden, _ = forward(config, params, mb["tokens"], mb["positions"], mb["segment_ids"], return_hidden=True)
    return hidden, output_kernel(config, params)


def score_micro_batch(student_params, teacher_params, mb: dict, *, student: ModelConfig, teacher: ModelConfig,
                      config: DistillConfig, algo: GRPOConfig, temperature: float):
    """One micro-batch's targets ([R, L(, K')] arrays) and its metric sums (module docstring)."""
    mask = mb["loss_mask"]
    tokens = mb["tokens"]
    blocks = dict(chunk_size=algo.logprob_chunk_size, vocab_block=algo.logprob_vocab_block, mask=mask)
    k = config.top_k
    hidden_s, kernel_s = _hidden(student, student_params, mb)
    hidden_t, kernel_t = _hidden(teacher, teacher_params, mb)
    out, sums = {}, {}
    if k == 0:
        student_sampled, _ = rl_logprobs.hidden_logprobs(student, kernel_s, hidden_s, tokens,
                                                         temperature=temperature, **blocks)
        teacher_sampled, _ = rl_logprobs.hidden_logprobs(teacher, kernel_t, hidden_t, tokens,
                                                         temperature=config.teacher_temperature, **blocks)
        rewards = distill.sampled_token_rewards(student_sampled, teacher_sampled, config.sampled_kl)  # [R, L]
        token_rewards, reverse_kl = rewards, -rewards
        if config.estimator == "token_reward_direct":
            out["advantages"] = distill.token_reward_direct(rewards, mask)
        else:
            out["advantages"] = distill.token_reward_direct_plus_grpo(
                rewards, mask, mb["advantages"], weight=config.grpo_outcome_weight)
    else:
        strategy = config.top_k_strategy
        # the student's top-k and its sampled-token log-prob in one walk
        student_ids, student_on_student, student_sampled = rl_logprobs.hidden_topk(
            student, kernel_s, hidden_s, k=k, temperature=temperature, targets=tokens, **blocks)
        # the teacher's top-k and its log-probs at the student's ids and at the sampled token in one walk
        teacher_ids, teacher_on_teacher, picked = rl_logprobs.hidden_topk(
            teacher, kernel_t, hidden_t, k=k, temperature=config.teacher_temperature,
            targets=jnp.concatenate([student_ids, tokens[..., None]], axis=-1), **blocks)
        teacher_on_student, teacher_sampled = picked[..., :k], picked[..., k]
        student_on_teacher = None
        if strategy in NEEDS_STUDENT_ON_TEACHER:
            student_on_teacher, _ = rl_logprobs.hidden_logprobs(student, kernel_s, hidden_s, teacher_ids,
                                                                temperature=temperature, **blocks)
        ids, valid = distill.topk_id_sets(student_ids, teacher_ids, strategy)
        student_lp, teacher_lp = distill.strategy_logprobs(student_on_student, teacher_on_student,
                                                           student_on_teacher, teacher_on_teacher, strategy=strategy)
        rewards = distill.distillation_token_rewards(student_lp, teacher_lp, valid, strategy=strategy,
                                                     weight_mode=config.reward_weight_mode)  # [R, L, K']
        if config.estimator == "token_reward_direct":
            advantages = distill.token_reward_direct(rewards, mask)
        else:
            advantages = distill.token_reward_direct_plus_grpo(rewards, mask, mb["advantages"],
                                                               weight=config.grpo_outcome_weight, valid=valid)
        on_response = mask[..., None] > 0
        out["topk_ids"] = jnp.where(on_response, ids, 0).astype(jnp.int32)
        out["topk_advantages"] = advantages
        out["topk_old_logprobs"] = jnp.where(on_response, student_lp, 0.0)
        token_rewards = jnp.sum(rewards, axis=-1)
        reverse_kl = -jnp.sum(distill.topk_reverse_kl_rewards(student_lp, teacher_lp, valid, weight_mode="student_p"),
                              axis=-1)
        overlap = distill.topk_overlap_mask(student_ids, teacher_ids).astype(jnp.float32)
        sums["overlap"] = jnp.sum(jnp.sum(overlap, axis=-1) * mask) / k
        sums["valid_ids"] = jnp.sum(jnp.sum(valid.astype(jnp.float32), axis=-1) * mask)
    out["old_logprobs"] = student_sampled * mask
    sums.update(tokens=jnp.sum(mask), reverse_kl=jnp.sum(reverse_kl * mask),
                sampled_reverse_kl=jnp.sum((student_sampled - teacher_sampled) * mask),
                student_logprob=jnp.sum(student_sampled * mask), teacher_logprob=jnp.sum(teacher_sampled * mask),
                token_reward=jnp.sum(token_rewards * mask))
    on = mask > 0
    extremes = (jnp.max(jnp.where(on, token_rewards, -jnp.inf)), jnp.min(jnp.where(on, token_rewards, jnp.inf)))
    return out, sums, extremes


def make_score_fn(student: ModelConfig, teacher: ModelConfig, distill_config: DistillConfig, algo: GRPOConfig, *,
                  temperature: float, mesh: Mesh | None = None, rules=parallel_mesh.LOGICAL_RULES):
    """The jitted scoring pass `(student_params, teacher_params, batch) -> (batch with targets, metrics)`.

    `temperature`: the rollout's (the student's log-probs are of logits / T); the teacher's are of logits /
    `distill_config.teacher_temperature`. The batch comes from `pack` (its `advantages`: the GRPO outcome
    advantage on each response token, read by `token_reward_direct_plus_grpo` only); the result is the same
    batch with the module docstring's fields written, for `step.make_train_step` (whose jit takes either).
    `algo` supplies the heads' block sizes. Metrics: `distill/...` scalars (module docstring).
    With a mesh both params are sharded by `rules` (`parallel_shardings.param_shardings`), the batch by rows.
    """
    if student.vocab_size != teacher.vocab_size:
        raise ValueError(f"the teacher's vocabulary ({teacher.vocab_size}) differs from the student's "
                         f"({student.vocab_size}); OPD compares the two distributions id by id")
    k = distill_config.top_k
    if k > student.vocab_size:
        raise ValueError(f"distill.top_k={k} exceeds the vocabulary ({student.vocab_size})")
    width = candidate_width(distill_config)
    options = dict(student=student, teacher=teacher, config=distill_config, algo=algo, temperature=temperature)

    def score(student_params, teacher_params, batch: PackedBatch):
        shape = batch.tokens.shape  # [M, R, L]
        if k:
            outputs = {"topk_ids": jnp.zeros((*shape, width), jnp.int32),
                       "topk_advantages": jnp.zeros((*shape, width), jnp.float32),
                       "topk_old_logprobs": jnp.zeros((*shape, width), jnp.float32)}
        else:
            outputs = {"advantages": jnp.zeros(shape, jnp.float32)}
        outputs["old_logprobs"] = jnp.zeros(shape, jnp.float32)
        sums = {name: jnp.zeros((), jnp.float32) for name in SUMS}
        extremes = (jnp.array(-jnp.inf, jnp.float32), jnp.array(jnp.inf, jnp.float32))

        def one(m, carry):  # only the batch's real micro-batches run; the bucket's spare ones stay 0
            outputs, sums, (high, low) = carry
            out, mb_sums, (mb_high, mb_low) = score_micro_batch(student_params, teacher_params,
                                                                micro_batch_arrays(batch, m), **options)
            outputs = {name: jax.lax.dynamic_update_index_in_dim(outputs[name], out[name], m, 0) for name in outputs}
            sums = {name: sums[name] + mb_sums.get(name, 0.0) for name in sums}
            return outputs, sums, (jnp.maximum(high, mb_high), jnp.minimum(low, mb_low))

        outputs, sums, (high, low) = jax.lax.fori_loop(0, batch.num_micro_batches, one, (outputs, sums, extremes))
        tokens = sums.pop("tokens")
        any_tokens = tokens > 0
        metrics = {f"distill/{name}": value / jnp.maximum(tokens, 1.0) for name, value in sums.items()
                   if k or name not in ("overlap", "valid_ids")}
        if k:
            metrics["distill/overlap_ratio"] = metrics.pop("distill/overlap")
        metrics["distill/token_reward/mean"] = metrics.pop("distill/token_reward")
        metrics["distill/token_reward/max"] = jnp.where(any_tokens, high, 0.0)
        metrics["distill/token_reward/min"] = jnp.where(any_tokens, low, 0.0)
        return batch.replace(**outputs), metrics

    shardings = {}
    if mesh is not None:
        rows = packing.batch_shardings(mesh, topk=True)
        shardings = dict(in_shardings=(parallel_shardings.param_shardings(student, mesh, rules),
                                       parallel_shardings.param_shardings(teacher, mesh, rules), rows),
                         out_shardings=(rows, parallel_shardings.replicated(mesh)))
    return MeshJit(score, mesh, rules, **shardings)
