"""The jitted GRPO (and OPD) train step: packed micro-batches, gradient accumulation, clipping, AdamW.

`make_train_step(...)` returns one jitted `(TrainState, PackedBatch) -> (TrainState, outputs)`:
1. a `lax.fori_loop` over the batch's real micro-batches (the [M, R, L] buffer may hold more, see
   packing.py) — each runs the model, the chunked log-prob/entropy pass, the TIS weights and the
   policy loss, and adds its gradient to the accumulator;
2. one optimizer update for the mini-batch: global-norm clipping, then AdamW; a step whose gradient
   norm is not finite leaves params and optimizer state untouched and is counted in
   `TrainState.skipped_steps` (verl zeroes the grads and skips `optimizer.step()`).

The loss of a micro-batch is its share of the mini-batch loss (global token-mean by default: the sum
over its response tokens divided by the mini-batch's token count), so accumulated gradients equal
the gradient of the whole mini-batch at once. `loss_scaling: verl_legacy` weights each row's token
mean by n_seq / S_row / R instead (docs/recipe.md §2.4).

Fused on-policy step (the recipe): π_old is the detached log-prob of this same forward pass, so the
ratio is 1; with `fused=False` π_old comes from `batch.old_logprobs` (a separate pass, needed when a
rollout is reused for several updates). Either way the step returns the per-token π_old log-probs
and entropies, for the rollout-correction and entropy metrics on the host.

On-policy distillation (docs/recipe.md §1.5) uses the same step on a batch the scoring pass
(train/distill.py) has filled: with top_k = 0 its per-token rewards are the `advantages` and the loss is
GRPO's, token by token (the fork's 2-D loss); with top_k = K the batch carries `topk_ids` and
`topk_advantages` [M, R, L, K] and each token's loss is the PPO loss at its K candidate ids, summed over k
(the fork's 3-D loss, `distill.topk_token_losses`), aggregated by the same token mean.

Precision: fp32 master params and optimizer state; matmuls in `model.compute_dtype`; weight gradients
formed in fp32 (`layers.project`), so their sums over token chunks, over the devices (FSDP's
reduce-scatter) and over micro-batches are fp32, as verl's FSDP reduces them (`reduce_dtype=fp32`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from mathgrpo.config import FULL_REMAT, GRPOConfig, ModelConfig, OptimConfig
from mathgrpo.parallel import mesh as parallel_mesh
from mathgrpo.parallel import shardings as parallel_shardings
from mathgrpo.parallel.mesh import MeshJit
from mathgrpo.rl import distill, losses, rollout_correction
from mathgrpo.rl import logprobs as rl_logprobs
from mathgrpo.train import packing
from mathgrpo.train import state as train_state
from mathgrpo.train.packing import PackedBatch
from mathgrpo.train.state import TrainState, learning_rate_schedule, make_optimizer

TOPK_FIELDS = ("topk_ids", "topk_advantages", "topk_old_logprobs")


def micro_batch_arrays(batch: PackedBatch, m) -> dict:
    """The m-th micro-batch's per-token arrays, [R, L] each ([R, L, K] for the top-k fields a batch holds)."""
    names = ("tokens", "positions", "segment_ids", "loss_mask", "advantages", "rollout_logprobs",
             "old_logprobs", "ref_logprobs", "sequence_index")
    names += tuple(n for n in TOPK_FIELDS if getattr(batch, n) is not None)
    return {n: jax.lax.dynamic_index_in_dim(getattr(batch, n), m, 0, keepdims=False) for n in names}


def head_options(algo: GRPOConfig, temperature: float) -> dict:
    """`token_logprobs`' LM-head keywords: the sampling temperature (log-probs of logits / T) and the
    block sizes from the config."""
    return dict(temperature=temperature, chunk_size=algo.logprob_chunk_size,
                vocab_block=algo.logprob_vocab_block, save_logits=algo.logprob_save_logits)


