"""On-policy distillation end to end: the scoring pass (train/distill.py) and the OPD train step (train/step.py).

Student and teacher are two different tiny random `transformers` Qwen3 models with the same vocabulary (fp32).
The reference runs them in PyTorch, one sequence at a time, and follows the OPD fork with the torch
transcription of tests/test_distill.py (top-k with torch.topk, the id sets, rewards, advantages and the 3-D
PPO loss); ours scores packed micro-batches on device and accumulates the step's gradient over them. The
two agree on the candidate ids, the advantages, the metrics, the loss and the gradient of every parameter.
Then: one row equals several micro-batches, the unfused step equals the fused one, and an 8-device mesh
(data 2 × fsdp 4) equals one device.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mathgrpo.config import DistillConfig, GRPOConfig, MeshConfig, ModelSource, OptimConfig
from mathgrpo.parallel import mesh as parallel_mesh
from mathgrpo.parallel import shardings as parallel_shardings
from mathgrpo.train import distill as train_distill
from mathgrpo.train import packing
from mathgrpo.train import state as train_state
from mathgrpo.train import step as train_step_lib
from mathgrpo.weights import hf
from tests.test_distill import (
    K,
    fork_compute_reward_weights,
    fork_distillation_reward,
    fork_inputs,
    fork_policy_loss_3d,
    fork_token_reward_direct,
)
from tests.test_train_step import assert_trees_close, relative_error

TEMPERATURE = 0.9  # the rollout's: the student's log-probs are of logits / 0.9
TEACHER_TEMPERATURE = 1.3
ALGO = GRPOConfig(rollout_is=None)  # OPD runs without rollout IS (docs/recipe.md §1.1)
TEACHER = ModelSource(path="unused")
STUDENT_SHAPE = dict(seed=0)
TEACHER_SHAPE = dict(seed=1, hidden_size=96, intermediate_size=128, num_hidden_layers=3)

# (name, top_k, top_k_strategy, reward_weight_mode, estimator)
CASES = [
    ("recipe", K, "only_stu", "student_p", "token_reward_direct"),
    ("union", K, "union", "student_p", "token_reward_direct"),
    ("k1", 0, "only_stu", "student_p", "token_reward_direct"),
    ("recipe+grpo", K, "only_stu", "student_p", "token_reward_direct_plus_grpo"),
    ("k1+grpo", 0, "only_stu", "student_p", "token_reward_direct_plus_grpo"),
]
GRPO_WEIGHT = 0.5


def distill_config(top_k, strategy="only_stu", weight_mode="student_p", estimator="token_reward_direct"):
    return DistillConfig(teacher=TEACHER, teacher_temperature=TEACHER_TEMPERATURE, top_k=top_k,
                         top_k_strategy=strategy, reward_weight_mode=weight_mode, estimator=estimator,
                         grpo_outcome_weight=GRPO_WEIGHT)


def random_sequences(seed, count=8, vocab=128):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, rng.integers(2, 7)) for _ in range(count)]
    responses = [rng.integers(0, vocab, rng.integers(1, 10)) for _ in range(count)]
    responses[3] = responses[3][:1]
    grpo_advantages = rng.normal(size=count)  # the GRPO outcome advantage of each sequence (plus_grpo)
    return prompts, responses, grpo_advantages


@functools.cache
def gradient_fn(model, algo=ALGO, fused=True):
    return jax.jit(functools.partial(train_step_lib.accumulate_gradients, model=model, algo=algo,
                                     temperature=TEMPERATURE, fused=fused))


def responses_of(values, placements):
    """Per-token [M, R, L(, K)] values → the response positions of every sequence, concatenated in order."""
    return np.concatenate(packing.unpack_responses(np.asarray(values), placements), axis=0)


@pytest.fixture(scope="module")
def models(tiny_hf_dir):
    import transformers

    student_dir, teacher_dir = tiny_hf_dir(**STUDENT_SHAPE), tiny_hf_dir(**TEACHER_SHAPE)
    student, student_params = hf.load(student_dir, compute_dtype="float32")
    teacher, teacher_params = hf.load(teacher_dir, compute_dtype="float32")
    assert student.vocab_size == teacher.vocab_size and student.hidden_size != teacher.hidden_size

    def torch_model(path):
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                 attn_implementation="eager")

    return dict(student=student, student_params=student_params, teacher=teacher, teacher_params=teacher_params,
                torch_student=torch_model(student_dir), torch_teacher=torch_model(teacher_dir))


def score(models, config, batch, mesh=None):
    fn = train_distill.make_score_fn(models["student"], models["teacher"], config, ALGO, temperature=TEMPERATURE,
                                     mesh=mesh)
    return fn(models["student_params"], models["teacher_params"], batch)


# --- the reference: PyTorch transformers + the fork's formulas --------------------------------------


def torch_reference(models, prompts, responses, grpo_advantages, top_k, strategy, weight_mode, estimator):
    """The scoring pass and the OPD loss in torch. Every response position of every sequence is one row of a
    [1, N] batch: all the fork's formulas are per position, and its token-mean over that batch is the
    mini-batch's global token mean. Returns targets, metrics, the loss and the student's gradients."""
    student, teacher = models["torch_student"], models["torch_teacher"]
    student.zero_grad()
    student_logits, teacher_logits, sampled, outcome = [], [], [], []
    for p, r, a in zip(prompts, responses, grpo_advantages):
        ids = torch.tensor(np.concatenate([p, r]))[None]
        span = slice(len(p) - 1, len(p) + len(r) - 1)  # the positions that predict the response tokens
        student_logits.append(student(ids).logits[0, span] / TEMPERATURE)
        with torch.no_grad():
            teacher_logits.append(teacher(ids).logits[0, span] / TEACHER_TEMPERATURE)
        sampled.append(torch.tensor(r))
        outcome.append(torch.full((len(r),), float(a)))
    logits = torch.cat(student_logits)[None]  # [1, N, V]
    t_logits = torch.cat(teacher_logits)[None]
    sampled, outcome = torch.cat(sampled)[None], torch.cat(outcome)[None]
    mask = torch.ones(sampled.shape)
    student_all = torch.log_softmax(logits, -1)
    teacher_all = torch.log_softmax(t_logits, -1)
    s_sampled = student_all.detach().gather(-1, sampled[..., None])[..., 0]
    t_sampled = teacher_all.gather(-1, sampled[..., None])[..., 0]
    out = {"metrics": {"distill/sampled_reverse_kl": (s_sampled - t_sampled).mean().item(),
                       "distill/student_logprob": s_sampled.mean().item(),
                       "distill/teacher_logprob": t_sampled.mean().item()}}
    if top_k:
        assert top_k == K  # the transcription's top-k size
        d = fork_inputs(logits.detach().numpy(), t_logits.numpy(), strategy)
        rewards, ids, valid = fork_distillation_reward(d, strategy, weight_mode)  # [1, N, K']
        advantages = fork_token_reward_direct(rewards, mask)
        if estimator == "token_reward_direct_plus_grpo":  # the outcome term on the ids that count
            advantages = advantages + GRPO_WEIGHT * torch.where(valid, (outcome * mask)[..., None], 0.0)
        logprob = student_all.gather(-1, ids)
        loss, _ = fork_policy_loss_3d(logprob.detach(), logprob, advantages, mask, 0.2, 0.2, 3.0, "token-mean")
        s_ids, t_ids = logprob.detach(), teacher_all.gather(-1, ids)
        kl_weights = fork_compute_reward_weights(s_ids, t_ids, valid, "student_p")
        token_rewards = rewards.sum(-1)
        out["metrics"].update({
            "distill/overlap_ratio": d["overlap_mask"].mean().item(),
            "distill/valid_ids": valid.float().sum(-1).mean().item(),
            "distill/reverse_kl": torch.where(valid, kl_weights * (s_ids - t_ids), 0.0).sum(-1).mean().item(),
        })
        out.update(ids=ids[0].numpy(), advantages=advantages[0].numpy(), old=s_ids[0].numpy())
    else:  # sampled-token OPD: the 2-D loss with per-token advantages, on-policy (ratio 1)
        token_rewards = -(s_sampled - t_sampled)
        advantages = fork_token_reward_direct(token_rewards, mask)
        if estimator == "token_reward_direct_plus_grpo":
            advantages = advantages + GRPO_WEIGHT * outcome * mask
        logprob = student_all.gather(-1, sampled[..., None])[..., 0]
        loss = torch.sum(-advantages * torch.exp(logprob - logprob.detach()) * mask) / mask.sum()
        out["metrics"]["distill/reverse_kl"] = (-token_rewards).mean().item()
        out.update(advantages=advantages[0].numpy())
    out["metrics"].update({"distill/token_reward/mean": token_rewards.mean().item(),
                           "distill/token_reward/max": token_rewards.max().item(),
                           "distill/token_reward/min": token_rewards.min().item()})
    out["old_logprobs"] = s_sampled[0].numpy()
    loss.backward()
    out["loss"] = loss.item()
    out["grads"] = {name: p.grad.numpy().copy() for name, p in student.named_parameters()}
    return out


@pytest.fixture(scope="module", params=CASES, ids=[case[0] for case in CASES])
def case(request, models):
    """One configuration scored and differentiated both ways (shared by the tests below)."""
    _, top_k, strategy, weight_mode, estimator = request.param
    prompts, responses, grpo_advantages = random_sequences(0, vocab=models["student"].vocab_size)
    batch, placements = packing.pack(prompts, responses, grpo_advantages, num_rows=2, row_length=16)
    assert int(batch.num_micro_batches) > 1 and int(np.asarray(batch.segment_ids).max()) > 1
    config = distill_config(top_k, strategy, weight_mode, estimator)
    scored, metrics = score(models, config, batch)
    loss, grads, sums, old, _ = gradient_fn(models["student"])(models["student_params"], scored)
    expected = torch_reference(models, prompts, responses, grpo_advantages, top_k, strategy, weight_mode, estimator)
    return dict(student=models["student"], config=config, batch=batch, scored=scored, placements=placements,
                metrics=metrics, loss=loss, grads=grads, sums=sums, old=old, expected=expected)


# --- tests ----------------------------------------------------------------------------------------


def test_scoring_pass_matches_torch(case):
    """The candidate ids (the same ids in the same order: torch.topk's), advantages, π_old log-probs and the
    distill/ metrics of the scoring pass equal the torch computation."""
    expected, scored, placements = case["expected"], case["scored"], case["placements"]
    if case["config"].top_k:
        assert scored.topk_ids.shape[-1] == train_distill.candidate_width(case["config"])
        np.testing.assert_array_equal(responses_of(scored.topk_ids, placements), expected["ids"])
        np.testing.assert_allclose(responses_of(scored.topk_advantages, placements), expected["advantages"],
                                   rtol=1e-4, atol=2e-6)
        np.testing.assert_allclose(responses_of(scored.topk_old_logprobs, placements), expected["old"],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(scored.advantages, case["batch"].advantages)  # the GRPO outcome, as packed
    else:
        assert scored.topk_ids is None and scored.topk_advantages is None  # GRPO's pytree: the same step
        np.testing.assert_allclose(responses_of(scored.advantages, placements), expected["advantages"],
                                   rtol=1e-4, atol=2e-6)
    off_response = np.asarray(case["batch"].loss_mask) == 0
    for values in (scored.advantages, scored.old_logprobs) + ((scored.topk_advantages,) if case["config"].top_k
                                                              else ()):
        assert np.all(np.asarray(values)[off_response] == 0.0)
    np.testing.assert_allclose(responses_of(scored.old_logprobs, placements), expected["old_logprobs"],
                               rtol=1e-5, atol=1e-5)
    assert set(case["metrics"]) == set(expected["metrics"])
    for name, value in expected["metrics"].items():
        np.testing.assert_allclose(case["metrics"][name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def test_opd_gradient_matches_pytorch(case):
    """Scoring pass → the train step's accumulated gradient over several packed micro-batches = the gradient of
    the fork's OPD loss in torch (fp32, ≤ 1e-4 relative per tensor); on-policy the metrics are the fork's."""
    expected = case["expected"]
    np.testing.assert_allclose(float(case["loss"]), expected["loss"], rtol=1e-5, atol=1e-7)
    for name, ours in hf.hf_tensors(case["student"], case["grads"]):
        assert relative_error(ours, expected["grads"][name]) <= 1e-4, name
    tokens = float(case["batch"].token_count)
    np.testing.assert_allclose(float(case["sums"]["pg_loss"]) / tokens, expected["loss"], rtol=1e-5, atol=1e-7)
    assert float(case["sums"]["pg_clipfrac"]) == 0.0 and float(case["sums"]["ppo_kl"]) == 0.0  # ratio ≡ 1
    np.testing.assert_allclose(responses_of(case["old"], case["placements"]), expected["old_logprobs"], atol=1e-5)


def test_one_row_equals_micro_batches_and_unfused_equals_fused(models):
    """The same sequences in one row, or over several micro-batches of 2 rows: the same targets, metrics, loss
    and gradient. The unfused step (π_old = the scoring pass's `topk_old_logprobs`) equals the fused one."""
    prompts, responses, grpo_advantages = random_sequences(1, vocab=models["student"].vocab_size)
    config = distill_config(K, "union-intersection", "teacher_p", "token_reward_direct_plus_grpo")
    results = []
    for rows, length in ((1, 128), (2, 16)):
        batch, placements = packing.pack(prompts, responses, grpo_advantages, num_rows=rows, row_length=length)
        scored, metrics = score(models, config, batch)
        loss, grads, _, _, _ = gradient_fn(models["student"])(models["student_params"], scored)
        results.append((scored, placements, metrics, loss, grads))
    (one, one_at, one_metrics, one_loss, one_grads), (many, many_at, many_metrics, many_loss, many_grads) = results
    assert int(one.num_micro_batches) == 1 and int(many.num_micro_batches) >= 3
    np.testing.assert_array_equal(responses_of(many.topk_ids, many_at), responses_of(one.topk_ids, one_at))
    np.testing.assert_allclose(responses_of(many.topk_advantages, many_at), responses_of(one.topk_advantages, one_at),
                               rtol=1e-5, atol=1e-7)
    for name, value in one_metrics.items():
        np.testing.assert_allclose(many_metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(many_loss, one_loss, atol=2e-7)
    assert_trees_close(many_grads, one_grads, 1e-5)

    loss, grads, sums, old, _ = gradient_fn(models["student"], fused=False)(models["student_params"], many)
    np.testing.assert_allclose(loss, many_loss, atol=2e-7)
    assert_trees_close(grads, many_grads, 1e-5)
    assert abs(float(sums["ppo_kl"])) < 1e-4 * float(many.token_count)  # π_old from the scoring pass ≈ π_θ
    with pytest.raises(ValueError, match="topk_old_logprobs"):
        gradient_fn(models["student"], fused=False)(models["student_params"], many.replace(topk_old_logprobs=None))


def run_opd_step(models, batch, config, mesh=None):
    """Scoring pass then a whole train step (clip, AdamW) on one device or a mesh."""
    student = models["student"].replace(remat_policy="full")  # the recipe's remat: in-place layer gradients
    optim = OptimConfig(lr=1e-3, eps=1e-3)  # eps keeps Adam's first update linear in g (see test_sharding)
    state = train_state.init_train_state(jax.tree.map(jnp.copy, models["student_params"]), optim)  # donated
    teacher_params = models["teacher_params"]
    if mesh is not None:
        optimizer = train_state.make_optimizer(optim)
        state = parallel_shardings.put_global(state, train_state.train_state_shardings(student, optimizer, mesh))
        teacher_params = parallel_shardings.put_global(
            teacher_params, parallel_shardings.param_shardings(models["teacher"], mesh))
        batch = parallel_shardings.put_global(batch, packing.batch_shardings(mesh))
    score_fn = train_distill.make_score_fn(student, models["teacher"], config, ALGO, temperature=TEMPERATURE,
                                           mesh=mesh)
    scored, metrics = score_fn(state.params, teacher_params, batch)
    step = train_step_lib.make_train_step(student, ALGO, optim, temperature=TEMPERATURE, mesh=mesh)
    state, out = step(state, scored)
    return jax.tree.map(np.asarray, (scored, metrics, state.params, out))


def test_mesh_equals_one_device(models):
    """data 2 × fsdp 4 on 8 CPU devices (vocabulary-parallel heads, sharded top-k, rows over both batch axes)
    gives the single device's candidate ids, advantages, metrics and updated params."""
    prompts, responses, grpo_advantages = random_sequences(2, count=16, vocab=models["student"].vocab_size)
    batch, _ = packing.pack(prompts, responses, grpo_advantages, num_rows=8, row_length=24)
    config = distill_config(K, "union", "student_p")
    mesh = parallel_mesh.make_mesh(MeshConfig(data=2, fsdp=4, tensor=1), jax.devices()[:8])
    ref_scored, ref_metrics, ref_params, ref_out = run_opd_step(models, batch, config)
    scored, metrics, params, out = run_opd_step(models, batch, config, mesh)
    np.testing.assert_array_equal(scored.topk_ids, ref_scored.topk_ids)
    np.testing.assert_allclose(scored.topk_advantages, ref_scored.topk_advantages, rtol=1e-5, atol=1e-6)
    for name, value in {**ref_metrics, **ref_out["metrics"]}.items():
        np.testing.assert_allclose({**metrics, **out["metrics"]}[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    for got, expected in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        assert relative_error(got, expected) <= 1e-5


def test_grpo_batches_keep_their_pytree():
    """`pack` leaves the top-k fields None: a GRPO batch has the leaves it always had, and `put_global` with
    `batch_shardings(mesh)` places it; the step's `topk=True` shardings fit both kinds as a jit prefix."""
    prompts, responses, advantages = random_sequences(3)
    batch, _ = packing.pack(prompts, responses, advantages, num_rows=2, row_length=16)
    assert batch.topk_ids is None and batch.topk_advantages is None and batch.topk_old_logprobs is None
    assert len(jax.tree.leaves(batch)) == 14
    mesh = parallel_mesh.make_mesh(MeshConfig(data=1, fsdp=2, tensor=1), jax.devices()[:2])
    placed = parallel_shardings.put_global(batch, packing.batch_shardings(mesh))
    assert placed.tokens.sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"), None)
    assert jax.tree.structure(packing.batch_shardings(mesh)) == jax.tree.structure(batch)
    spec = packing.batch_shardings(mesh, topk=True).topk_ids.spec
    assert spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"), None, None)
    with_topk = batch.replace(topk_ids=jnp.zeros((*batch.tokens.shape, 2), jnp.int32))
    assert len(jax.tree.leaves(with_topk)) == 15
