"""The Qwen3 dense decoder in Flax linen, used purely functionally, and its explicit KV cache.

Follows HF `modeling_qwen3.py` (docs/recipe.md §5.2): pre-norm blocks; grouped-query attention whose
per-head q/k RMSNorm comes *before* RoPE; rotate-half RoPE; SwiGLU MLP; no biases; tied or untied
LM head. Parameter names follow HF (`q_proj`, `k_norm`, `input_layernorm`), so `weights/hf.py`'s table is
identity plus reshapes. Legend in `layers.py`.

Departures from HF, each deliberate:
- Kernels are stored einsum-ready ([D, N, H] for q_proj, [N, H, D] for o_proj) instead of HF's
  [out, in] matrices; `weights/hf.py` converts.
- Layers are stacked on a leading L axis (`nn.scan`), whether or not the forward scans
  (`scan_layers=False` unrolls the same scan), so the parameter layout never depends on a flag.
  The one exception is the sampler's own copy (`unstack_layers`): a tuple of per-layer trees, which
  the forward applies one by one, so a decode loop never slices its layers' weights out of the stack.
- Matmuls accumulate in fp32 (`preferred_element_type`) and the logits come out in fp32.
- Attention masking is by segment ids (several sequences packed in one row), not an [B, T, S] mask.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from mathgrpo.config import FULL_REMAT, ModelConfig
from mathgrpo.model.layers import (
    Proj,
    RMSNorm,
    apply_rope,
    attend,
    cast_sharded,
    checkpoint_name,
    cudnn_attention,
    cudnn_packed_attention,
    cudnn_packed_supported,
    decode_attention,
    dtype_of,
    from_kv,
    kv_storage_dtype,
    remat_policy,
    target_platform,
    to_kv,
    token_chunked,
)

Params = Any  # a pytree of arrays, nested like the linen modules


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, written in place at `index`. Empty slots have segment id 0 and
    are never attended.

    `index` is one slot for all rows (the static sampler left-pads its prompts so every row writes the
    same slot) or one slot per row (the continuous sampler's pool, whose rows hold requests of
    different lengths; one new token per row per step).

    Stacked ([L, B, K, H, S] keys and [L, B, K, S, H] values) or per layer (tuples of L [B, K, H, S] and
    [B, K, S, H] arrays), the layout of the weights that write it: on CPU the sampler holds both per
    layer (`init_cache(per_layer=True)`, `jax_sampler.per_layer_cache`), so that a decode step reads each
    layer's slots in place (`layers.decode_block_size`)."""

    # Keys [L, B, K, H, S], values [L, B, K, S, H]: each kv head's slots together, and each of the
    # decode step's two products reduces over its operand's major axis (keys: over H, values: over S),
    # the form XLA:CPU runs at memory speed (`layers.decode_one_pass`; keys stored [.., S, H] took
    # ~1.8x as long to score, docs/sampler.md). Stored as `layers.kv_storage_dtype` says (bf16 values as
    # uint16 bits on CPU), read with `layers.from_kv`.
    k: jax.Array | tuple[jax.Array, ...]  # [L, B, K, H, S], or L × [B, K, H, S]
    v: jax.Array | tuple[jax.Array, ...]  # [L, B, K, S, H], or L × [B, K, S, H]
    segment_ids: jax.Array  # [B, S] int32
    index: jax.Array  # [] or [B] int32: the next slot to write

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, tuple)

    @property
    def max_length(self) -> int:
        return self.segment_ids.shape[1]