def micro_batch_loss(params, mb: dict, legacy_weight, token_count, sequence_count, num_sequences: int, *,
                     model: ModelConfig, algo: GRPOConfig, temperature: float = 1.0, horizon: int | None = None,
                     fused: bool = True, grad_sink=None):
    """This micro-batch's share of the mini-batch loss, and sums for the metrics.

    GRPO (and sampled-token OPD, whose per-token rewards are the `advantages`): verl's per-token PPO loss
    of the sampled token. Top-k OPD (the micro-batch has `topk_ids` [R, L, K]): the same PPO loss at each
    of the K candidate ids, summed over k (`distill.topk_token_losses`, the fork's 3-D branch); the head
    scores the K ids and the sampled token in one walk ([R, L, K + 1] targets), the latter for π_old's
    output and the TIS weights; unfused, π_old at the K ids is the batch's `topk_old_logprobs`. Either way
    the per-token losses are then aggregated alike.

    `grad_sink`: the layers' gradient accumulator, see `accumulate_gradients`.
    Returns (loss, aux) where aux holds per-token π_old log-probs (of the sampled token) and entropy [R, L]
    and metric sums.
    """
    mask = mb["loss_mask"]
    topk = "topk_ids" in mb
    targets = jnp.concatenate([mb["topk_ids"], mb["tokens"][..., None]], axis=-1) if topk else None
    logprobs, entropy = rl_logprobs.token_logprobs(
        model, params, mb["tokens"], mb["positions"], mb["segment_ids"], grad_sink=grad_sink, mask=mask,
        targets=targets, **head_options(algo, temperature))  # [R, L] (top-k: [R, L, K + 1]), 0 off the response
    if topk:
        logprobs, sampled = logprobs[..., :-1], logprobs[..., -1]
        if not fused and "topk_old_logprobs" not in mb:
            raise ValueError("an unfused top-k step needs the batch's topk_old_logprobs (the scoring pass's)")
        topk_old = jax.lax.stop_gradient(logprobs) if fused else mb["topk_old_logprobs"]
        old = jax.lax.stop_gradient(sampled) if fused else mb["old_logprobs"]
    else:
        old = jax.lax.stop_gradient(logprobs) if fused else mb["old_logprobs"]
    is_weights = None
    if algo.rollout_is is not None:
        if algo.rollout_is == "sequence":
            raise NotImplementedError("sequence-level TIS over packed rows is not implemented; use 'token'")
        is_weights, _ = rollout_correction.rollout_is_weights(old, mb["rollout_logprobs"], mask, level="token",
                                                threshold=algo.rollout_is_threshold)
    packed = dict(sequence_index=mb["sequence_index"], num_sequences=num_sequences)  # rows hold several sequences
    clip = dict(clip_low=algo.clip_ratio_low, clip_high=algo.clip_ratio_high, clip_c=algo.clip_ratio_c)
    if topk:
        if algo.importance_level == "sequence":
            raise NotImplementedError("GSPO's sequence ratio over top-k candidate ids is not defined; use 'token'")
        pg_losses, log_ratio, clipped = distill.topk_token_losses(logprobs, topk_old, mb["topk_advantages"],
                                                                  is_weights=is_weights, **clip)
        # the fork's 3-D metrics: clipped ids counted per token (Σ_k), the log-ratio summed over k, no lower clip
        clipped, log_ratio = jnp.sum(clipped, axis=-1), jnp.sum(log_ratio, axis=-1)
        clipped_lower = jnp.zeros_like(mask)
        sampled_logprobs = sampled
    else:
        seq_log_ratio = None
        if algo.importance_level == "sequence":  # GSPO: each token carries its sequence's mean log-ratio
            seq_log_ratio = losses.sequence_log_ratio(logprobs, old, mask, **packed)
        pg_losses, log_ratio, clipped, clipped_lower = losses.policy_token_losses(
            logprobs, old, mb["advantages"], is_weights=is_weights, seq_log_ratio=seq_log_ratio, **clip)
        sampled_logprobs = logprobs
    per_token = pg_losses
    kl = None
    if algo.use_kl_loss:
        kl = losses.kl_penalty(sampled_logprobs, mb["ref_logprobs"], algo.kl_loss_type)
        per_token = per_token + algo.kl_loss_coef * kl
    if algo.entropy_coeff:
        per_token = per_token - algo.entropy_coeff * entropy

    if algo.loss_scaling == "verl_legacy":  # token mean per row, weighted n_seq/S_row/R
        loss = jnp.sum(legacy_weight * losses.masked_mean(per_token, mask, axis=-1))
    else:  # the global form of verl's agg_loss: these micro-batches' sums add up to the mini-batch loss
        loss = losses.aggregate(per_token, mask, algo.loss_agg_mode, token_count=token_count,
                              sequence_count=sequence_count, horizon=horizon, **packed)
    sums = {
        "pg_loss": jnp.sum(pg_losses * mask),
        "pg_clipfrac": jnp.sum(clipped * mask),
        "pg_clipfrac_lower": jnp.sum(clipped_lower * mask),
        "ppo_kl": jnp.sum(-log_ratio * mask),
        "entropy": jnp.sum(entropy * mask),
    }
    if kl is not None:
        sums["kl_loss"] = jnp.sum(kl * mask)
    return loss, {"sums": sums, "old_logprobs": old, "entropy": entropy}


