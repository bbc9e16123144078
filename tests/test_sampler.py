"""The rollout interface, sampling functions and the JAX sampler.

References: greedy tokens come from `transformers` `generate`; log-probs from a full (cache-free)
forward of prompt + response, log-softmaxed in numpy; the sampling distribution and the truncated
supports from numpy re-derivations of softmax(logits / T), top-k and top-p written here.
"""

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mathgrpo.config import MeshConfig, ModelConfig
from mathgrpo.model import forward, init_params, unstack_layers
from mathgrpo.parallel import mesh as parallel_mesh
from mathgrpo.parallel import shardings
from mathgrpo.rollout import JaxSampler, Rollout, RolloutBatch, SamplingParams, jax_sampler
from mathgrpo.rollout.sampling import top_k_mask, top_p_mask
from mathgrpo.weights import hf
from tests.test_plan import cuda_plugin_installed

TINY = ModelConfig(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=12, rope_theta=10_000.0,
                   param_dtype="float32", compute_dtype="float32", decode_block_size=8)
ROOT = Path(__file__).resolve().parent.parent
MAX_LENGTH = 48  # caches of 16 + max_tokens slots and more: the decode steps read them in blocks of 8


@pytest.fixture(scope="module")
def params():
    """Random params whose LM head is scaled up: HF's init gives near-uniform next-token
    distributions (logit std ~0.15), on which temperature and truncation would barely show."""
    p = jax.jit(init_params, static_argnums=0)(TINY, jax.random.key(0))
    p["lm_head"]["kernel"] = p["lm_head"]["kernel"] * 15.0
    return p


@pytest.fixture(scope="module")
def sampler(params):
    return JaxSampler(TINY, params, max_length=MAX_LENGTH, min_prompt_bucket=8)


POOL = 8  # the continuous sampler's pool: smaller than most calls' rows, so rows are refilled


@pytest.fixture(scope="module")
def continuous(params):
    return JaxSampler(TINY, params, max_length=MAX_LENGTH, min_prompt_bucket=8, max_slots=POOL, burst_steps=3)


@pytest.fixture(params=["static", "continuous"])
def any_sampler(request, sampler, continuous):
    """Each sampler test runs through both paths: one static batch, and continuous batching over a pool."""
    return sampler if request.param == "static" else continuous


def random_prompts(lengths, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, TINY.vocab_size, n).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------------------
# numpy references


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_support(logits, temperature, top_k, top_p):
    """Tokens allowed by top-k then top-p (p on the top-k-renormalized distribution), and the
    sampling distribution over the vocabulary (0 outside the support)."""
    z = np.asarray(logits, np.float64) / temperature
    keep = np.ones(z.shape, bool)
    if top_k >= 1:
        keep &= z >= np.sort(z)[::-1][min(top_k, z.size) - 1]
    probs = np.where(keep, np.exp(z - z.max()), 0.0)
    probs /= probs.sum()
    if top_p < 1:
        order = np.argsort(-probs, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]
        nucleus = np.zeros_like(keep)
        nucleus[order[mass_before < top_p]] = True
        keep &= nucleus
    probs = np.where(keep, probs, 0.0)
    return keep, probs / probs.sum()


def full_forward_logits(config, params, sequences):
    """[R, T, V] logits of unpadded sequences, one cache-free forward (right padding, segment 0):
    the trainer's path, and nothing the sampler's cache or left padding touches."""
    T = max(map(len, sequences))
    tokens = np.zeros((len(sequences), T), np.int32)
    segments = np.zeros((len(sequences), T), np.int32)
    for r, sequence in enumerate(sequences):
        tokens[r, :len(sequence)], segments[r, :len(sequence)] = sequence, 1
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape)
    out, _ = forward(config, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments))
    return np.asarray(out)


def p_for_nucleus_size(probs, size):
    """A top_p whose nucleus holds exactly `size` tokens, halfway between two cumulative masses
    (far from any fp32-vs-fp64 boundary)."""
    cumulative = np.cumsum(np.sort(probs)[::-1])
    return float((cumulative[size - 2] + cumulative[size - 1]) / 2)


# ---------------------------------------------------------------------------------------------------
# sampling.py on bare logits


def test_truncation_masks_equal_numpy():
    """The masks take vocab-major logits ([V, B], a column per row, sampling.py)."""
    logits_ = np.random.default_rng(0).normal(0, 2, (4, 50)).astype(np.float32)
    columns = jnp.asarray(logits_.T)  # [V, B]
    for k in (1, 5, 50, 80):
        expected = np.stack([np_support(row, 1.0, k, 1.0)[0] for row in logits_])
        np.testing.assert_array_equal(top_k_mask(columns, k).T, expected)
    for p in (1e-6, 0.3, 0.9, 1.0):
        expected = np.stack([np_support(row, 1.0, -1, p)[0] for row in logits_])
        np.testing.assert_array_equal(top_p_mask(columns, p).T, expected)
    assert np.asarray(top_p_mask(columns, 1e-6)).sum(0).tolist() == [1, 1, 1, 1]


