"""Numerical parity with `transformers.Qwen3ForCausalLM` on tiny random models (the reference).

Configs cover GQA groups 1, 2 and 4, tied and untied heads, head_dim ≠ hidden/heads, 1–3 layers,
non-default rope_theta and rms_norm_eps; norm weights are random (not all ones, see mathgrpo.tiny).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mathgrpo.model import forward, positions_from_segments
from mathgrpo.tools.parity import TOLERANCES, compare_logits, random_batch, run_parity
from mathgrpo.weights import hf

CONFIGS = {
    "G1-untied-1layer": dict(num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1),
    "G2-tied-headdim24": dict(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                              head_dim=24, tie_word_embeddings=True),
    "G4-untied-3layers-theta1e6-eps1e-5": dict(num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3,
                                               head_dim=12, rope_theta=1e6, rms_norm_eps=1e-5),
    "G4-tied-theta500-eps1e-3": dict(num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2,
                                     tie_word_embeddings=True, rope_theta=500.0, rms_norm_eps=1e-3),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp32_logprobs_match(tiny_hf_dir, name):
    result = run_parity(tiny_hf_dir(**CONFIGS[name]), "float32", batch=3, seq=24)
    assert result["max_abs_logprob_diff"] <= 1e-4, result
    assert result["greedy_next_token_agreement"] == 1.0, result
    assert result["ok"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bf16_mean_kl(tiny_hf_dir, name):
    result = run_parity(tiny_hf_dir(**CONFIGS[name]), "bfloat16", batch=3, seq=24)
    assert result["mean_kl"] <= 1e-3, result
    assert result["ok"]


def test_blockwise_attention_parity(tiny_hf_dir):
    result = run_parity(tiny_hf_dir(**CONFIGS["G2-tied-headdim24"]), "float32", batch=2, seq=40,
                        attention="blockwise")
    assert result["max_abs_logprob_diff"] <= 1e-4, result


def test_tolerance_logic_flags_a_difference():
    reference = np.random.default_rng(0).normal(size=(2, 5, 11))
    valid = np.ones((2, 5), bool)
    close = compare_logits(reference, reference + 1e-6, valid)
    far = compare_logits(reference, reference + np.random.default_rng(1).normal(size=reference.shape) * 0.1, valid)
    limit = TOLERANCES["float32"]["max_abs_logprob_diff"]
    assert close["max_abs_logprob_diff"] <= limit < far["max_abs_logprob_diff"]
    assert far["mean_kl"] > TOLERANCES["float32"]["mean_kl"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradient_matches_pytorch(tiny_hf_dir, name):
    """∇ of a masked token-mean next-token cross-entropy, every parameter, fp32, ≤ 1e-4 relative (Frobenius)."""
    import transformers

    path = tiny_hf_dir(**CONFIGS[name])
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                    attn_implementation="eager")
    config, params = hf.load(path, dtype="float32", compute_dtype="float32")
    tokens, mask = random_batch(config.vocab_size, 3, 20, seed=7)
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)

    # PyTorch: the reference loss.
    out = torch_model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask),
                      position_ids=torch.from_numpy(positions)).logits
    logp = torch.log_softmax(out[:, :-1].float(), -1)
    target = torch.from_numpy(tokens[:, 1:])
    loss_mask = torch.from_numpy(mask[:, 1:] * mask[:, :-1]).float()
    nll = -logp.gather(-1, target[..., None])[..., 0]
    ((nll * loss_mask).sum() / loss_mask.sum()).backward()
    torch_grads = {n: p.grad.numpy() for n, p in torch_model.named_parameters()}

    def loss(p):
        segments = jnp.asarray(mask, jnp.int32)
        logits, _ = forward(config, p, jnp.asarray(tokens), positions_from_segments(segments), segments)
        logp = jax.nn.log_softmax(logits[:, :-1], -1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:])[..., None], -1)[..., 0]
        m = jnp.asarray(loss_mask.numpy())
        return (nll * m).sum() / m.sum()

    grads = jax.grad(loss)(params)
    compared = 0
    for hf_name, ours in hf.hf_tensors(config, grads):
        reference = torch_grads[hf_name]
        error = np.linalg.norm(ours - reference) / max(np.linalg.norm(reference), 1e-30)
        assert error <= 1e-4, (hf_name, error)
        compared += 1
    assert compared == len(torch_grads)