def accumulate_gradients(params, batch: PackedBatch, *, model: ModelConfig, algo: GRPOConfig,
                         temperature: float = 1.0, horizon: int | None = None, fused: bool = True):
    """Σ over the batch's real micro-batches of (loss, gradient, metric sums); per-token π_old and entropy.

    `temperature`: the rollout's (log-probs of logits / T); `horizon`: the max response length that
    seq-mean-token-sum-norm divides by (required for that mode).
    Returns (loss, grads, sums, old_logprobs [M, R, L], entropy [M, R, L]).
    """
    if algo.loss_agg_mode == "seq-mean-token-sum-norm" and horizon is None:
        raise ValueError("loss_agg_mode='seq-mean-token-sum-norm' divides by the max response length: pass horizon")
    num_sequences = batch.sequence_slots.shape[0]
    # Under full remat the backward scan adds each layer's gradient into the accumulator in place
    # (model.full_remat_layers: no second [L, ...] gradient buffer per micro-batch); it comes back as
    # the gradient of `grad_sink`, and the layers' own gradient is zero and dropped.
    in_place = model.remat_policy in FULL_REMAT

    def grad_fn(params, mb, *args, grads, **kwargs):
        if not in_place:
            value, micro_grads = jax.value_and_grad(micro_batch_loss, has_aux=True)(params, mb, *args, **kwargs)
            return value, jax.tree.map(jnp.add, grads, micro_grads)
        def loss(params, sink):
            return micro_batch_loss(params, mb, *args, grad_sink=sink, **kwargs)

        value, (micro_grads, layers) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, grads["layers"])
        return value, type(grads)({name: layers if name == "layers" else jax.tree.map(jnp.add, grads[name], g)
                                   for name, g in micro_grads.items()})

    M, R, L = batch.tokens.shape
    names = ("pg_loss", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "entropy") + (
        ("kl_loss",) if algo.use_kl_loss else ())

    def body(m, carry):
        grads, loss_total, sums, old_all, entropy_all = carry
        legacy_weight = jax.lax.dynamic_index_in_dim(batch.legacy_weight, m, 0, keepdims=False)
        (loss, aux), grads = grad_fn(params, micro_batch_arrays(batch, m), legacy_weight, batch.token_count,
                                     batch.sequence_count, num_sequences, grads=grads, model=model, algo=algo,
                                     temperature=temperature, horizon=horizon, fused=fused)
        sums = {k: sums[k] + aux["sums"][k] for k in sums}
        old_all = jax.lax.dynamic_update_index_in_dim(old_all, aux["old_logprobs"], m, 0)
        entropy_all = jax.lax.dynamic_update_index_in_dim(entropy_all, aux["entropy"], m, 0)
        return grads, loss_total + loss, sums, old_all, entropy_all

    init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
            {k: jnp.zeros((), jnp.float32) for k in names},
            jnp.zeros((M, R, L), jnp.float32), jnp.zeros((M, R, L), jnp.float32))
    grads, loss, sums, old_logprobs, entropy = jax.lax.fori_loop(0, batch.num_micro_batches, body, init)
    return loss, grads, sums, old_logprobs, entropy