def sort_top_p_mask(logits, p):
    """The sort-based nucleus that top_p_mask replaced (sort the vocabulary, cumsum): the reference."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # [..., V] descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # [..., V] mass of the tokens ranked above
    keep_count = jnp.sum(before < p, axis=-1, keepdims=True)  # [..., 1] >= 1
    threshold = jnp.take_along_axis(sorted_logits, keep_count - 1, axis=-1)  # [..., 1]
    return logits >= threshold


def mixed_logit_rows(vocab, seed):
    """[16, vocab] fp32 rows of different shapes: normal at three scales, very flat, all tied,
    integer-rounded (many ties), three values, one dominant token; then the same 8 rows with all but
    their top vocab // 5 (and ties) at -inf, as top-k leaves them."""
    rng = np.random.default_rng(seed)
    rows = np.stack([rng.normal(0, 1, vocab), rng.normal(0, 3, vocab), rng.normal(0, 30, vocab),
                     rng.normal(0, 1e-3, vocab), np.zeros(vocab), np.round(rng.normal(0, 2, vocab)),
                     rng.integers(0, 3, vocab).astype(float),
                     np.where(np.arange(vocab) == 3, 50.0, rng.normal(0, 1, vocab))]).astype(np.float32)
    top_k = np.asarray(top_k_mask(jnp.asarray(rows.T), max(1, vocab // 5))).T
    return np.concatenate([rows, np.where(top_k, rows, -np.inf).astype(np.float32)])


@pytest.mark.parametrize("shape", [(16, 1), (16, 7), (16, 50), (16, 1000), (2, 8, 64), (16, 151_936)])
def test_top_p_mask_equals_sort_reference(shape):
    """The sort-free nucleus is the sort-based one, token for token, ties and -inf included, except
    where fp32 rounding decides: the two sum the probabilities in different orders (a masked sum vs a
    cumsum), so they may differ only on a token whose exact (fp64) mass of strictly more likely
    tokens is within rounding of p (seen: one token at p = 0.95 on V = 151,936, off p by 4e-8, and a
    few at p = 1 - 1e-7). Where the old mask reached the -inf logits (its threshold fell to -inf when
    the fp32 mass never reached p) it marked them kept; the new one never does."""
    logits_ = mixed_logit_rows(shape[-1], seed=shape[-1]).reshape(shape)
    flat = logits_.reshape(-1, shape[-1]).astype(np.float64)
    exact = np.exp(flat - flat.max(-1, keepdims=True))
    exact /= exact.sum(-1, keepdims=True)
    for p in (0.1, 0.5, 0.9, 0.95, 0.999, 1 - 1e-7):
        vocab_major = jnp.asarray(np.moveaxis(logits_, -1, 0))  # [V, ...] as top_p_mask takes them
        mask = np.moveaxis(np.asarray(jax.jit(top_p_mask, static_argnums=1)(vocab_major, p)), 0, -1)
        reference = np.asarray(sort_top_p_mask(jnp.asarray(logits_), p)) & np.isfinite(logits_)
        assert mask.shape == logits_.shape and mask.dtype == bool
        mask, reference = mask.reshape(flat.shape), reference.reshape(flat.shape)
        assert not (mask & np.isinf(flat)).any()
        assert (mask.sum(-1) >= 1).all()
        lowest_kept = np.where(mask, flat, np.inf).min(-1, keepdims=True)
        np.testing.assert_array_equal(mask, flat >= lowest_kept)  # a threshold: ties go together
        for row, token in zip(*np.nonzero(mask != reference)):
            mass_above = exact[row][flat[row] > flat[row, token]].sum()
            assert abs(mass_above - np.float32(p)) < 1e-6, (p, row, token, mass_above)


# ---------------------------------------------------------------------------------------------------
# the sampler


@pytest.mark.parametrize("decode_block", [8, 0], ids=["blocks", "default"])
@pytest.mark.parametrize("max_slots", [None, 2], ids=["static", "continuous"])
def test_greedy_equals_transformers_generate(tiny_hf_dir, max_slots, decode_block):
    """Continuous: a pool of 2 rows serves 6 requests (3 prompts of 3, 7 and 12 tokens, n = 2), so
    every prompt after the first waits for a refill. The decode steps' attention in blocks of 8 (24
    slots: the loop runs), and as the platform's default (on CPU one pass over the sampler's per-layer
    cache, `layers.decode_block_size`)."""
    import torch
    import transformers

    path = tiny_hf_dir(dtype="float32")
    config, params = hf.load(path, dtype="float32", compute_dtype="float32")
    config = config.replace(decode_block_size=decode_block)
    model = transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # never stop early: compare all max_tokens tokens
    model.generation_config.pad_token_id = 0
    prompts, max_tokens = random_prompts([3, 7, 12], seed=1), 12
    expected = []
    for prompt in prompts:  # one prompt at a time, unpadded: HF's padding plays no part
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), do_sample=False, use_cache=True,
                                 max_new_tokens=max_tokens, min_new_tokens=max_tokens)
        expected.append(out[0, len(prompt):].tolist())

    sampler = JaxSampler(config, params, max_length=32, min_prompt_bucket=8, max_slots=max_slots)
    assert isinstance(sampler, Rollout)
    batch = sampler.generate(prompts, SamplingParams(n=2, temperature=0.0, max_tokens=max_tokens))
    assert batch.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert [batch.response(r) for r in range(6)] == [e for e in expected for _ in range(2)]
    assert batch.finish_reasons == ("length",) * 6
    # Greedy log-probs are at T = 1: log_softmax of the full forward's logits.
    full = full_forward_logits(config, params, [prompts[r // 2] + batch.response(r) for r in range(6)])
    for r in range(6):
        steps = np.arange(len(prompts[r // 2]) - 1, len(prompts[r // 2]) + max_tokens - 1)
        gathered = np_log_softmax(full[r, steps])[np.arange(max_tokens), batch.response(r)]
        np.testing.assert_allclose(batch.response_logprobs(r), gathered, atol=1e-5)


def test_logprobs_equal_full_forward_at_temperature_without_renormalization(any_sampler, params):
    T, top_k, top_p = 0.7, 12, 0.8
    prompts = random_prompts([2, 5, 9], seed=2)
    batch = any_sampler.generate(prompts, SamplingParams(n=2, temperature=T, top_k=top_k, top_p=top_p,
                                                     max_tokens=8, seed=3))
    full = full_forward_logits(TINY, params, [prompts[batch.prompt_index[r]] + batch.response(r)
                                              for r in range(len(batch))])  # [R, T, V]
    log_masses = []
    for r in range(len(batch)):
        prompt, response = prompts[batch.prompt_index[r]], batch.response(r)
        steps = np.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
        expected = np_log_softmax(full[r, steps] / T)[np.arange(len(steps)), response]
        np.testing.assert_allclose(batch.response_logprobs(r), expected, atol=1e-5)
        for step, token in zip(steps, response):
            keep, _ = np_support(full[r, step], T, top_k, top_p)
            assert keep[token], "a token outside the top-k/top-p support was sampled"
            log_masses.append(np.log(np.exp(np_log_softmax(full[r, step] / T))[keep].sum()))
    # Renormalizing over the support would have added -log(mass) to each log-prob; it is not small
    # here, so the allclose above does prove the log-probs are the untruncated ones.
    assert max(-m for m in log_masses) > 0.05


@pytest.mark.parametrize("max_slots", [None, 256], ids=["static", "continuous"])
@pytest.mark.parametrize("temperature,top_k,nucleus", [
    (1.0, -1, None), (0.6, -1, None), (1.0, 7, None), (1.0, -1, 9), (0.8, 12, 5),
])
def test_first_token_distribution_and_support(params, temperature, top_k, nucleus, max_slots):
    """4,000 first tokens (40 copies of a prompt × 100 samples, each its own key) drawn in one call
    against softmax(logits / T), truncated, in numpy; the continuous pool admits 2 prompts at a time."""
    sampler = JaxSampler(TINY, params, max_length=MAX_LENGTH, min_prompt_bucket=8, max_slots=max_slots)
    prompt = random_prompts([6], seed=4)[0]
    last_logits = full_forward_logits(TINY, params, [prompt])[0, -1]  # [V]
    top_p = 1.0
    if nucleus is not None:
        _, after_top_k = np_support(last_logits, temperature, top_k, 1.0)
        top_p = p_for_nucleus_size(after_top_k, nucleus)
    keep, probs = np_support(last_logits, temperature, top_k, top_p)
    if nucleus is not None:
        assert keep.sum() == nucleus
    if top_k >= 1:
        assert keep.sum() <= top_k

    draws = 4000
    batch = sampler.generate([prompt] * 40, SamplingParams(n=draws // 40, temperature=temperature, top_k=top_k,
                                                           top_p=top_p, max_tokens=1, seed=5))
    tokens = batch.token_ids[:, 0]
    assert keep[tokens].all(), f"tokens outside the support: {sorted(set(tokens[~keep[tokens]]))}"
    observed = np.bincount(tokens, minlength=TINY.vocab_size)[keep]
    expected = draws * probs[keep]
    order = np.argsort(expected)  # merge the smallest bins until each merged bin expects >= 5
    merged_observed, merged_expected, o, e = [], [], 0.0, 0.0
    for i in order:
        o, e = o + observed[i], e + expected[i]
        if e >= 5:
            merged_observed.append(o)
            merged_expected.append(e)
            o = e = 0.0
    if e > 0:
        merged_observed[-1] += o
        merged_expected[-1] += e
    assert len(merged_expected) >= 3
    _, p_value = scipy.stats.chisquare(merged_observed, merged_expected)
    assert p_value > 1e-3, (temperature, top_k, top_p, p_value)


def test_stop_tokens_end_rows_and_max_tokens_holds(any_sampler):
    prompts, max_tokens = random_prompts([4, 6, 8, 3], seed=6), 10
    reference = any_sampler.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    assert reference.token_ids.shape == (4, max_tokens)
    assert reference.lengths.tolist() == [max_tokens] * 4 and reference.finish_reasons == ("length",) * 4

    # Stop on row 1's first token (ends it inside prefill) and on a later, first-seen token of row 0.
    row0 = reference.response(0)
    later = next(t for j, t in enumerate(row0) if j >= 2 and t not in row0[:j])
    stops = (reference.response(1)[0], later)
    batch = any_sampler.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                     stop_token_ids=list(stops)))
    for r in range(4):
        full = reference.response(r)
        first = next((j for j, t in enumerate(full) if t in stops), None)
        length = max_tokens if first is None else first + 1
        assert batch.response(r) == full[:length]
        assert batch.finish_reasons[r] == ("length" if first is None else "stop")
        np.testing.assert_allclose(batch.response_logprobs(r), reference.response_logprobs(r)[:length],
                                   atol=1e-6)
        assert not batch.token_ids[r, length:].any() and not batch.logprobs[r, length:].any()
    assert batch.lengths[1] == 1 and batch.finish_reasons[1] == "stop"
    assert batch.finish_reasons[0] == "stop" and batch.lengths[0] >= 3
    np.testing.assert_array_equal(batch.mask, np.arange(batch.token_ids.shape[1]) < batch.lengths[:, None])


def test_same_seed_same_samples(any_sampler):
    prompts = random_prompts([3, 5], seed=7)
    settings = SamplingParams(n=4, temperature=1.0, max_tokens=6, seed=11)
    first, again = any_sampler.generate(prompts, settings), any_sampler.generate(prompts, settings)
    other = any_sampler.generate(prompts, settings.replace(seed=12))
    np.testing.assert_array_equal(first.token_ids, again.token_ids)
    np.testing.assert_array_equal(first.logprobs, again.logprobs)
    assert not np.array_equal(first.token_ids, other.token_ids)
    assert len({tuple(first.response(r)) for r in range(4)}) > 1  # the n samples of a prompt differ


def test_a_share_of_the_prompts_samples_what_the_whole_batch_does(any_sampler):
    """Rows are keyed by (seed, prompt index, sample index): a process generating prompts 2..4 of a
    step (first_prompt=2), in a smaller batch bucket, draws exactly the whole batch's rows for them."""
    prompts = random_prompts([3, 5, 4, 6, 2], seed=9)
    settings = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_tokens=6, seed=5)
    whole = any_sampler.generate(prompts, settings)
    share = any_sampler.generate(prompts[2:4], settings, first_prompt=2)
    for r in range(len(share)):
        assert share.response(r) == whole.response(6 + r)
        # other batch shapes round the matmuls differently: log-probs to fp32 noise, tokens exactly
        np.testing.assert_allclose(share.response_logprobs(r), whole.response_logprobs(6 + r), atol=1e-5)
    shifted = any_sampler.generate(prompts[2:4], settings)  # the same prompts at other indices: other draws
    assert not all(shifted.response(r) == share.response(r) for r in range(len(share)))


def test_no_recompile_within_a_bucket(sampler, params):
    settings = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_tokens=5, seed=1)
    sampler.generate(random_prompts([3, 5], seed=8), settings)
    counts = dict(sampler.trace_counts)
    sampler.generate(random_prompts([6, 8], seed=9), settings.replace(seed=2))  # same bucket of 8
    sampler.update_weights(jax.tree.map(lambda x: x * 1.01, params))  # new weights: no recompile
    sampler.generate(random_prompts([1, 7], seed=10), settings)
    assert dict(sampler.trace_counts) == counts
    sampler.update_weights(params)
    sampler.generate(random_prompts([9], seed=11), settings.replace(n=4))  # bucket 16: compiles
    assert sampler.trace_counts["prefill"] == counts["prefill"] + 1
    assert sampler.trace_counts["decode"] == counts["decode"] + 1


def test_per_request_max_tokens(any_sampler):
    """Each prompt's own limit: its rows end there ("length") with the tokens and log-probs of a run
    without limits, unless a stop token comes first."""
    prompts = random_prompts([4, 6, 8, 3, 5], seed=21)
    settings = SamplingParams(n=2, temperature=1.0, top_k=20, max_tokens=12, seed=4, stop_token_ids=[3, 4])
    full = any_sampler.generate(prompts, settings)
    limits = [1, 12, 5, 2, 9]
    limited = any_sampler.generate(prompts, settings, max_tokens=limits)
    for r in range(len(full)):
        limit = limits[r // 2]
        assert limited.response(r) == full.response(r)[:limit]
        np.testing.assert_allclose(limited.response_logprobs(r), full.response_logprobs(r)[:limit], atol=1e-6)
        stopped = full.finish_reasons[r] == "stop" and full.lengths[r] <= limit
        assert limited.finish_reasons[r] == ("stop" if stopped else "length")
    assert limited.lengths.max() <= 12 and limited.lengths[:2].tolist() == [1, 1]
    for bad in ([1, 2], [0, 1, 1, 1, 1], [13, 1, 1, 1, 1], [1.5] * 5):
        with pytest.raises(ValueError, match="max_tokens"):
            any_sampler.generate(prompts, settings, max_tokens=bad)


DETERMINISM_SCRIPT = """
import sys, jax, numpy as np
sys.path[:0] = [{tests!r}, {root!r}]
from test_sampler import TINY, MAX_LENGTH, random_prompts
from mathgrpo.model import init_params
from mathgrpo.rollout import JaxSampler, SamplingParams
params = init_params(TINY, jax.random.key(0))
params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 15.0
prompts = random_prompts([3, 9, 5, 12, 2, 7, 4, 10, 6, 8, 11, 1], seed=31)
settings = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_tokens=16, seed=8, stop_token_ids=[5, 6, 7])
limits = [16, 3, 16, 9, 16, 1, 16, 12, 16, 5, 16, 16]
for block in (8, 0):  # the attention loop's blocks of 8; the CPU default (one pass, per-layer cache)
    runs = {{}}
    for slots in (4, 16, 64):
        for burst in (2, 9):
            sampler = JaxSampler(TINY.replace(decode_block_size=block), params, max_length=MAX_LENGTH,
                                 min_prompt_bucket=8, max_slots=slots, burst_steps=burst)
            runs[slots, burst] = sampler.generate(prompts, settings, max_tokens=limits)
    first = runs[4, 2]
    assert len(set(first.lengths.tolist())) > 4, first.lengths  # rows end at many different steps
    for key, batch in runs.items():
        assert np.array_equal(batch.token_ids, first.token_ids), (block, key)
        assert np.array_equal(batch.logprobs, first.logprobs), (block, key)
        assert np.array_equal(batch.lengths, first.lengths), (block, key)
    print("identical", len(runs), "with decode_block_size", block)
"""


def test_continuous_samples_do_not_depend_on_pool_size_or_burst_length(continuous, params):
    """Same seed → identical tokens and log-probs (bit for bit, fp32) for pools of 4, 16 and 64 rows
    and bursts of 2 and 9 steps: rows end at different steps, so which slot a request takes and which
    rows share its decode steps differ from run to run. With the attention loop's blocks of 8, and with
    the CPU default (one pass over the per-layer cache) in the subprocess.

    In a subprocess whose XLA:CPU matmuls go through Eigen: XLA's default hands dots with 63 or more
    rows to YNNPACK, whose kernels round differently from Eigen's, so a 64-row pool would add fp32
    noise to every logit for reasons that are not the sampler's (docs/sampler.md). In this process
    (default flags) pools of 4 and 16 are compared the same way."""
    import os
    import pathlib
    import subprocess
    import sys

    tests = str(pathlib.Path(__file__).parent)
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT.format(tests=tests, root=str(ROOT))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "identical 6 with decode_block_size 8" in out.stdout
    assert "identical 6 with decode_block_size 0" in out.stdout

    prompts = random_prompts([3, 9, 5, 12, 2, 7], seed=32)
    settings = SamplingParams(n=2, temperature=0.8, max_tokens=14, seed=2, stop_token_ids=[5, 6])
    runs = [JaxSampler(TINY, params, max_length=MAX_LENGTH, min_prompt_bucket=8, max_slots=slots,
                       burst_steps=burst).generate(prompts, settings) for slots, burst in ((4, 1), (16, 5))]
    runs.append(continuous.generate(prompts, settings))  # 8 rows, bursts of 3
    for batch in runs[1:]:
        np.testing.assert_array_equal(batch.token_ids, runs[0].token_ids)
        np.testing.assert_array_equal(batch.logprobs, runs[0].logprobs)


def test_continuous_no_recompile_across_request_counts_and_prompt_lengths(continuous, params):
    settings = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_tokens=7, seed=1)
    continuous.generate(random_prompts([3, 5], seed=8), settings)
    counts = dict(continuous.trace_counts)
    assert counts.get("admit") and counts.get("burst") and counts.get("empty_pool")
    continuous.generate(random_prompts([6, 8, 1, 2, 7, 4, 3], seed=9), settings.replace(seed=2))  # refills
    continuous.generate(random_prompts([8], seed=10), settings, max_tokens=[3])
    continuous.update_weights(jax.tree.map(lambda x: x * 1.01, params))  # new weights: no recompile
    continuous.generate(random_prompts([1, 7, 2], seed=11), settings)
    assert dict(continuous.trace_counts) == counts
    continuous.update_weights(params)
    continuous.generate(random_prompts([9], seed=12), settings)  # prompt bucket 16: compiles
    assert continuous.trace_counts["admit"] == counts["admit"] + 1
    assert continuous.trace_counts["burst"] > counts["burst"]


def test_continuous_pool_must_hold_a_prompts_samples(continuous):
    with pytest.raises(ValueError, match=f"max_slots={POOL} < n={POOL + 1}"):
        continuous.generate(random_prompts([3], seed=1), SamplingParams(n=POOL + 1, max_tokens=4))
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="max_slots"):
            JaxSampler(TINY, continuous.params, max_length=MAX_LENGTH, max_slots=bad)
    with pytest.raises(ValueError, match="burst_steps"):
        JaxSampler(TINY, continuous.params, max_length=MAX_LENGTH, max_slots=4, burst_steps=0)
    with pytest.raises(ValueError, match=r"sampler weights 'tp'; expected one of \('replicated', 'sharded'\)"):
        JaxSampler(TINY, continuous.params, max_length=MAX_LENGTH, max_slots=4, weights="tp")


def test_continuous_on_a_mesh_matches_single_device(continuous, params):
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"))
    sharded = JaxSampler(TINY, params, max_length=MAX_LENGTH, mesh=mesh, min_prompt_bucket=8, max_slots=12)
    assert sharded.max_slots == 16  # rounded up to the 8 batch shards
    prompts = random_prompts([3, 6, 8, 5, 2, 7, 4, 9, 1, 3], seed=14)
    settings = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_tokens=6, seed=3, stop_token_ids=[5])
    got, expected = sharded.generate(prompts, settings), continuous.generate(prompts, settings)
    np.testing.assert_array_equal(got.token_ids, expected.token_ids)
    np.testing.assert_allclose(got.logprobs, expected.logprobs, atol=1e-5)


def test_the_sampler_holds_per_layer_weights(continuous, params):
    """Whatever scan_layers says (it serves the training step's compile), the sampler holds its own
    per-layer copy of the params (`unstack_layers`): the stacked layers' slices. On a mesh its weights
    are whole on each batch shard by default ("replicated"), each layer split over tensor as the stacked
    param, less the layer axis; training's fsdp shards ("sharded") keep the stacked layout
    (`holds_per_layer_weights`). Each samples what one device does."""
    assert len(continuous.params["layers"]) == TINY.num_hidden_layers and TINY.scan_layers
    for index, layer in enumerate(continuous.params["layers"]):
        jax.tree.map(lambda got, stacked: np.testing.assert_array_equal(got, stacked[index]), layer, params["layers"])
    prompts = random_prompts([3, 6, 8, 5, 2, 7, 4, 9, 1, 3], seed=15)
    settings = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_tokens=6, seed=4, stop_token_ids=[5])
    expected = continuous.generate(prompts, settings)
    axes = ("data", "fsdp", "tensor")
    fsdp = jax.make_mesh((2, 4, 1), axes)
    stacked = JaxSampler(TINY, params, max_length=MAX_LENGTH, mesh=fsdp, min_prompt_bucket=8, max_slots=16,
                         weights="sharded")
    assert not jax_sampler.holds_per_layer_weights(stacked.mesh, "sharded")
    assert not isinstance(stacked.params["layers"], tuple)
    got = stacked.generate(prompts, settings)
    np.testing.assert_array_equal(got.token_ids, expected.token_ids)
    np.testing.assert_allclose(got.logprobs, expected.logprobs, atol=1e-5)
    for config, mesh in ((TINY.replace(scan_layers=False), None), (TINY, jax.make_mesh((4, 1, 2), axes)), (TINY, fsdp)):
        per_layer = JaxSampler(config, params, max_length=MAX_LENGTH, mesh=mesh, min_prompt_bucket=8, max_slots=16)
        assert len(per_layer.params["layers"]) == TINY.num_hidden_layers
        if mesh is not None:
            training = jax.tree.leaves(per_layer.source_shardings["layers"])
            for layer in per_layer.params["layers"]:
                for leaf, sharding in zip(jax.tree.leaves(layer), training):
                    assert leaf.sharding.spec == P(*(axis if axis == "tensor" else None for axis in sharding.spec[1:]))
        got = per_layer.generate(prompts, settings)
        np.testing.assert_array_equal(got.token_ids, expected.token_ids)
        np.testing.assert_allclose(got.logprobs, expected.logprobs, atol=1e-5)