def init_cache(config: ModelConfig, batch: int, max_length: int, per_layer: bool = False) -> KVCache:
    """An empty cache of `config.compute_dtype` keys and values, in their storage dtype; `per_layer`:
    one array per layer (for per-layer weights, `unstack_layers`) instead of one stack."""
    dtype = kv_storage_dtype(config.compute_dtype)
    keys = (batch, config.num_key_value_heads, config.head_dim, max_length)  # [B, K, H, S]
    values = (batch, config.num_key_value_heads, max_length, config.head_dim)  # [B, K, S, H]
    if per_layer:
        k = tuple(jnp.zeros(keys, dtype) for _ in range(config.num_hidden_layers))
        v = tuple(jnp.zeros(values, dtype) for _ in range(config.num_hidden_layers))
    else:
        k, v = (jnp.zeros((config.num_hidden_layers,) + shape, dtype) for shape in (keys, values))
    return KVCache(k=k, v=v, segment_ids=jnp.zeros((batch, max_length), jnp.int32), index=jnp.zeros((), jnp.int32))


def write_rows(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array, layer: jax.Array,
               slots: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Writes row b's new key and value ([B, K, H]) at slot `slots[b]` of `layer` in the caches (keys
    [L, B, K, H, S], values [L, B, K, S, H]), in place. A slot past the end belongs to a finished row,
    whose cache is never read again: its write lands on its own last slot.

    One scatter per cache, except on CPU: XLA:CPU does not update a scatter's operand in place inside
    the decode loop (it kept two copies of the whole cache, measured with `plan`), so there the rows are
    written one `dynamic_update_slice` at a time in a loop, which it does update in place."""
    slots = jnp.minimum(slots, cache_v.shape[3] - 1)
    if target_platform() != "cpu":
        rows = jnp.arange(k.shape[0])
        return (cache_k.at[layer, rows, :, :, slots].set(to_kv(k, cache_k.dtype)),
                cache_v.at[layer, rows, :, slots, :].set(to_kv(v, cache_v.dtype)))

    def row(b, caches):
        cache_k, cache_v = caches
        key, value = (to_kv(jax.lax.dynamic_index_in_dim(new, b, 0, keepdims=False), cache_k.dtype) for new in (k, v))
        return (jax.lax.dynamic_update_slice(cache_k, key[None, None, :, :, None], (layer, b, 0, 0, slots[b])),
                jax.lax.dynamic_update_slice(cache_v, value[None, None, :, None, :], (layer, b, 0, slots[b], 0)))

    return jax.lax.fori_loop(0, k.shape[0], row, (cache_k, cache_v))


def write_prompts(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array, rows: jax.Array,
                  n: int) -> tuple[jax.Array, jax.Array]:
    """Copies prompt a's keys and values ([L, A, K, H, T] and [L, A, K, T, H], stored as the pool's) into
    slots 0..T-1 of rows rows[a·n .. a·n+n-1] of the pool's caches (`KVCache`), in place (the continuous sampler's
    admission: a prompt's n samples share its prefill); a row index >= B writes nothing. Per-layer
    caches (tuples, `init_cache(per_layer=True)`) take per-layer prompt caches, written layer by layer.

    The form is chosen per platform, as in `write_rows`, because each compiler keeps a different one in
    place (measured with `plan`). XLA:GPU: one `dynamic_update_slice` at offset 0 of every row's first T
    slots, an admitted row taking its prompt's KV and the others keeping theirs (a [L, B, K, T, H]
    temporary per cache); a loop of per-row writes made it lay the loop's cache out rows-first and copy it whole.
    XLA:CPU: that loop, one row at a time, which it updates in place; it copies the cache for the
    single write (its update reads the operand)."""
    if isinstance(cache_k, tuple):  # per-layer caches: each layer's as a stack of one
        if not isinstance(k, tuple) or len(k) != len(cache_k):
            raise ValueError(f"per-layer pool caches take per-layer prompt caches of {len(cache_k)} layers")
        written = [write_prompts(*(x[None] for x in layer), rows, n) for layer in zip(cache_k, cache_v, k, v)]
        return tuple(layer_k[0] for layer_k, _ in written), tuple(layer_v[0] for _, layer_v in written)
    if (k.dtype, v.dtype) != (cache_k.dtype, cache_v.dtype):
        raise ValueError(f"the prompts' keys/values are stored as {k.dtype}/{v.dtype}, the pool's as "
                         f"{cache_k.dtype}/{cache_v.dtype}: expected both caches from `init_cache` of one config")
    B, A, T = cache_v.shape[1], v.shape[1], v.shape[3]
    if target_platform() != "cpu":
        source = jnp.full((B,), A * n, jnp.int32).at[rows].set(jnp.arange(A * n, dtype=jnp.int32), mode="drop")
        admitted = (source < A * n)[None, :, None, None, None]  # [1, B, 1, 1, 1]
        prompt_of = jnp.minimum(source, A * n - 1) // n  # [B]

        def write(cache: jax.Array, new: jax.Array, slot_axis: int) -> jax.Array:
            head = jax.lax.slice_in_dim(cache, 0, T, axis=slot_axis)  # [L, B, K, H, T] or [L, B, K, T, H]
            head = jnp.where(admitted, jnp.take(new, prompt_of, axis=1), head)
            return jax.lax.dynamic_update_slice(cache, head, (0, 0, 0, 0, 0))

        return write(cache_k, k, 4), write(cache_v, v, 3)

    def copy(i, caches):  # prompt i // n into row rows[i]
        def write(caches):
            return tuple(jax.lax.dynamic_update_slice(
                cache, jax.lax.dynamic_slice_in_dim(new, i // n, 1, axis=1), (0, rows[i], 0, 0, 0))
                for cache, new in zip(caches, (k, v)))

        return jax.lax.cond(rows[i] < B, write, lambda caches: caches, caches)

    return jax.lax.fori_loop(0, rows.shape[0], copy, (cache_k, cache_v))


def _proj(config: ModelConfig, equation, shape, axes, name):
    return Proj(equation, shape, axes, config.param_dtype, config.compute_dtype,
                config.initializer_range, name=name)


def _norm(config: ModelConfig, axis_name: str, name: str):
    return RMSNorm(config.rms_norm_eps, axis_name, config.param_dtype, config.compute_dtype, name=name)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, q_segment, kv_segment, q_index, kv_index, cache_kv, cache_index,
                 layer_index):
        c = self.config
        D, N, K, H = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q_kernel = _proj(c, "BTD,DNH->BTNH", (D, N, H), ("embed", "q_heads", "head_dim"), "q_proj")(None)
        k_kernel = _proj(c, "BTD,DKH->BTKH", (D, K, H), ("embed", "kv_heads", "head_dim"), "k_proj")(None)
        v_kernel = _proj(c, "BTD,DKH->BTKH", (D, K, H), ("embed", "kv_heads", "head_dim"), "v_proj")(None)
        o_kernel = _proj(c, "BTNH,NHD->BTD", (N, H, D), ("q_heads", "head_dim", "embed"), "o_proj")(None)
        q_norm, k_norm = _norm(c, "head_dim", "q_norm"), _norm(c, "head_dim", "k_norm")

        def project(inputs):  # position-wise: x [B, c, D], positions [B, c] -> q, k, v
            x, positions = inputs
            q = checkpoint_name(q_kernel(x), "query_proj")
            k = checkpoint_name(k_kernel(x), "key_proj")
            v = checkpoint_name(v_kernel(x), "value_proj")
            q = apply_rope(q_norm(q), positions, c.rope_theta)  # [B, c, N, H]
            k = apply_rope(k_norm(k), positions, c.rope_theta)  # [B, c, K, H]
            return q, k, v

        if self.is_initializing():  # create the norm params outside the chunk loop
            q_norm(jnp.zeros((1, 1, N, H))), k_norm(jnp.zeros((1, 1, K, H)))
        q, k, v = token_chunked(project, (x, positions), c.token_chunk_size)
        if cache_kv is not None:
            # The whole stacked cache rides in the layer scan's carry: this layer writes only
            # its new keys/values in place and reads its own slice. (Scanning the cache as per-layer
            # inputs/outputs instead copied every layer's slice out and back each decode step: 60% of
            # a 64-row decode step on CPU, BENCHMARKS.md.)
            # Its layout (`KVCache`) lets the decode step's two attention products read each head's
            # slots in place (an [.., S, K, H] cache cost two transposing copies per layer).
            cache_k, cache_v = cache_kv
            if cache_index.ndim == 0:  # every row writes the same slots
                cache_k = jax.lax.dynamic_update_slice(cache_k, to_kv(k.transpose(0, 2, 3, 1), cache_k.dtype)[None],
                                                       (layer_index, 0, 0, 0, cache_index))  # [B, K, H, T]
                cache_v = jax.lax.dynamic_update_slice(cache_v, to_kv(v.swapaxes(1, 2), cache_v.dtype)[None],
                                                       (layer_index, 0, 0, cache_index, 0))  # [B, K, T, H]
            else:  # one token per row, each at its own slot
                cache_k, cache_v = write_rows(cache_k, cache_v, k[:, 0], v[:, 0], layer_index, cache_index)
            cache_kv = (cache_k, cache_v)
            if x.shape[1] == 1:  # the decode step: over the slots up to the furthest row's position
                out = decode_attention(q, cache_k, cache_v, layer_index, q_segment, kv_segment, q_index, kv_index,
                                       block_size=c.decode_block_size or None)
            else:  # a prefill: the configured implementation over the slots, in [B, S, K, H]
                k = from_kv(jax.lax.dynamic_index_in_dim(cache_k, layer_index, 0, keepdims=False), q.dtype)  # [B,K,H,S]
                v = from_kv(jax.lax.dynamic_index_in_dim(cache_v, layer_index, 0, keepdims=False), q.dtype)  # [B,K,S,H]
                out = attend(c.attention, c.attention_block_size)(
                    q, k.transpose(0, 3, 1, 2), v.swapaxes(1, 2), q_segment, kv_segment, q_index, kv_index)
        elif c.attention == "cudnn" and cudnn_packed_supported():  # Hopper on: the varlen kernel, no mask
            out = cudnn_packed_attention(q, k, v, q_segment, kv_segment, q_index, kv_index,
                                         max_segments=c.attention_max_segments)
        elif c.attention == "cudnn":  # Ampere (the recipe's A800s): cuDNN flash attention, segment mask
            out = cudnn_attention(q, k, v, q_segment, kv_segment, q_index, kv_index)
        else:
            out = attend(c.attention, c.attention_block_size)(q, k, v, q_segment, kv_segment, q_index, kv_index)
        out = checkpoint_name(out, "attention_out")  # [B, T, N, H]
        out = token_chunked(o_kernel, out, c.token_chunk_size)
        return out, cache_kv


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        D, F = c.hidden_size, c.intermediate_size
        gate_kernel = _proj(c, "BTD,DF->BTF", (D, F), ("embed", "mlp"), "gate_proj")(None)  # rows -> rows·W, [D, F]
        up_kernel = _proj(c, "BTD,DF->BTF", (D, F), ("embed", "mlp"), "up_proj")(None)
        down_kernel = _proj(c, "BTF,FD->BTD", (F, D), ("mlp", "embed"), "down_proj")(None)

        def swiglu(x):  # [B, c, D] -> [B, c, D]
            # On [B·c, D] rows, not [B, c, D]: with the 3-D einsums XLA:CPU wrote the backward's silu′
            # as a transposed [F, B, c] copy for the weight gradients (fwd + bwd at B 2, c 1024, D 512,
            # F 1536: 0.334 -> 0.246 s; BENCHMARKS.md).
            rows = x.reshape(-1, x.shape[-1])
            hidden = nn.silu(gate_kernel(rows, "ND,DF->NF")) * up_kernel(rows, "ND,DF->NF")
            return down_kernel(hidden, "NF,FD->ND").reshape(x.shape)

        return token_chunked(swiglu, x, c.token_chunk_size)


class DecoderLayer(nn.Module):
    """One pre-norm block; signature `(carry, *xs) -> (carry, ys)` so `nn.scan` can stack it.

    The carry is (x [B, T, D], cache) with cache None or the whole stacked (k, v) (`KVCache`);
    `layer_index` (the scanned input) says which layer's slots this block writes and reads."""

    config: ModelConfig

    @nn.compact
    def __call__(self, carry, positions, q_segment, kv_segment, q_index, kv_index, cache_index, layer_index):
        c = self.config
        x, cache_kv = carry
        attn_out, cache_kv = Attention(c, name="self_attn")(
            _norm(c, "embed", "input_layernorm")(x),
            positions, q_segment, kv_segment, q_index, kv_index, cache_kv, cache_index, layer_index,
        )
        x = x + attn_out
        x = x + MLP(c, name="mlp")(_norm(c, "embed", "post_attention_layernorm")(x))
        x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))
        return (x, cache_kv), None


