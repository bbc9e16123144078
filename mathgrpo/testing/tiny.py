"""Tiny random Qwen3 models in Hugging Face format, for parity tests, the demo and benchmarks.

No hub is reachable from our machines, so references are built locally: a `transformers`
`Qwen3ForCausalLM` with random weights. Norm weights are randomized too (HF initializes them to
one), so a port that ignores a norm weight cannot pass. torch and transformers are imported lazily.
"""

from __future__ import annotations

import os
from typing import Any

TINY_DEFAULTS: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=10_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)


def make_tiny_qwen3(path: str | os.PathLike | None = None, *, seed: int = 0, dtype: str = "float32",
                    max_shard_size: str | int | None = None, **overrides):
    """Builds a random `Qwen3ForCausalLM` (fp32 or bf16) and, when `path` is given, saves it there.

    Returns the torch model (in eval mode).
    """
    import torch
    import transformers

    values = {**TINY_DEFAULTS, **overrides}
    config = transformers.Qwen3Config(**values, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
    model = model.to(getattr(torch, dtype)).eval()
    if path is not None:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
        model.save_pretrained(os.fspath(path), **kwargs)
    return model