def test_the_sampler_holds_its_weights_in_the_compute_dtype(params):
    """fp32 master weights with bf16 compute: the sampler's copy is bf16 (`hold`), half the bytes, and
    the forward gives the same hidden states bit for bit on it as on the fp32 params (in the same
    per-layer layout), whose weights it casts to bf16 where it uses them. Its LM head is held as [V, D]
    rows (`vocab_major`), whose vocab-major logits are the model's head, transposed. An fp32 model keeps
    fp32."""
    config = TINY.replace(compute_dtype="bfloat16")
    sampler = JaxSampler(config, params, max_length=MAX_LENGTH, max_slots=4)
    held = jax.tree.leaves(sampler.params)
    assert {leaf.dtype for leaf in held} == {jnp.dtype(jnp.bfloat16)}
    assert sum(leaf.nbytes for leaf in held) * 2 == sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    assert sampler.params["lm_head"]["rows"].shape == params["lm_head"]["kernel"].shape[::-1]
    tokens = jnp.asarray(random_prompts([12, 12], seed=16), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)
    run = functools.partial(forward, config, tokens=tokens, positions=positions, segment_ids=jnp.ones_like(tokens))
    hidden = run(params=sampler.params, return_hidden=True)[0]  # [B, T, D]
    np.testing.assert_array_equal(hidden, run(params=unstack_layers(config, params), return_hidden=True)[0])
    # The model's head on the last position: bf16 operands, fp32 accumulation, as vocab_logits computes it.
    kernel = params["lm_head"]["kernel"].astype(jnp.bfloat16)  # [D, V]
    expected = jnp.einsum("bd,dv->bv", hidden[:, -1], kernel, preferred_element_type=jnp.float32)
    got = jax_sampler.vocab_logits(config, sampler.params, hidden[:, -1])  # [V, B]
    np.testing.assert_allclose(np.asarray(got).T, np.asarray(expected), rtol=1e-5, atol=1e-5)
    fp32 = JaxSampler(TINY, params, max_length=MAX_LENGTH, max_slots=4)
    assert {leaf.dtype for leaf in jax.tree.leaves(fp32.params)} == {jnp.dtype(jnp.float32)}


