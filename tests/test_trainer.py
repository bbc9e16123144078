"""The GRPO trainer end to end on a tiny model: metrics, checkpoints, HF export, exact resume after
SIGKILL (mid-step, mid-save, at a random time), and a disk that fills during a save."""

import errno
import functools
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from mathgrpo.config import load_config
from mathgrpo.testing import demo_task
from mathgrpo.train import loop
from mathgrpo.weights import orbax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo_cpu.yaml")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    directory = tmp_path_factory.mktemp("task")
    paths = demo_task.build_task(directory, operand_limit=6, held_out=8)
    demo_task.build_model(directory / "model", paths["tokenizer"], hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1)
    return paths, str(directory / "model")


def overrides(task, output_dir, steps=6):
    paths, model = task
    # entropy_coeff > 0: a random policy earns no reward, so without it every advantage is 0 and the
    # params would not move — the resume test would compare constants.
    return [f"model.path={model}", f"data.train_files=[{paths['train']}]", f"data.val_files=[{paths['val']}]",
            "data.train_batch_size=4", "rollout.n=4", "rollout.val_n=2",
            "grpo.entropy_coeff=0.05", "optim.lr=1e-2", f"trainer.total_steps={steps}", "trainer.save_freq=2",
            "trainer.test_freq=3", "trainer.val_before_train=false", f"trainer.output_dir={output_dir}"]


