"""`make demo` until the GRPO trainer lands: the model and checkpoint path end to end on a tiny model.

1. Builds a tiny random Qwen3 with `transformers` and saves it (sharded bf16 safetensors) to runs/demo/hf.
2. Runs `python -m mathgrpo parity` on it, fp32 and bf16 (PyTorch vs mathgrpo on a batch with a
   left-padded row), which exits non-zero over tolerance.
3. Converts HF → Orbax → HF and checks the export loads in `transformers` with identical logits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "runs", "demo")


def cli(*args: str) -> None:
    print("$ python -m mathgrpo " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "mathgrpo", *args], check=True, cwd=ROOT)


def main() -> int:
    import torch
    import transformers

    from mathgrpo.tiny import make_tiny_qwen3

    shutil.rmtree(RUN, ignore_errors=True)
    hf_dir, ckpt, export = (os.path.join(RUN, name) for name in ("hf", "orbax", "hf_export"))
    make_tiny_qwen3(hf_dir, dtype="bfloat16", max_shard_size="100KB", num_hidden_layers=3,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=24, rope_theta=500_000.0)
    print(f"tiny random Qwen3 written to {hf_dir}: {sorted(os.listdir(hf_dir))}")
    cli("parity", "--hf-dir", hf_dir, "--dtype", "float32", "--batch", "3", "--seq", "32")
    cli("parity", "--hf-dir", hf_dir, "--dtype", "bfloat16", "--batch", "3", "--seq", "32")
    cli("convert", "hf-to-orbax", "--hf-dir", hf_dir, "--out", ckpt)
    cli("convert", "orbax-to-hf", "--ckpt", ckpt, "--out", export, "--max-shard-size", "100KB")
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    original, exported = (transformers.AutoModelForCausalLM.from_pretrained(d).eval() for d in (hf_dir, export))
    with torch.no_grad():
        same = torch.equal(original(tokens).logits, exported(tokens).logits)
    before, after = original.state_dict(), exported.state_dict()
    tensors_equal = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    print(f"HF → Orbax → HF: tensors bitwise equal: {tensors_equal}; transformers logits identical: {same}")
    return 0 if same and tensors_equal else 1


if __name__ == "__main__":
    sys.exit(main())