def compiled_burst(config: ModelConfig, devices: list, mesh_config: MeshConfig = MeshConfig(data=1, fsdp=1, tensor=1),
                   weights: str = "replicated") -> str:
    """The optimized HLO of the continuous sampler's burst (64 rows of 48 slots) for `devices` on a mesh
    of `mesh_config`, compiled ahead of time on the sampler's copy of the params (`abstract_held_params`)."""
    from jax.sharding import Mesh

    mesh = parallel_mesh.make_mesh(mesh_config, devices)
    rules = parallel_mesh.logical_rules(mesh_config)
    mesh = Mesh(mesh.devices, mesh.axis_names)  # the sampler's Auto axes
    params = jax_sampler.abstract_held_params(config, mesh, rules, weights)
    sampling = SamplingParams(temperature=1.0, max_tokens=32)
    state = jax_sampler.abstract_pool(config, sampling, mesh, 64, MAX_LENGTH, jax_sampler.per_layer_cache(
        mesh, jax_sampler.holds_per_layer_weights(mesh, weights)))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.replicated(mesh))
    kwargs = jax_sampler.jit_shardings(mesh, jax.tree.map(lambda a: a.sharding, params))["burst"]
    burst = parallel_mesh.MeshJit(jax_sampler.burst, mesh, jax_sampler.weight_rules(rules, weights), **kwargs)
    return burst.lower(config, sampling, mesh, params, state, scalar, scalar).compile().as_text()