def run_cli(args, env_extra=None, kill_after=None, compile_cache=None):
    """`python -m mathgrpo train` in a subprocess; with `compile_cache` (a directory) JAX's persistent
    compilation cache is shared by the runs, so the runs after the first skip XLA compilation (the
    same programs, so the same executables: results are unchanged)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if compile_cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(compile_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.update(env_extra or {})
    process = subprocess.Popen([sys.executable, "-m", "mathgrpo", "train", "--config", DEMO, *args], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if kill_after is not None:
        time.sleep(kill_after)
        process.send_signal(signal.SIGKILL)
    output, _ = process.communicate(timeout=600)
    return process.returncode, output


def final_params(output_dir):
    return load_file(os.path.join(output_dir, "hf", "model.safetensors"))


def test_a_short_run_logs_checkpoints_and_exports(task, tmp_path):
    output = tmp_path / "run"
    config = load_config(DEMO, overrides(task, output, steps=3))
    metrics = loop.train(config)
    for key in ("critic/score/mean", "actor/pg_loss", "actor/grad_norm", "actor/entropy", "response_length/mean",
                "response_length/clip_ratio", "timing_s/gen", "timing_s/update_actor", "perf/throughput",
                "perf/mfu/actor", "rollout_corr/rollout_is_mean", "val-core/arith/acc/mean@2"):
        assert key in metrics, key
    rows = [json.loads(line) for line in open(output / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert orbax.TrainCheckpointer(output / "checkpoints").all_steps() == [2, 3]
    assert (output / "hf" / "config.json").exists() and (output / "hf" / "tokenizer.json").exists()
    assert (output / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(output / "tensorboard"))
    assert (output / "validation" / "step_000003.jsonl").exists()
    # The fused on-policy step: ratio ≡ 1, so nothing is clipped and π_old equals the rollout's log-probs
    # up to numerics (same weights, same temperature).
    assert rows[-1]["actor/pg_clipfrac"] == 0.0 and rows[-1]["actor/ppo_kl"] == 0.0
    assert abs(rows[-1]["rollout_corr/kl"]) < 1e-5


@pytest.mark.slow
def test_exact_resume_after_sigkill(task, tmp_path):
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    run = functools.partial(run_cli, compile_cache=tmp_path / "jax-cache")
    code, log = run(overrides(task, reference_dir))
    assert code == 0, log[-3000:]
    reference = final_params(reference_dir)

    args = overrides(task, resumed_dir)
    code, log = run(args, {loop.KILL_AT_ENV: "step:3"})  # mid-step 3
    assert code == -signal.SIGKILL, log[-2000:]
    # Step 2's save is async: the kill leaves it committed, or (still in flight) nothing at all.
    committed = orbax.TrainCheckpointer(resumed_dir / "checkpoints").all_steps()
    assert committed in ([], [2]), committed
    code, log = run(args, {loop.KILL_AT_ENV: "save:4"})  # right after step 4's async save began
    assert code == -signal.SIGKILL, log[-2000:]
    if committed:  # the next run resumes from the last committed checkpoint, never from a partial one
        assert "resumed from" in log and "(step 2)" in log
    else:
        assert "resumed from" not in log
    code, log = run(args, kill_after=random.Random(0).uniform(4.0, 9.0))  # at a random point
    code, log = run(args)
    assert code == 0, log[-3000:]
    resumed = final_params(resumed_dir)
    assert sorted(resumed) == sorted(reference)
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)


def test_disk_full_during_save_keeps_the_last_good_checkpoint(task, tmp_path, monkeypatch):
    output = tmp_path / "run"
    config = load_config(DEMO, overrides(task, output, steps=3) + ["trainer.save_freq=1"])
    real_save = orbax.TrainCheckpointer.save

    def failing_save(self, step, state, extra):
        if step == 2:  # half a directory on disk, then the disk is full
            partial = os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp-1")
            os.makedirs(partial, exist_ok=True)
            open(os.path.join(partial, "partial"), "wb").write(b"\0" * 1024)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, state, extra)

    monkeypatch.setattr(orbax.TrainCheckpointer, "save", failing_save)
    with pytest.raises(loop.CheckpointError,
                       match=r"step 2 .* No space left on device.*last complete checkpoint is step 1"):
        loop.train(config)
    monkeypatch.setattr(orbax.TrainCheckpointer, "save", real_save)
    assert orbax.TrainCheckpointer(output / "checkpoints").latest_step() == 1
    metrics = loop.train(config)  # resumes from step 1 and finishes
    assert metrics["training/global_step"] == 3


def test_resume_into_a_different_model_is_refused(task, tmp_path):
    output = tmp_path / "run"
    loop.train(load_config(DEMO, overrides(task, output, steps=2)))
    paths, _ = task
    other = tmp_path / "other_model"
    demo_task.build_model(other, paths["tokenizer"], hidden_size=48, intermediate_size=64, num_hidden_layers=1)
    config = load_config(DEMO, overrides(task, output, steps=3) + [f"model.path={other}"])
    with pytest.raises(loop.CheckpointError, match="does not match the model"):
        loop.train(config)


@pytest.mark.parametrize("engine", ["jax", "vllm"])
def test_three_steps_checkpoint_and_resume_with_either_engine(task, tmp_path, monkeypatch, capsys, engine):
    """`rollout.engine=vllm` runs on vLLM's CPU build: 3 steps, a checkpoint, a resume. Its rollout_corr/kl
    (trainer vs rollout log-probs of the same tokens, fp32) proves each step samples from the weights just
    trained; the JAX sampler is the control."""
    if engine == "vllm":
        pytest.importorskip("vllm")
        from mathgrpo.config import RolloutConfig
        from mathgrpo.rollout import vllm_engine

        for name, value in vllm_engine.environment_for(RolloutConfig()).items():
            monkeypatch.setenv(name, value)  # the trainer sets them; restored after the test
    paths, _ = task
    model = tmp_path / "model"  # head_dim 32: the smallest vLLM's CPU attention supports
    demo_task.build_model(model, paths["tokenizer"], hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    output = tmp_path / "run"
    args = overrides(task, output, steps=3) + [f"model.path={model}", f"rollout.engine={engine}",
                                                "rollout.enforce_eager=true", "rollout.max_num_seqs=32"]
    loop.train(load_config(DEMO, args))
    assert orbax.TrainCheckpointer(output / "checkpoints").all_steps() == [2, 3]
    capsys.readouterr()
    metrics = loop.train(load_config(DEMO, overrides(task, output, steps=4) + args[-4:]))
    assert "resumed from" in capsys.readouterr().out
    assert metrics["training/global_step"] == 4
    rows = [json.loads(line) for line in open(output / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert abs(row["rollout_corr/kl"]) <= 1e-4, row["step"]
        assert row["response_length/mean"] > 0 and np.isfinite(row["actor/pg_loss"])
    assert "val-core/arith/acc/mean@2" in rows[2]
