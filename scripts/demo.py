"""`make demo`: the main job on the embedded default — GRPO that visibly learns, on a laptop CPU.

1. Builds the task (mathgrpo/testing/demo_task.py): "problem 417: 3+8=?" in verl's parquet schema (1,024
   training prompts, 64 held-out ones), a character-level HF tokenizer with a chat template, and a
   randomly initialized tiny Qwen3 (2 layers, width 128, 4 heads of 32).
2. Warm start: `python -m mathgrpo sft` imitates demonstrations "3+8=\\boxed{11}", half of them off
   by one — a weak base policy that writes `\\boxed{}` and is right about 40% of the time.
3. GRPO: `python -m mathgrpo train --config configs/demo_cpu.yaml` — the same trainer, JAX rollout,
   `math_reward`, train step, Orbax checkpoints and metrics as the 4B recipe. Validation runs before
   training and every 10 steps on the held-out pairs.
4. Prints held-out accuracy before and after and where everything is: runs/demo/grpo holds
   metrics.jsonl, TensorBoard events, curves.png, validation generations, Orbax checkpoints and the
   HF export of the final policy.
Exits non-zero if held-out accuracy did not rise. On the 2-core development machine: 0.316 → 0.738
in about 2 minutes (the run is deterministic on a given CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "runs", "demo")
CONFIG = os.path.join(ROOT, "configs", "demo_cpu.yaml")
ACCURACY = "val-core/arith/acc/mean@4"


def cli(*args: str) -> None:
    print("\n$ python -m mathgrpo " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "mathgrpo", *args], check=True, cwd=ROOT)


def main() -> int:
    from mathgrpo.testing import demo_task

    start = time.time()
    shutil.rmtree(RUN, ignore_errors=True)
    paths = demo_task.build_task(os.path.join(RUN, "task"))
    demo_task.build_model(os.path.join(RUN, "init"), paths["tokenizer"])
    print(f"task and tiny random Qwen3 written under {RUN}")
    cli("sft", "--config", CONFIG, "--data", paths["sft"], "--steps", "200", "--batch-size", "32", "--lr", "3e-3",
        "--out", os.path.join(RUN, "sft"), "model.path=" + os.path.join(RUN, "init"))
    cli("train", "--config", CONFIG)

    run_dir = os.path.join(RUN, "grpo")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    validations = [(row["step"], row[ACCURACY]) for row in rows if row.get(ACCURACY) is not None]
    scores = [(row["step"], row["critic/score/mean"]) for row in rows if row.get("critic/score/mean") is not None]
    before, after = validations[0][1], validations[-1][1]
    print("\nheld-out accuracy (mean@4, T=1.0):", "  ".join(f"step {s}: {a:.3f}" for s, a in validations))
    first, last = scores[:5], scores[-5:]
    print(f"critic/score/mean: first steps {sum(v for _, v in first) / len(first):.3f} → "
          f"last steps {sum(v for _, v in last) / len(last):.3f}")
    print(f"before GRPO {before:.3f} → after {after:.3f} ({after - before:+.3f}) in {time.time() - start:.0f} s"
          f" — {'meets' if after - before >= 0.30 else 'MISSES'} the demo's +0.30 target")
    print(f"run directory: {run_dir}: {sorted(os.listdir(run_dir))}")
    return 0 if after > before else 1


if __name__ == "__main__":
    sys.exit(main())