def _as_bits(x: jax.Array) -> jax.Array:
    """The float array's bit pattern as unsigned ints of the same width (a free bitcast)."""
    return jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])


def full_remat_layers(config: ModelConfig, layer_params: Params, x: jax.Array, inputs: tuple,
                      grad_sink: Params | None = None) -> jax.Array:
    """The decoder stack under `remat_policy: full`, for training: a scan whose layers save only their
    input and recompute everything else in the backward pass (what `nn.remat(nothing_saveable)`
    does), with the remat written as a custom VJP.

    Why by hand: the saved inputs form an [L, B, T, D] stack in the compute dtype. XLA:CPU's
    bf16 normalization widened that bf16 stack to a second, fp32 copy (5.6 GiB per device for the
    4B recipe at 16,384 tokens, BENCHMARKS.md); here the stack holds the inputs' bit patterns as
    unsigned ints, which no pass widens, and a bitcast (free on every backend) restores them.
    The layer parameters and the broadcast inputs are scan inputs that the residuals only forward.

    Under `remat_policy: full_offload` the stack lives in pinned host memory (MaxText's offloaded
    remat): each layer's input is copied to the host as the forward scan produces it and back as the
    backward scan reaches it — the device keeps none of the [L, B, T, D] stack (2.81 GiB per device
    for the 4B recipe at 16,384 tokens), for one host round trip of B·T·D per layer, which XLA:GPU's
    host-offload scheduling can overlap with the layer's compute.

    With `grad_sink` (an accumulator shaped like `layer_params`), the gradient of the layers is
    added into it in place, layer by layer, during the backward scan, and handed back as the
    "gradient" of `grad_sink` (`layer_params` get none): gradient accumulation over micro-batches then
    needs no second [L, ...] buffer for each micro-batch's layer gradients (1.87 GiB per device for
    the 4B recipe on fsdp8). Differentiate with respect to `grad_sink` exactly once per call.

    Args: layer_params: the stacked [L, ...] params of `layers`; x [B, T, D]; inputs: (positions,
      q_segment, kv_segment, q_index, kv_index) as DecoderLayer takes them (no cache).
    """
    layer = DecoderLayer(config, parent=None)  # unbound: applied to explicit params
    zero = jnp.zeros((), jnp.int32)
    dtype = x.dtype

    def apply(params, x, inputs):
        (y, _), _ = layer.apply({"params": params}, (x, None), *inputs, zero, zero)
        return y

    unroll = 1 if config.scan_layers else config.num_hidden_layers
    offload = config.remat_policy == "full_offload"

    def save(x):
        bits = _as_bits(x)
        return jax.device_put(bits, jax.memory.Space.Host) if offload else bits

    def load(bits):
        bits = jax.device_put(bits, jax.memory.Space.Device) if offload else bits
        return jax.lax.bitcast_convert_type(bits, dtype)

    @jax.custom_vjp
    def stack(layer_params, grad_sink, x, inputs):
        return jax.lax.scan(lambda x, params: (apply(params, x, inputs), None), x, layer_params, unroll=unroll)[0]

    def stack_fwd(layer_params, grad_sink, x, inputs):
        y, bits = jax.lax.scan(lambda x, params: (apply(params, x, inputs), save(x)), x, layer_params,
                               unroll=unroll)
        return y, (layer_params, grad_sink, bits, inputs)

    def stack_bwd(residuals, grad_y):
        layer_params, sink, bits, inputs = residuals

        def step(carry, xs):  # one layer, last to first: recompute it from its saved input, then its VJP
            grad_x, sink = carry
            index, params, bits = xs
            _, vjp = jax.vjp(lambda params, x: apply(params, x, inputs), params, load(bits))
            grad_params, grad_x = vjp(grad_x)
            if sink is None:  # the layer gradients come out stacked, as the scan's outputs
                return (grad_x, None), grad_params
            sink = jax.tree.map(lambda acc, g: jax.lax.dynamic_update_index_in_dim(
                acc, jax.lax.dynamic_index_in_dim(acc, index, 0, keepdims=False) + g, index, 0), sink, grad_params)
            return (grad_x, sink), None

        indices = jnp.arange(config.num_hidden_layers, dtype=jnp.int32)
        (grad_x, sink), grads = jax.lax.scan(step, (grad_y, sink), (indices, layer_params, bits), reverse=True,
                                             unroll=unroll)
        if sink is None:
            return grads, None, grad_x, None
        return None, sink, grad_x, None

    stack.defvjp(stack_fwd, stack_bwd)
    return stack(layer_params, grad_sink, x, inputs)