def layer_weight_slices(config: ModelConfig, hlo: str) -> list[str]:
    """The ops of `hlo` that produce one layer's slice ([1, ...]) of a stacked layer kernel."""
    from mathgrpo.model import abstract_params

    kernels = {leaf.shape[1:] for leaf in jax.tree.leaves(abstract_params(config)["layers"]) if leaf.ndim >= 3}
    shapes = "|".join(re.escape("[1," + ",".join(map(str, shape)) + "]") for shape in kernels)
    return re.findall(rf"= \w+(?:{shapes})\S* (?:dynamic-slice|copy|fusion)\(", hlo)


def loop_weight_gathers(config: ModelConfig, hlo: str) -> list[str]:
    """The all-gathers of `hlo` inside a while loop (its body or a computation it calls) whose result
    has the shape of a weight, whole or one layer's (unit dimensions aside, in any order). XLA:CPU also
    gathers a few per-row values in the loop ([rows, ...]); those are not weights."""
    from mathgrpo.model import abstract_params

    def dims(shape) -> tuple:
        return tuple(sorted(int(d) for d in shape if int(d) != 1))

    abstract = abstract_params(config)
    weights = {dims(leaf.shape[1:]) for leaf in jax.tree.leaves(abstract["layers"])}
    weights |= {dims(leaf.shape) for key, tree in abstract.items() if key != "layers" for leaf in jax.tree.leaves(tree)}
    computations, calls, current = {}, {}, None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and not line.startswith(" "):
            current = header.group(1)
            computations[current], calls[current] = [], set()
        elif current is not None:
            computations[current].append(line)
            calls[current].update(re.findall(r"(?:body|condition|calls|to_apply)=%?([\w.\-]+)", line))
    inside, todo = set(), re.findall(r"body=%?([\w.\-]+)", hlo)
    while todo:
        name = todo.pop()
        if name not in inside:
            inside.add(name)
            todo.extend(calls.get(name, ()))
    gathers = [line.strip() for name in inside for line in computations.get(name, ())
               if re.search(r" all-gather(?:-start)?\(", line)]
    return [line for line in gathers if any(dims(shape.split(",")) in weights for shape in re.findall(
        r"\[(\d[\d,]*)\]", line.split(" all-gather")[0]))]