def make_train_step(model: ModelConfig, algo: GRPOConfig, optim: OptimConfig, *, temperature: float = 1.0,
                    horizon: int | None = None, fused: bool = True, mesh: Mesh | None = None,
                    rules=parallel_mesh.LOGICAL_RULES):
    """Builds the jitted train step; with a mesh, in/out shardings are explicit (parallel/shardings.py)."""
    optimizer = make_optimizer(optim)
    schedule = learning_rate_schedule(optim)

    def step(state: TrainState, batch: PackedBatch):
        loss, grads, sums, old_logprobs, entropy = accumulate_gradients(
            state.params, batch, model=model, algo=algo, temperature=temperature, horizon=horizon, fused=fused)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)

        def update(operands):
            state, grads = operands
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state, skipped_steps=state.skipped_steps)

        def skip(operands):
            state, _ = operands
            return state.replace(skipped_steps=state.skipped_steps + 1)

        # lax.cond, not a select between old and new: only one branch runs, so the update writes the
        # donated buffers in place instead of materializing a second copy of params and moments.
        new_state = jax.lax.cond(finite, update, skip, (state, grads))
        tokens = jnp.maximum(batch.token_count, 1.0)
        metrics = {f"actor/{k}": v / tokens for k, v in sums.items()}  # token means over the mini-batch
        metrics["actor/pg_loss"] = loss  # the optimized objective
        metrics["actor/grad_norm"] = grad_norm  # before clipping, as verl logs it
        metrics["actor/lr"] = schedule(state.step)
        metrics["actor/update_skipped"] = (~finite).astype(jnp.float32)
        return new_state, {"metrics": metrics, "old_logprobs": old_logprobs, "entropy": entropy}

    # The state is donated: the old params and optimizer state are dead after the update, so XLA
    # reuses their buffers (a 4B fp32 state is ~48 GB across the mesh; no second copy).
    shardings = {}
    if mesh is not None:
        state_sharding = train_state.train_state_shardings(model, optimizer, mesh, rules)
        outputs = {"metrics": parallel_shardings.replicated(mesh), "old_logprobs": packing.batch_shardings(mesh).tokens,
                   "entropy": packing.batch_shardings(mesh).tokens}
        # topk=True fits GRPO batches too (no top-k leaves), so one step builder serves both
        shardings = dict(in_shardings=(state_sharding, packing.batch_shardings(mesh, topk=True)),
                         out_shardings=(state_sharding, outputs))
    return MeshJit(step, mesh, rules, donate_argnums=(0,), **shardings)


def make_logprob_fn(model: ModelConfig, algo: GRPOConfig, *, temperature: float = 1.0, mesh: Mesh | None = None,
                    rules=parallel_mesh.LOGICAL_RULES):
    """The jitted log-prob/entropy pass over a PackedBatch (no gradient): [M, R, L] each, on the response
    tokens (`loss_mask`; 0 elsewhere).

    Used for π_old when a rollout is reused for several updates, and for a reference policy.
    """

    def logprobs(params, batch: PackedBatch):
        def one(m, outputs):  # only the batch's real micro-batches run; the bucket's spare ones stay 0
            mb = micro_batch_arrays(batch, m)
            values = rl_logprobs.token_logprobs(model, params, mb["tokens"], mb["positions"], mb["segment_ids"],
                                         mask=mb["loss_mask"], **head_options(algo, temperature))
            return tuple(jax.lax.dynamic_update_index_in_dim(o, v, m, 0) for o, v in zip(outputs, values))

        zeros = jnp.zeros(batch.tokens.shape, jnp.float32)  # [M, R, L]
        return jax.lax.fori_loop(0, batch.num_micro_batches, one, (zeros, zeros))

    shardings = {}
    if mesh is not None:
        rows = packing.batch_shardings(mesh).tokens
        shardings = dict(in_shardings=(parallel_shardings.param_shardings(model, mesh, rules),
                                       packing.batch_shardings(mesh, topk=True)),
                         out_shardings=(rows, rows))
    return MeshJit(logprobs, mesh, rules, **shardings)
