"""mathgrpo.rl (losses, advantages, rollout correction) against a PyTorch transcription of verl's formulas
(core_algos.py, rollout_corr_helper.py).

The `verl_*` functions below are written from verl's source (docs/recipe.md §2.1-2.6) and are the
reference; ours must agree to 1e-6 in fp32 on random inputs, gradients included, with edge cases:
all-equal groups, groups of one, empty responses, log-ratios beyond the ±20 clamp.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mathgrpo.config import ModelConfig
from mathgrpo.model import init_params, logits
from mathgrpo.rl import advantages as rl_advantages
from mathgrpo.rl import logprobs as rl_logprobs
from mathgrpo.rl import losses, rollout_correction

# --- the reference: verl in torch ---------------------------------------------------------------


def verl_masked_mean(values, mask, axis=None):
    if axis is None:
        return (values * mask).sum() / (mask.sum() + 1e-8)
    return (values * mask).sum(axis) / (mask.sum(axis) + 1e-8)


def verl_grpo_advantages(scores, group_size, eps=1e-6, norm_by_std=True):
    """compute_grpo_outcome_advantage: groups by uid (here: contiguous), torch.std (unbiased)."""
    out = torch.zeros_like(scores)
    for start in range(0, len(scores), group_size):
        group = scores[start:start + group_size]
        if len(group) == 1:
            mean, std = torch.tensor(0.0), torch.tensor(1.0)
        else:
            mean, std = torch.mean(group), torch.std(group)
        out[start:start + group_size] = (group - mean) / (std + eps) if norm_by_std else group - mean
    return out


def verl_agg_loss(loss_mat, loss_mask, mode):
    if mode == "token-mean":
        return verl_masked_mean(loss_mat, loss_mask)
    if mode == "seq-mean-token-sum":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()
        return verl_masked_mean(seq_losses, seq_mask)
    if mode == "seq-mean-token-mean":
        seq_mask = torch.sum(loss_mask, dim=-1)
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
        seq_mask = (seq_mask > 0).float()
        return verl_masked_mean(seq_losses, seq_mask)
    if mode == "seq-mean-token-sum-norm":
        # docs/recipe.md §2.4 (verl 0.7): Σ seq losses / mask.shape[-1]; ours (global form) also divides by
        # the number of non-empty sequences — compared below through that documented relation.
        return torch.sum(torch.sum(loss_mat * loss_mask, dim=-1)) / loss_mask.shape[-1]
    raise ValueError(mode)


def verl_vanilla_loss(old_log_prob, log_prob, advantages, response_mask, low, high, c, mode, is_weights=None):
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -advantages * c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(),
                                         response_mask)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if is_weights is not None:
        pg_losses = pg_losses * is_weights
    return verl_agg_loss(pg_losses, response_mask, mode), pg_clipfrac, pg_clipfrac_lower, ppo_kl


def verl_gspo_loss(old_log_prob, log_prob, advantages, response_mask, low, high):
    negative_approx_kl = log_prob - old_log_prob
    seq_lengths = torch.sum(response_mask, dim=-1).clamp(min=1)
    negative_approx_kl_seq = torch.sum(negative_approx_kl * response_mask, dim=-1) / seq_lengths
    log_ratio = log_prob - log_prob.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
    ratio = torch.exp(torch.clamp(log_ratio, max=10.0))
    pg_losses = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - low, 1 + high))
    return verl_agg_loss(pg_losses, response_mask, "seq-mean-token-mean")


def verl_tis(old_log_prob, rollout_log_prob, response_mask, threshold):
    weights = torch.exp(torch.clamp(old_log_prob - rollout_log_prob, min=-20, max=20)) * response_mask
    return weights.clamp(max=threshold), weights


# --- inputs -------------------------------------------------------------------------------------


def random_inputs(seed, B=6, T=9, spread=1.0):
    rng = np.random.default_rng(seed)
    logprobs = rng.normal(-2.0, 1.0, (B, T))
    old = logprobs + rng.normal(0.0, spread, (B, T))
    old[0, :3] += np.array([30.0, -30.0, 25.0])  # log-ratios beyond the ±20 clamp
    advantages = np.repeat(rng.normal(size=(B, 1)), T, axis=1)
    mask = (rng.random((B, T)) > 0.25).astype(np.float64)
    mask[2] = 0.0  # an empty response
    return logprobs, old, advantages, mask


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [1, 2, 4, 8])
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_group_advantages_match_verl(group_size, norm_by_std):
    rng = np.random.default_rng(group_size)
    scores = rng.integers(0, 2, 32).astype(np.float32)
    scores[:group_size] = 1.0  # an all-equal group
    expected = verl_grpo_advantages(torch.from_numpy(scores), group_size, norm_by_std=norm_by_std)
    got = rl_advantages.group_advantages(scores, group_size, norm_by_std=norm_by_std)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)
    if group_size > 1:
        assert np.all(np.asarray(got[:group_size]) == 0.0)  # equal scores give exactly 0


def test_group_advantages_hand_values():
    """Scores [1, 0, 0, 0]: mean 1/4, unbiased std sqrt((9/16 + 3/16)/3) = 1/2, so A = [1.5, -.5, -.5, -.5]."""
    np.testing.assert_allclose(rl_advantages.group_advantages([1.0, 0, 0, 0], 4, eps=0.0), [1.5, -0.5, -0.5, -0.5])
    with pytest.raises(ValueError, match="groups of 4"):
        rl_advantages.group_advantages([1.0, 0, 0], 4)


@pytest.mark.parametrize("mode", losses.AGGREGATIONS)
@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_policy_loss_matches_verl(mode, with_is, seed):
    logprobs, old, advantages, mask = random_inputs(seed)
    is_weights = np.random.default_rng(seed + 10).uniform(0.2, 2.0, logprobs.shape) if with_is else None
    t_logprobs = torch.tensor(logprobs, requires_grad=True)
    loss_ref, clipfrac, clipfrac_lower, ppo_kl = verl_vanilla_loss(
        torch.tensor(old), t_logprobs, torch.tensor(advantages), torch.tensor(mask), 0.2, 0.28, 3.0, mode,
        None if is_weights is None else torch.tensor(is_weights))
    if mode == "seq-mean-token-sum-norm":  # global form: the verl 0.7 value / number of non-empty sequences
        loss_ref = loss_ref / (mask.sum(-1) > 0).sum()
    loss_ref.backward()

    def ours(lp):
        return losses.policy_loss(lp, jnp.asarray(old), jnp.asarray(advantages), jnp.asarray(mask), clip_low=0.2,
                                clip_high=0.28, clip_c=3.0, agg=mode,
                                is_weights=None if is_weights is None else jnp.asarray(is_weights),
                                sequence_count=(mask.sum(-1) > 0).sum() if mode == "seq-mean-token-sum-norm" else None)

    (loss, metrics), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(logprobs))
    np.testing.assert_allclose(loss, loss_ref.item(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad, t_logprobs.grad.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(metrics["pg_clipfrac"], clipfrac.item(), atol=1e-7)
    np.testing.assert_allclose(metrics["pg_clipfrac_lower"], clipfrac_lower.item(), atol=1e-7)
    np.testing.assert_allclose(metrics["ppo_kl"], ppo_kl.item(), rtol=1e-6, atol=1e-7)
    assert 0 < float(metrics["pg_clipfrac"]) and 0 < float(metrics["pg_clipfrac_lower"])  # both paths hit


def test_gspo_matches_verl():
    logprobs, old, advantages, mask = random_inputs(3, spread=0.3)
    t_logprobs = torch.tensor(logprobs, requires_grad=True)
    verl_gspo_loss(torch.tensor(old), t_logprobs, torch.tensor(advantages), torch.tensor(mask), 0.2, 0.2).backward()
    reference = verl_gspo_loss(torch.tensor(old), torch.tensor(logprobs), torch.tensor(advantages),
                               torch.tensor(mask), 0.2, 0.2).item()

    def ours(lp):
        return losses.policy_loss(lp, jnp.asarray(old), jnp.asarray(advantages), jnp.asarray(mask),
                                agg="seq-mean-token-mean", importance_level="sequence")[0]

    loss, grad = jax.value_and_grad(ours)(jnp.asarray(logprobs))
    np.testing.assert_allclose(loss, reference, rtol=1e-6)
    np.testing.assert_allclose(grad, t_logprobs.grad.numpy(), rtol=1e-6, atol=1e-7)


def test_ratio_one_makes_clipping_inert():
    """On-policy (old = detached current): loss = -token-mean(A), gradient = -A/N on each valid token."""
    logprobs, _, advantages, mask = random_inputs(4)

    def ours(lp):
        return losses.policy_loss(lp, jax.lax.stop_gradient(lp), jnp.asarray(advantages), jnp.asarray(mask),
                                clip_low=0.01, clip_high=0.01)

    (loss, metrics), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(logprobs))
    n = mask.sum()
    np.testing.assert_allclose(loss, -(advantages * mask).sum() / (n + 1e-8), rtol=1e-6)
    np.testing.assert_allclose(grad, -advantages * mask / (n + 1e-8), rtol=1e-6, atol=1e-9)
    assert float(metrics["pg_clipfrac"]) == 0.0 and float(metrics["ppo_kl"]) == 0.0


def test_truncated_importance_weights_match_verl():
    logprobs, rollout, _, mask = random_inputs(5)
    expected, untruncated = verl_tis(torch.tensor(logprobs), torch.tensor(rollout), torch.tensor(mask), 2.0)
    got, got_untruncated = rollout_correction.rollout_is_weights(jnp.asarray(logprobs), jnp.asarray(rollout),
                                                                 jnp.asarray(mask))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6)
    np.testing.assert_allclose(got_untruncated, untruncated.numpy(), rtol=1e-6)
    assert float(jnp.max(got)) == 2.0


def test_rollout_correction_metrics_match_verl():
    logprobs, rollout, _, mask = random_inputs(6, spread=0.3)
    mask[2] = 1.0  # verl's per-sequence statistics assume non-empty responses
    old_t, rollout_t, mask_t = torch.tensor(logprobs), torch.tensor(rollout), torch.tensor(mask)
    _, weights = verl_tis(old_t, rollout_t, mask_t, 2.0)
    mean_train = verl_masked_mean(old_t, mask_t, axis=-1)
    mean_rollout = verl_masked_mean(rollout_t, mask_t, axis=-1)
    log_ratio = old_t - rollout_t
    expected = {
        "rollout_is_mean": verl_masked_mean(weights, mask_t),
        "rollout_is_max": weights.masked_fill(~mask_t.bool(), float("-inf")).max(),
        "rollout_is_min": weights.masked_fill(~mask_t.bool(), float("inf")).min(),
        "training_ppl": torch.exp(-mean_train).mean(),
        "rollout_ppl": torch.exp(-mean_rollout).mean(),
        "kl": verl_masked_mean(rollout_t - old_t, mask_t),
        "k3_kl": verl_masked_mean(torch.exp(log_ratio.clamp(-20, 20)) - log_ratio.clamp(-20, 20) - 1, mask_t),
        "log_ppl_diff": (mean_rollout - mean_train).mean(),
        "chi2_token": verl_masked_mean(torch.exp(log_ratio.clamp(-20, 20)) ** 2, mask_t) - 1.0,
    }
    got = rollout_correction.rollout_correction_metrics(jnp.asarray(logprobs), jnp.asarray(rollout), jnp.asarray(mask))
    for name, value in expected.items():
        np.testing.assert_allclose(got[f"rollout_corr/{name}"], value.item(), rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("kind", losses.KL_TYPES)
def test_kl_penalty_matches_verl(kind):
    rng = np.random.default_rng(7)
    lp, ref = rng.normal(-2, 1, 50), rng.normal(-2, 1, 50)
    if kind == "kl":
        expected = lp - ref
    elif kind == "mse":
        expected = 0.5 * (lp - ref) ** 2
    else:  # k3: kl = ref - logp; ratio - kl - 1, clamped to ±10
        kl = ref - lp
        expected = np.clip(np.exp(kl) - kl - 1, -10, 10)
    # fp32 cancellation in exp(kl) - kl - 1 near kl = 0: absolute 1e-6
    np.testing.assert_allclose(losses.kl_penalty(jnp.asarray(lp), jnp.asarray(ref), kind), expected,
                               rtol=1e-6, atol=1e-6)


TINY = ModelConfig(vocab_size=301, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, compute_dtype="float32",
                   tie_word_embeddings=True)


@pytest.mark.parametrize("temperature, chunk", [(1.0, 4), (0.7, 5), (1.3, 64)])
def test_chunked_logprobs_and_entropy_equal_full_softmax(temperature, chunk):
    params = init_params(TINY, jax.random.key(1))
    tokens = jnp.asarray(np.random.default_rng(8).integers(0, TINY.vocab_size, (2, 13)))
    positions = jnp.broadcast_to(jnp.arange(13), (2, 13))
    logprobs, entropy = rl_logprobs.token_logprobs(TINY, params, tokens, positions, jnp.ones_like(tokens),
                                            temperature=temperature, chunk_size=chunk)
    full = np.asarray(logits(TINY, params, tokens), np.float64) / temperature  # [B, T, V]
    log_softmax = full - np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - full.max(-1, keepdims=True)
    expected_lp = np.take_along_axis(log_softmax[:, :-1], np.asarray(tokens)[:, 1:, None], -1)[..., 0]
    expected_entropy = -(np.exp(log_softmax) * log_softmax).sum(-1)[:, :-1]
    np.testing.assert_allclose(logprobs[:, 1:], expected_lp, atol=1e-5)
    np.testing.assert_allclose(entropy[:, 1:], expected_entropy, atol=1e-5)
    assert np.all(np.asarray(logprobs[:, 0]) == 0.0)


def test_logprob_pass_memory_is_far_below_full_logits():
    """One 8,192-token sequence, V = 151,936: the fp32 logits alone would be 8192·151936·4 B = 4.98 GB.
    The compiled forward+backward of the chunked pass (chunk 512) must stay under 1 GB of temporaries."""
    config = ModelConfig(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
                         compute_dtype="bfloat16", attention="blockwise", attention_block_size=512)
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    T = 8192
    tokens = jax.ShapeDtypeStruct((1, T), jnp.int32)

    def loss(p, tokens):
        lp, ent = rl_logprobs.token_logprobs(config, p, tokens, jnp.broadcast_to(jnp.arange(T), (1, T)),
                                      jnp.ones_like(tokens), chunk_size=512)
        return jnp.sum(lp) + jnp.sum(jax.lax.stop_gradient(ent))

    compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    naive_logits = T * config.vocab_size * 4
    assert naive_logits > 4.9e9
    assert temp < 1e9, f"{temp / 1e9:.2f} GB of temporaries"