def described_h100s(count: int) -> list:
    from mathgrpo.tools.plan import gpu_topology_devices

    return gpu_topology_devices(count, (ROOT / "configs" / "gpus" / "h100_sxm.txtpb").read_text())


DESCRIBED_H100 = pytest.mark.skipif(not cuda_plugin_installed(),
                                    reason="needs JAX's CUDA plugin (requirements-gpu.txt) to compile for a GPU")


@pytest.mark.parametrize("platform", ["cpu", pytest.param("described H100", marks=DESCRIBED_H100)])
def test_decode_burst_reads_each_layers_weights_in_place(platform):
    """The compiled burst takes each layer's weights where they lie: no op produces a layer's slice of a
    stacked kernel. Sliced from the stack, XLA:GPU copied every weight at every decode step (a
    device-to-device memcpy each) and XLA:CPU did in a fusion; the sampler's per-layer copy
    (`unstack_layers`) is read in place."""
    config = TINY.replace(compute_dtype="bfloat16")
    hlo = compiled_burst(config, jax.devices()[:1] if platform == "cpu" else described_h100s(1))
    assert "while" in hlo and not layer_weight_slices(config, hlo)


@pytest.mark.parametrize("platform", ["cpu", pytest.param("described H100s", marks=DESCRIBED_H100)])
def test_replicated_weights_gather_nothing_in_the_decode_loop(platform):
    """On the recipe's fsdp8 mesh the sampler's replicated copy is read where it lies: the compiled
    burst's decode loop gathers no weight. Training's shards ("sharded") are all-gathered in it, every
    layer at every step."""
    config = TINY.replace(compute_dtype="bfloat16")
    devices = jax.devices()[:8] if platform == "cpu" else described_h100s(8)
    fsdp8 = MeshConfig(data=1, fsdp=8, tensor=1)
    assert not loop_weight_gathers(config, compiled_burst(config, devices, fsdp8, "replicated"))
    assert loop_weight_gathers(config, compiled_burst(config, devices, fsdp8, "sharded"))


