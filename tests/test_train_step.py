"""The jitted train step: gradients vs PyTorch, micro-batching, packing, fused on-policy step, NaN skip, AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mathgrpo.config import GRPOConfig, ModelConfig, OptimConfig
from mathgrpo.model import init_params
from mathgrpo.train import packing
from mathgrpo.train import state as train_state
from mathgrpo.train import step as train_step_lib
from mathgrpo.weights import hf

TINY = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, compute_dtype="float32")


def random_sequences(seed, count=8, vocab=97):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, rng.integers(2, 7)) for _ in range(count)]
    responses = [rng.integers(0, vocab, rng.integers(1, 10)) for _ in range(count)]
    responses[3] = responses[3][:1]
    advantages = rng.normal(size=count)
    rollout = [rng.normal(-4.0, 0.5, len(r)) for r in responses]
    return prompts, responses, advantages, rollout


def grads_of(params, batch, algo=GRPOConfig(), fused=True, model=TINY, temperature=1.0, horizon=None):
    loss, grads, sums, old, entropy = jax.jit(
        lambda p, b: train_step_lib.accumulate_gradients(p, b, model=model, algo=algo, temperature=temperature,
                                                         horizon=horizon, fused=fused))(params, batch)
    return loss, grads, old


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def assert_trees_close(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert relative_error(x, y) <= tol, relative_error(x, y)


def test_grpo_gradient_matches_pytorch(tiny_hf_dir):
    """Our fused GRPO loss (TIS weights, token-mean, T = 0.8) vs the same loss written with transformers."""
    import transformers

    path = tiny_hf_dir(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    config, params = hf.load(path, compute_dtype="float32")
    prompts, responses, advantages, rollout = random_sequences(0, vocab=config.vocab_size)
    algo = GRPOConfig()
    batch, _ = packing.pack(prompts, responses, advantages, num_rows=2, row_length=16, rollout_logprobs=rollout)
    assert int(batch.num_micro_batches) > 1
    loss, grads, _ = grads_of(params, batch, algo, model=config, temperature=0.8)

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    total_tokens = sum(len(r) for r in responses)
    torch_loss = 0.0
    for p, r, a, lp_rollout in zip(prompts, responses, advantages, rollout):
        ids = torch.tensor(np.concatenate([p, r]))[None]
        logp = torch.log_softmax(model(ids).logits[0, :-1] / 0.8, -1)
        logp = logp.gather(-1, ids[0, 1:, None])[:, 0][len(p) - 1:]  # the response tokens
        old = logp.detach()
        ratio = torch.exp(torch.clamp(logp - old, -20, 20))
        weights = torch.clamp(torch.exp(torch.clamp(old - torch.tensor(lp_rollout), -20, 20)), max=2.0)
        torch_loss = torch_loss + torch.sum(-float(a) * ratio * weights) / total_tokens
    torch_loss.backward()
    np.testing.assert_allclose(float(loss), torch_loss.item(), rtol=1e-5)
    reference = dict(model.named_parameters())
    for name, ours in hf.hf_tensors(config, grads):
        assert relative_error(ours, reference[name].grad.numpy()) <= 1e-4, name


def test_micro_batches_equal_one_batch_and_packed_equals_unpacked():
    params = init_params(TINY, jax.random.key(0))
    prompts, responses, advantages, rollout = random_sequences(1)
    one, _ = packing.pack(prompts, responses, advantages, num_rows=1, row_length=128, rollout_logprobs=rollout)
    many, _ = packing.pack(prompts, responses, advantages, num_rows=2, row_length=16, rollout_logprobs=rollout)
    unpacked, _ = packing.pack(prompts, responses, advantages, num_rows=8, row_length=16, rollout_logprobs=rollout)
    assert int(one.num_micro_batches) == 1 and int(many.num_micro_batches) >= 3
    assert int(unpacked.num_micro_batches) == 1 and (np.asarray(unpacked.segment_ids).max() == 1)
    loss_one, grads_one, _ = grads_of(params, one)
    for other in (many, unpacked):
        loss, grads, _ = grads_of(params, other)
        # The loss is a sum of terms of both signs: compare it at fp32 summation precision (absolute);
        # the gradients, the quantity that matters, to 1e-6 relative.
        np.testing.assert_allclose(loss, loss_one, atol=2e-7)
        assert_trees_close(grads, grads_one, 1e-6)


def test_full_remat_accumulates_layer_gradients_in_place_and_equals_no_remat():
    """remat 'full' adds each micro-batch's layer gradients into the accumulator inside its backward
    scan (model.full_remat_layers' grad_sink); over several micro-batches the result must equal the
    plain value_and_grad-and-add of remat 'none'."""
    params = init_params(TINY, jax.random.key(0))
    prompts, responses, advantages, rollout = random_sequences(2)
    many, _ = packing.pack(prompts, responses, advantages, num_rows=2, row_length=16, rollout_logprobs=rollout)
    assert int(many.num_micro_batches) >= 3
    loss_ref, grads_ref, old_ref = grads_of(params, many)
    loss, grads, old = grads_of(params, many, model=TINY.replace(remat_policy="full"))
    np.testing.assert_allclose(loss, loss_ref, atol=2e-7)
    np.testing.assert_allclose(old, old_ref, atol=1e-6)
    assert_trees_close(grads, grads_ref, 1e-6)
    assert float(jnp.linalg.norm(grads["layers"]["mlp"]["down_proj"]["kernel"])) > 0


@pytest.mark.parametrize("mode", ["seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_sequence_aggregations_are_split_invariant(mode):
    params = init_params(TINY, jax.random.key(1))
    prompts, responses, advantages, rollout = random_sequences(2)
    algo = GRPOConfig(loss_agg_mode=mode)
    one, _ = packing.pack(prompts, responses, advantages, num_rows=1, row_length=128, rollout_logprobs=rollout)
    many, _ = packing.pack(prompts, responses, advantages, num_rows=2, row_length=16, rollout_logprobs=rollout)
    loss_one, grads_one, _ = grads_of(params, one, algo, horizon=12)
    loss_many, grads_many, _ = grads_of(params, many, algo, horizon=12)
    np.testing.assert_allclose(loss_many, loss_one, atol=2e-7)
    assert_trees_close(grads_many, grads_one, 1e-6)


def test_fused_step_equals_separate_old_logprob_pass():
    params = init_params(TINY, jax.random.key(2))
    prompts, responses, advantages, rollout = random_sequences(3)
    algo = GRPOConfig()
    optim = OptimConfig(lr=1e-3)
    batch, placements = packing.pack(prompts, responses, advantages, num_rows=2, row_length=16,
                                     rollout_logprobs=rollout)
    old_logprobs, _ = train_step_lib.make_logprob_fn(TINY, algo)(params, batch)
    old_per_sequence = packing.unpack_responses(old_logprobs, placements)
    unfused_batch, _ = packing.pack(prompts, responses, advantages, num_rows=2, row_length=16,
                                    rollout_logprobs=rollout, old_logprobs=old_per_sequence)
    fused_state, fused_out = train_step_lib.make_train_step(TINY, algo, optim)(
        train_state.init_train_state(jax.tree.map(jnp.copy, params), optim), batch)  # the state is donated
    unfused_state, _ = train_step_lib.make_train_step(TINY, algo, optim, fused=False)(
        train_state.init_train_state(params, optim), unfused_batch)
    assert_trees_close(fused_state.params, unfused_state.params, 1e-6)
    assert float(fused_out["metrics"]["actor/pg_clipfrac"]) == 0.0
    assert float(fused_out["metrics"]["actor/ppo_kl"]) == 0.0
    np.testing.assert_allclose(np.asarray(fused_out["old_logprobs"])[np.asarray(batch.loss_mask) > 0],
                               np.asarray(old_logprobs)[np.asarray(batch.loss_mask) > 0], atol=1e-6)


def test_nan_loss_skips_the_update_and_training_goes_on():
    params = init_params(TINY, jax.random.key(3))
    prompts, responses, advantages, rollout = random_sequences(4)
    optim = OptimConfig(lr=1e-3)
    step = train_step_lib.make_train_step(TINY, GRPOConfig(), optim)
    bad = advantages.copy()
    bad[0] = np.nan
    bad_batch, _ = packing.pack(prompts, responses, bad, num_rows=2, row_length=16, rollout_logprobs=rollout)
    good_batch, _ = packing.pack(prompts, responses, advantages, num_rows=2, row_length=16, rollout_logprobs=rollout)
    state = train_state.init_train_state(params, optim)
    before = jax.tree.map(np.asarray, state.params)
    state, out = step(state, bad_batch)
    assert int(state.skipped_steps) == 1 and int(state.step) == 0
    assert float(out["metrics"]["actor/update_skipped"]) == 1.0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), state.params, before)
    state, out = step(state, good_batch)
    assert int(state.step) == 1 and int(state.skipped_steps) == 1
    assert np.isfinite(float(out["metrics"]["actor/grad_norm"]))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)))


def test_optimizer_matches_torch_clip_and_adamw():
    """Two updates: our optax chain vs torch clip_grad_norm_(1.0) + AdamW(lr, (0.9, 0.999), 1e-8, wd 0.01)."""
    rng = np.random.default_rng(5)
    params = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    grads_seq = [{k: (rng.normal(size=v.shape) * s).astype(np.float32) for k, v in params.items()}
                 for s in (3.0, 0.01)]  # first clipped (norm > 1), second not
    optim = OptimConfig(lr=1e-2)
    optimizer = train_state.make_optimizer(optim)
    state = optimizer.init(params)
    ours = params
    for grads in grads_seq:
        updates, state = optimizer.update(grads, state, ours)
        ours = jax.tree.map(lambda p, u: p + u, ours, updates)
    torch_params = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.AdamW(torch_params.values(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    for grads in grads_seq:
        for k, p in torch_params.items():
            p.grad = torch.tensor(grads[k])
        torch.nn.utils.clip_grad_norm_(torch_params.values(), 1.0)
        opt.step()
    for k in params:
        np.testing.assert_allclose(ours[k], torch_params[k].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_verl_legacy_weighting():
    """verl's dp_actor: each (row, micro-batch) token mean weighted by n_seq / S_row, averaged over rows."""
    params = init_params(TINY, jax.random.key(4))
    prompts, responses, advantages, rollout = random_sequences(6)
    algo = GRPOConfig(loss_scaling="verl_legacy", rollout_is=None)
    batch, placements = packing.pack(prompts, responses, advantages, num_rows=2, row_length=16)
    loss, _, old = grads_of(params, batch, algo)
    # Derivation: ratio ≡ 1 so ℓ_t = -A; group sequences by (row, micro-batch).
    expected = 0.0
    rows = {}
    for i, p in enumerate(placements):
        rows.setdefault((p.row, p.micro_batch), []).append(i)
    per_row = {r: sum(len(v) for (rr, _), v in rows.items() if rr == r) for r in (0, 1)}
    for (r, m), ids in rows.items():
        tokens = sum(len(responses[i]) for i in ids)
        token_mean = sum(-advantages[i] * len(responses[i]) for i in ids) / tokens
        expected += token_mean * len(ids) / per_row[r] / 2
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_packing_errors_and_placements():
    prompts, responses, advantages, _ = random_sequences(7)
    with pytest.raises(ValueError, match="over the micro-batch budget"):
        packing.pack(prompts, responses, advantages, num_rows=2, row_length=5)
    batch, placements = packing.pack(prompts, responses, advantages, num_rows=2, row_length=20)
    counts = np.bincount([p.row for p in placements], minlength=2)
    assert counts.tolist() == [4, 4]  # equal sequence counts per row, as verl's balance_batch
    tokens = np.asarray(batch.tokens)
    for i, p in enumerate(placements):
        row = tokens[p.micro_batch, p.row, p.start: p.start + p.prompt_length + p.response_length]
        np.testing.assert_array_equal(row, np.concatenate([prompts[i], responses[i]]))
    assert float(batch.token_count) == sum(len(r) for r in responses)
    assert int(batch.num_micro_batches) <= batch.tokens.shape[0]


def test_packing_caps_sequences_per_row_for_cudnn():
    prompts, responses, advantages, _ = random_sequences(7)
    free, _ = packing.pack(prompts, responses, advantages, num_rows=1, row_length=200)
    capped, placements = packing.pack(prompts, responses, advantages, num_rows=1, row_length=200,
                                      max_sequences_per_row=2)
    assert np.asarray(free.segment_ids).max() > 2  # without the cap, rows hold more
    assert np.asarray(capped.segment_ids).max() <= 2
    assert int(capped.num_micro_batches) == 4  # ceil(8 / 2) with row room to spare
    assert float(capped.token_count) == float(free.token_count)
    assert packing.sequence_cap(TINY.replace(attention="cudnn", attention_max_segments=3)) == 3
    assert packing.sequence_cap(TINY.replace(attention="blockwise")) is None


@pytest.mark.parametrize("mode, level", [("token-mean", "token"), ("seq-mean-token-sum", "token"),
                                         ("seq-mean-token-mean", "token"), ("seq-mean-token-sum-norm", "token"),
                                         ("seq-mean-token-mean", "sequence")])
def test_packed_step_loss_and_gradient_equal_policy_loss_on_rows(mode, level):
    """One loss: the train step over packed micro-batches (several sequences per row, several
    micro-batches) gives grpo.policy_loss's value and gradient, computed on one row per sequence —
    the function the verl-reference tests check. Unfused, with π_old away from π_θ, so the ratio
    clips (both sides, dual clip) and GSPO's sequence ratio is not 1; TIS on."""
    from mathgrpo.rl import logprobs as rl_logprobs
    from mathgrpo.rl import losses, rollout_correction

    params = init_params(TINY, jax.random.key(5))
    prompts, responses, advantages, rollout = random_sequences(4)
    rng = np.random.default_rng(7)
    old = [rng.normal(-4.6, 1.0, len(r)) for r in responses]
    algo = GRPOConfig(loss_agg_mode=mode, importance_level=level)
    batch, _ = packing.pack(prompts, responses, advantages, num_rows=2, row_length=16, rollout_logprobs=rollout,
                            old_logprobs=old)
    assert int(batch.num_micro_batches) > 1 and int(np.asarray(batch.segment_ids).max()) > 1
    loss, grads, _ = grads_of(params, batch, algo, fused=False, temperature=0.9, horizon=12)

    width = max(len(r) for r in responses)
    mask = np.zeros((len(responses), width), np.float32)
    pad = lambda rows: np.stack([np.pad(np.asarray(r, np.float32), (0, width - len(r))) for r in rows])  # noqa: E731
    for s, r in enumerate(responses):
        mask[s, :len(r)] = 1.0

    # One sequence per row (right-padded, padding in segment 0), the response tokens gathered out.
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    tokens = np.zeros((len(prompts), length), np.int32)
    segments = np.zeros_like(tokens)
    for s, (p, r) in enumerate(zip(prompts, responses)):
        tokens[s, :len(p) + len(r)], segments[s, :len(p) + len(r)] = np.concatenate([p, r]), 1
    where = np.minimum(np.array([len(p) for p in prompts])[:, None] + np.arange(width)[None], length - 1)

    def reference(params):
        positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
        every, _ = rl_logprobs.token_logprobs(TINY, params, jnp.asarray(tokens), positions, jnp.asarray(segments),
                                              temperature=0.9)
        logprobs = jnp.take_along_axis(every, jnp.asarray(where), axis=1) * mask
        weights, _ = rollout_correction.rollout_is_weights(jnp.asarray(pad(old)), jnp.asarray(pad(rollout)), mask,
                                                           threshold=algo.rollout_is_threshold)
        value, _ = losses.policy_loss(logprobs, jnp.asarray(pad(old)), jnp.asarray(advantages, jnp.float32)[:, None],
                                      mask, is_weights=weights, agg=mode, importance_level=level, horizon=12)
        return value

    expected, expected_grads = jax.jit(jax.value_and_grad(reference))(params)
    # verl's per-batch forms divide by (count + 1e-8), the step's global forms by the count.
    np.testing.assert_allclose(loss, expected, rtol=1e-6, atol=1e-7)
    assert_trees_close(grads, expected_grads, 1e-6)
