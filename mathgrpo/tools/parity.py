"""`python -m mathgrpo parity`: the same random batch through PyTorch `transformers` and mathgrpo.

The batch has one left-padded row (padding carries attention_mask 0, and positions restart at the
first real token, as verl computes them), so padding handling is checked along with the math.
Figures are over real (non-pad) positions and the full vocabulary:
- `max_abs_logit_diff`, `max_abs_logprob_diff`: max |Δ| of logits and of log-softmax;
- `mean_kl`: mean over tokens of KL(PyTorch ‖ mathgrpo);
- `greedy_next_token_agreement`: fraction of positions whose argmax agrees.
The command exits non-zero when a figure is over the tolerance for the dtype (`TOLERANCES`).
"""

from __future__ import annotations

import json
import os

import numpy as np

# fp32: both sides compute the same math in fp32; bf16: different rounding orders, so only the
# distributions are compared (mean KL), with the bound the acceptance criteria name.
TOLERANCES = {
    "float32": {"max_abs_logprob_diff": 1e-4, "mean_kl": 1e-6},
    "bfloat16": {"mean_kl": 1e-3},
}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare_logits(reference: np.ndarray, ours: np.ndarray, valid: np.ndarray) -> dict:
    """Parity figures of two [B, T, V] logit arrays over the positions where `valid` [B, T] is true."""
    reference, ours = reference[valid], ours[valid]  # [n, V]
    log_p, log_q = _log_softmax(reference), _log_softmax(ours)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return {
        "max_abs_logit_diff": float(np.abs(reference - ours).max()),
        "max_abs_logprob_diff": float(np.abs(log_p - log_q).max()),
        "mean_kl": float(kl.mean()),
        "greedy_next_token_agreement": float((reference.argmax(-1) == ours.argmax(-1)).mean()),
        "tokens_compared": int(valid.sum()),
    }


def random_batch(vocab_size: int, batch: int, seq: int, seed: int, pad_id: int = 0):
    """Random tokens [B, T] and an attention mask with row 0 left-padded by a quarter of T."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), np.int64)
    pad = seq // 4
    mask[0, :pad] = 0
    tokens[0, :pad] = pad_id
    return tokens, mask


def run_parity(hf_dir: str | os.PathLike, dtype: str = "float32", batch: int = 2, seq: int = 16,
               seed: int = 0, attention: str = "reference") -> dict:
    import jax.numpy as jnp
    import torch
    import transformers

    from mathgrpo.model import forward, positions_from_segments
    from mathgrpo.weights import hf

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.fspath(hf_dir), dtype=getattr(torch, dtype), attn_implementation="eager"
    ).eval()
    config, params = hf.load(hf_dir, dtype="float32", compute_dtype=dtype, attention=attention)
    tokens, mask = random_batch(config.vocab_size, batch, seq, seed)
    positions = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)  # verl's position_ids for left padding
    with torch.no_grad():
        reference = torch_model(
            input_ids=torch.from_numpy(tokens),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
        ).logits.float().numpy()
    segment_ids = jnp.asarray(mask, jnp.int32)
    ours, _ = forward(config, params, jnp.asarray(tokens, jnp.int32),
                      positions_from_segments(segment_ids), segment_ids)
    result = compare_logits(reference, np.asarray(ours), mask.astype(bool))
    result.update(dtype=dtype, batch=batch, seq=seq, attention=attention)
    limits = TOLERANCES[dtype]
    result["tolerances"] = limits
    result["ok"] = all(result[name] <= limit for name, limit in limits.items())
    return result


def format_table(result: dict) -> str:
    rows = [("figure", "value", "tolerance")]
    for name in ("max_abs_logit_diff", "max_abs_logprob_diff", "mean_kl", "greedy_next_token_agreement"):
        limit = result["tolerances"].get(name)
        rows.append((name, f"{result[name]:.3e}", f"<= {limit:.0e}" if limit is not None else "-"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [
        f"parity vs transformers: dtype={result['dtype']} batch={result['batch']} seq={result['seq']} "
        f"attention={result['attention']} ({result['tokens_compared']} real tokens, row 0 left-padded)"
    ]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, width)) for row in rows]
    lines.append("PASS" if result["ok"] else "FAIL: a figure is over its tolerance")
    return "\n".join(lines)


def main(args) -> int:
    result = run_parity(args.hf_dir, args.dtype, args.batch, args.seq, args.seed, args.attention)
    print(format_table(result))
    print(json.dumps(result))
    return 0 if result["ok"] else 1