def test_mesh_sharded_batch_matches_single_device(sampler, params):
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"))  # Explicit axes: the sampler uses Auto
    sharded = JaxSampler(TINY, params, max_length=MAX_LENGTH, mesh=mesh, min_prompt_bucket=8)
    prompts = random_prompts([3, 6, 8], seed=12)
    settings = SamplingParams(temperature=0.0, max_tokens=6)
    got, expected = sharded.generate(prompts, settings), sampler.generate(prompts, settings)
    assert sharded.shapes(3, 8, 6)[0] == 8  # rows padded to the 8 batch shards
    np.testing.assert_array_equal(got.token_ids, expected.token_ids)
    np.testing.assert_allclose(got.logprobs, expected.logprobs, atol=1e-5)


@pytest.mark.parametrize("data,fsdp,tensor,weights", [  # configs/mesh/fsdp8, fsdp4_tp2
    (1, 8, 1, "replicated"), (1, 8, 1, "sharded"), (1, 4, 2, "replicated"), (1, 4, 2, "sharded"),
    (4, 1, 2, "replicated")])
def test_mesh_params_sharded_as_training_and_greedy_matches_single_device(sampler, params, data, fsdp, tensor,
                                                                          weights):
    config = MeshConfig(data=data, fsdp=fsdp, tensor=tensor)
    mesh = parallel_mesh.make_mesh(config, jax.devices()[:8])
    rules = parallel_mesh.logical_rules(config)
    training = shardings.param_shardings(TINY, mesh, rules)
    sharded = JaxSampler(TINY, jax.device_put(params, training), max_length=MAX_LENGTH, mesh=mesh, rules=rules,
                         min_prompt_bucket=8, weights=weights)

    # The sampler's copy: "sharded" has training's shardings (stacked: fsdp shards are gathered layer by
    # layer, `holds_per_layer_weights`), the embedding and every kernel split over fsdp × tensor;
    # "replicated" is per layer, every kernel split over tensor only, whole on each batch shard.
    flat = jax.tree_util.tree_flatten_with_path(sharded.params)[0]
    kept = training if weights == "sharded" else shardings.param_shardings(
        TINY, mesh, jax_sampler.weight_rules(rules, weights))
    # The untied head is held as [V, D] rows (`vocab_major`): the kernel's [D, V] spec, reversed.
    head = kept["lm_head"]["kernel"]
    head_spec = tuple(head.spec) + (None,) * (2 - len(head.spec))
    kept = {**kept, "lm_head": {"rows": NamedSharding(mesh, P(*head_spec[::-1]))}}
    held = jax.tree.leaves(unstack_layers(TINY, kept) if jax_sampler.holds_per_layer_weights(mesh, weights) else kept)
    assert len(flat) == len(held)
    split = fsdp * tensor if weights == "sharded" else tensor
    for (path, leaf), expected in zip(flat, held):
        name = jax.tree_util.keystr(path)
        assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), name
        if name.endswith("['kernel']") or name.endswith("['embedding']"):
            shard = leaf.addressable_shards[0].data.shape
            assert np.prod(shard) * split == np.prod(leaf.shape), (name, shard)

    prompts = random_prompts([3, 6, 8, 5], seed=13)
    settings = SamplingParams(n=2, temperature=0.0, max_tokens=7)
    expected = sampler.generate(prompts, settings)
    got = sharded.generate(prompts, settings)
    np.testing.assert_array_equal(got.token_ids, expected.token_ids)
    np.testing.assert_array_equal(got.lengths, expected.lengths)
    np.testing.assert_allclose(got.logprobs, expected.logprobs, atol=1e-5)

    # update_weights takes training's (donated) params as a copy in the same shardings: deleting the
    # source, as the next train step's donation does, leaves the sampler intact; no recompile.
    counts = dict(sharded.trace_counts)
    # (From a copy: placing the fixture's single-device params may alias its buffers in replicated leaves.)
    source = jax.device_put(jax.tree.map(jnp.copy, params), training)
    sharded.update_weights(source)
    jax.tree.map(lambda x: x.delete(), source)
    again = sharded.generate(prompts, settings)
    np.testing.assert_array_equal(again.token_ids, expected.token_ids)
    assert dict(sharded.trace_counts) == counts