class Qwen3(nn.Module):
    config: ModelConfig

    def setup(self):
        c = self.config
        layer = DecoderLayer
        policy = remat_policy(c.remat_policy)
        if c.remat_policy != "none":
            layer = nn.remat(layer, policy=policy, prevent_cse=False)
        broadcast = nn.broadcast
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(broadcast, broadcast, broadcast, broadcast, broadcast, broadcast, 0),
            length=c.num_hidden_layers,
            unroll=1 if c.scan_layers else c.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, name="layers")
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(c.initializer_range), ("vocab", "embed")
            ),
            param_dtype=dtype_of(c.param_dtype),
            dtype=dtype_of(c.compute_dtype),
            name="embed_tokens",
        )
        self.norm = _norm(c, "embed", "norm")
        if not c.tie_word_embeddings:
            self.lm_head = Proj("BTD,DV->BTV", (c.hidden_size, c.vocab_size), ("embed", "vocab"),
                                c.param_dtype, c.compute_dtype, c.initializer_range, "float32")

    def __call__(self, tokens, positions, segment_ids, cache: KVCache | None = None,
                 return_hidden: bool = False, grad_sink: Params | None = None):
        """Runs the decoder.

        Args:
          tokens, positions, segment_ids: [B, T] int. Segment 0 marks padding; several sequences in a
            row are told apart by their segment ids, and positions restart for each.
          cache: when given, the T new keys/values are written at `cache.index` and the queries attend
            the whole cache; the returned cache has `index + T`.
          return_hidden: return the final-normed hidden states [B, T, D] instead of logits
            (the chunked log-prob pass applies the head itself, see `output_kernel`).
        Returns: (logits [B, T, V] fp32 or hidden [B, T, D], cache or None).
        """
        T = tokens.shape[1]
        x = self.embed_tokens(tokens)  # [B, T, D]
        x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))
        if cache is None:
            q_index = jnp.arange(T, dtype=jnp.int32)
            kv_segment, kv_index, cache_index, cache_kv = segment_ids, q_index, jnp.zeros((), jnp.int32), None
        else:
            cache_index = cache.index
            if cache_index.ndim == 0:
                kv_segment = jax.lax.dynamic_update_slice_in_dim(
                    cache.segment_ids, segment_ids.astype(jnp.int32), cache_index, 1
                )  # [B, S]
                q_index = cache_index + jnp.arange(T, dtype=jnp.int32)  # [T]
            else:  # a slot per row (KVCache): one new token per row
                if T != 1:
                    raise ValueError(f"a per-row cache index takes one new token per row, got {T}")
                rows = jnp.arange(tokens.shape[0])
                kv_segment = cache.segment_ids.at[rows, cache_index].set(segment_ids[:, 0].astype(jnp.int32),
                                                                         mode="drop")  # [B, S]
                q_index = cache_index[:, None]  # [B, 1]
            kv_index = jnp.arange(cache.max_length, dtype=jnp.int32)
            cache_kv = (cache.k, cache.v)
        if grad_sink is not None and (cache is not None or self.config.remat_policy not in FULL_REMAT):
            raise ValueError(f"grad_sink needs the training forward (no cache) under remat_policy in {FULL_REMAT}, got "
                             f"remat_policy={self.config.remat_policy!r}, cache={cache is not None}")
        per_layer = None if self.is_initializing() else self.variables["params"]["layers"]
        if cache is not None and cache.per_layer and not isinstance(per_layer, tuple):
            raise ValueError("a per-layer KV cache (init_cache(per_layer=True)) needs per-layer params "
                             "(unstack_layers); these params are stacked")
        if isinstance(per_layer, tuple):  # `unstack_layers`: one tree per layer, applied in order
            layer = DecoderLayer(self.config, parent=None)  # unbound: applied to explicit params
            own = cache is not None and cache.per_layer
            layers_k, layers_v = (list(cache_kv[0]), list(cache_kv[1])) if own else (None, None)
            for index, layer_params in enumerate(per_layer):
                # A per-layer cache: the layer's own arrays, seen as a stack of one (a bitcast).
                carry = (x, (layers_k[index][None], layers_v[index][None])) if own else (x, cache_kv)
                (x, carried), _ = layer.apply({"params": layer_params}, carry, positions, segment_ids, kv_segment,
                                              q_index, kv_index, cache_index, jnp.int32(0 if own else index))
                if own:
                    layers_k[index], layers_v[index] = carried[0][0], carried[1][0]
                else:
                    cache_kv = carried
            if own:
                cache_kv = (tuple(layers_k), tuple(layers_v))
        elif cache is None and self.config.remat_policy in FULL_REMAT and not self.is_initializing():
            x = full_remat_layers(self.config, self.variables["params"]["layers"], x,
                                  (positions, segment_ids, kv_segment, q_index, kv_index), grad_sink)
        else:
            layer_index = jnp.arange(self.config.num_hidden_layers, dtype=jnp.int32)
            (x, cache_kv), _ = self.layers(
                (x, cache_kv), positions, segment_ids, kv_segment, q_index, kv_index, cache_index, layer_index
            )
        x = self.norm(x)
        if cache is not None:
            cache = KVCache(k=cache_kv[0], v=cache_kv[1], segment_ids=kv_segment, index=cache_index + T)
        if return_hidden:
            return x, cache
        return self.project(x), cache

    def project(self, hidden):
        """LM head: [B, T, D] → fp32 logits [B, T, V] (tied: the embedding matrix transposed)."""
        if self.config.tie_word_embeddings:
            compute = dtype_of(self.config.compute_dtype)
            kernel = cast_sharded(self.embed_tokens.embedding, compute, ("vocab", "embed")).T  # [D, V]
            logits = jnp.einsum("BTD,DV->BTV", hidden.astype(compute), kernel, preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(hidden)  # [B, T, V] fp32
        return nn.with_logical_constraint(logits, ("batch", "seq", "vocab"))


# ---------------------------------------------------------------------------------------------------
# Functional API: params in, arrays out.


def _dummy_inputs(batch: int = 1, length: int = 1):
    tokens = jnp.zeros((batch, length), jnp.int32)
    return tokens, tokens, jnp.ones_like(tokens)


def _init_model(config: ModelConfig) -> Qwen3:
    """The model to init params with: the parameters do not depend on the attention implementation, so
    the one-token init traces the reference one, which runs on any backend (a plan for described GPUs
    runs this on a CPU-only machine)."""
    return Qwen3(config.replace(attention="reference"))


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Random params (HF's init: normal(initializer_range), norms at one), logical boxes removed."""
    return nn.unbox(_init_model(config).init(rng, *_dummy_inputs())["params"])


def _boxed_abstract(config: ModelConfig):
    return jax.eval_shape(lambda: _init_model(config).init(jax.random.key(0), *_dummy_inputs())["params"])


def abstract_params(config: ModelConfig) -> Params:
    """ShapeDtypeStructs of every parameter; nothing is allocated."""
    return nn.unbox(_boxed_abstract(config))


def logical_axes(config: ModelConfig) -> Params:
    """PartitionSpecs of logical axis names, one per parameter (mapped to the mesh in parallel/mesh.py)."""
    return nn.get_partition_spec(_boxed_abstract(config))


def unstack_layers(config: ModelConfig, tree: Any) -> Any:
    """The sampler's layout of a params-shaped tree (arrays, ShapeDtypeStructs or NamedShardings) where
    it holds its weights per layer (`rollout.jax_sampler.holds_per_layer_weights`): the stacked `layers`
    become a tuple of one tree per layer, which `forward` applies in order, whatever `scan_layers` says
    (that flag is for the training step's compile). A decode step that slices its
    layers out of the stack copies every layer's weights at every step: XLA:CPU in a fusion, XLA:GPU as
    a device-to-device memcpy per weight, i.e. the step moves its weights three times instead of once
    (BENCHMARKS.md, "Per-layer weights" and session 15). Unrolled, Qwen3-4B's 36 layers compile the
    burst in 6 s instead of 1.6 s (XLA:GPU, one described H100)."""

    def layer(leaf, index):
        if isinstance(leaf, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(leaf.mesh, jax.sharding.PartitionSpec(*leaf.spec[1:]))
        if isinstance(leaf, jax.ShapeDtypeStruct):
            sharding = layer(leaf.sharding, index) if isinstance(leaf.sharding, jax.sharding.NamedSharding) else None
            return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
        return leaf[index]

    per_layer = tuple(jax.tree.map(functools.partial(layer, index=i), tree["layers"])
                      for i in range(config.num_hidden_layers))
    return {**tree, "layers": per_layer}


def forward(config: ModelConfig, params: Params, tokens, positions, segment_ids,
            cache: KVCache | None = None, return_hidden: bool = False, grad_sink: Params | None = None):
    """`Qwen3(config).apply` on plain params; see `Qwen3.__call__` (`grad_sink`: full_remat_layers)."""
    return Qwen3(config).apply({"params": params}, tokens, positions, segment_ids, cache, return_hidden, grad_sink)


def output_kernel(config: ModelConfig, params: Params) -> jax.Array:
    """The LM head as a [D, V] matrix in the compute dtype (tied: the embedding transposed), cast on
    its shards before any gather."""
    compute = dtype_of(config.compute_dtype)
    if config.tie_word_embeddings:
        return cast_sharded(params["embed_tokens"]["embedding"], compute, ("vocab", "embed")).T
    return cast_sharded(params["lm_head"]["kernel"], compute, ("embed", "vocab"))


def logits(config: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """fp32 logits [B, T, V] of unpadded tokens [B, T] with default positions 0..T-1."""
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    out, _ = forward(config, params, tokens, positions, jnp.ones_like(tokens))
    return out


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 at each segment start of a row; padding (segment 0) gets 0.

    E.g. segment ids [0 0 1 1 1 2 2] (left padding, then two packed sequences) → [0 0 0 1 2 0 1].
    """
    segment_ids = jnp.asarray(segment_ids)
    T = segment_ids.shape[-1]
    index = jnp.arange(T)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1
    )
    start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)
    return jnp.where(segment_ids != 0, index - start_index, 0).astype(jnp.int32)


def count_params(tree: Params) -> int:
    return sum(int(functools.reduce(lambda a, b: a * b, leaf.shape, 1)) for leaf in jax.tree.leaves(tree))