@pytest.mark.parametrize("change,message", [
    (dict(n=0), "n=0"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.5), "temperature"), (dict(max_tokens=0), "max_tokens"),
    (dict(top_k=-3), "top_k"), (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(n=1.5), "integer"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_bad_sampling_params_raise(change, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{"max_tokens": 4, **change})


def test_bad_prompts_raise(any_sampler):
    settings = SamplingParams(max_tokens=8)
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        any_sampler.generate([], settings)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        any_sampler.generate([[1, 2], []], settings)
    with pytest.raises(ValueError, match=f"prompt 0 has {MAX_LENGTH - 7} tokens"):
        any_sampler.generate([[1] * (MAX_LENGTH - 7)], settings)
    with pytest.raises(ValueError, match="outside"):
        any_sampler.generate([[1, TINY.vocab_size]], settings)
    with pytest.raises(ValueError, match="no room for a prompt"):
        any_sampler.generate([[1]], settings.replace(max_tokens=MAX_LENGTH))
    with pytest.raises(TypeError, match="SamplingParams"):
        any_sampler.generate([[1]], {"max_tokens": 8})
    with pytest.raises(ValueError, match="lengths"):
        RolloutBatch(prompt_index=np.zeros(2, np.int32), token_ids=np.zeros((2, 3), np.int32),
                     logprobs=np.zeros((2, 3), np.float32), lengths=np.array([1, 4]),
                     finish_reasons=("stop", "length"))


@pytest.mark.parametrize("offset", [None, (3.0, -2.0, 30.0), (100.0, -100.0, -5.0)])
def test_inverse_cdf_categorical_matches_softmax_and_never_draws_excluded(offset):
    """Shifted by each row's max (None), by shifts off the log-normalizer by `offset` within
    SHIFT_RANGE, or partly outside it (rows 0 and 1 redone shifted by their max)."""
    from mathgrpo.rollout.sampling import categorical

    inf = float("inf")
    # Groups of 4 tokens over V = 10: 3 strided groups (tokens g, g + 3, g + 6, g + 9) of a padded copy,
    # whose -inf tokens 10 and 11 end groups 1 and 2.
    rows = jnp.array([
        [0.0, 1.0, -inf, 2.0, -1.0, -inf, -inf, 0.5, 3.0, -inf],
        [-inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, 5.0, -inf],  # all mass on one token
        [40.0, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -30.0],  # extreme spread, first and last
    ])
    draws = 100_000
    keys = jax.random.split(jax.random.key(0), draws)
    expected_lse = jax.nn.logsumexp(rows, axis=-1)
    shift = None if offset is None else expected_lse + jnp.asarray(offset)
    samples = np.asarray(jax.jit(jax.vmap(lambda k: categorical(k, rows.T, block=4, shift=shift)[0]))(keys))
    _, lse = categorical(keys[0], rows.T, block=4, shift=shift)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(expected_lse), rtol=1e-6)
    for r in range(rows.shape[0]):
        probs = np.asarray(jax.nn.softmax(rows[r]), np.float64)
        counts = np.bincount(samples[:, r], minlength=rows.shape[1])
        assert counts[probs == 0].sum() == 0, (r, counts)
        support = probs > 1e-4
        if support.sum() > 1:
            expected = probs[support] / probs[support].sum() * counts[support].sum()
            _, p_value = scipy.stats.chisquare(counts[support], expected)
            assert p_value > 1e-3, (r, counts, expected)
        else:
            assert counts[support].sum() >= draws - 1


def test_shifted_draw_of_a_column_depends_on_its_own_shift_alone():
    """A column whose shift leaves SHIFT_RANGE is redone shifted by its max, and only that column: the
    others keep their draws and normalizers bit for bit (a pool row's samples must not depend on its
    neighbours), and the redone one draws what the max-shifted draw does."""
    from mathgrpo.rollout.sampling import SHIFT_RANGE, categorical

    logits = jax.random.normal(jax.random.key(3), (60, 3)) * 4.0  # [V, B]
    lse = jax.nn.logsumexp(logits, axis=0)
    near = lse + jnp.array([2.0, -1.5, 0.5])
    far = near.at[2].set(lse[2] + 200.0)  # Σw = e^-200: below the range
    assert float(jnp.sum(jnp.exp(logits[:, 2] - far[2]))) < SHIFT_RANGE[0]
    draw = jax.jit(lambda key, shift: categorical(key, logits, block=6, shift=shift))
    unshifted = jax.jit(lambda key: categorical(key, logits, block=6))
    for key in jax.random.split(jax.random.key(4), 20):
        (tokens_near, lse_near), (tokens_far, lse_far) = draw(key, near), draw(key, far)
        np.testing.assert_array_equal(np.asarray(tokens_near[:2]), np.asarray(tokens_far[:2]))
        np.testing.assert_array_equal(np.asarray(lse_near[:2]), np.asarray(lse_far[:2]))
        tokens_max, lse_max = unshifted(key)
        assert int(tokens_far[2]) == int(tokens_max[2])
        np.testing.assert_allclose(float(lse_far[2]), float(lse_max[2]), rtol=1e-7)


def test_bf16_sampler_runs_with_every_cpu_attention_and_agrees(params):
    """bf16 compute on CPU: the prefill attends the cache's slots through the configured
    implementation and each decode step through `cached_attention` (a bf16 dot that XLA:CPU could not
    run once broke `generate` on bf16 checkpoints). Reference and blockwise prefill give one answer."""
    prompts = random_prompts([5, 11], seed=7)
    sampling = SamplingParams(n=2, temperature=0.0, max_tokens=6)
    results = []
    for attention in ("reference", "blockwise"):
        config = TINY.replace(compute_dtype="bfloat16", attention=attention, attention_block_size=4)
        out = JaxSampler(config, params, max_length=MAX_LENGTH, min_prompt_bucket=8).generate(prompts, sampling)
        assert out.token_ids.shape == (4, 6) and np.all(out.lengths == 6)
        assert np.all(np.isfinite(out.logprobs)) and np.all(out.logprobs <= 0)
        results.append(out.token_ids)
    np.testing.assert_array_equal(results[0], results[1])
