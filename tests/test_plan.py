"""`plan`: ahead-of-time compiles of the 4B recipe on 8 (fake) devices; nothing allocated."""

import json
import os
import subprocess
import sys

import pytest

from mathgrpo import plan
from mathgrpo.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "qwen3_4b_base_grpo.yaml")
GIB = 2**30


@pytest.mark.slow
def test_plan_cli_on_the_recipe():
    result = subprocess.run([sys.executable, "-m", "mathgrpo", "plan", "--config", RECIPE], cwd=ROOT,
                            capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8 and report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert report["params"] == 4_022_468_096
    # fp32 params sharded 8 ways: 4,022,468,096 · 4 B / 8 ≈ 1.87 GiB; Adam moments twice that.
    assert abs(report["param_bytes_per_device"] - 4_022_468_096 * 4 / 8) < 0.01 * GIB
    assert abs(report["optimizer_bytes_per_device"] - 2 * 4_022_468_096 * 4 / 8) < 0.01 * GIB
    assert report["per_device_peak_bytes"] == report["train_step"]["peak_bytes"]
    assert report["per_device_peak_bytes"] > report["param_bytes_per_device"] + report["optimizer_bytes_per_device"]
    assert report["fits"] is True
    assert "train_step" in result.stdout and "fits: True" in result.stdout


@pytest.mark.slow
def test_naive_step_is_far_over_and_memory_work_pays():
    """The naive step (O(T²) reference attention, no remat, full-length fp32 logits) is over 50 GiB;
    the configured one is an order of magnitude below it."""
    config = load_config(RECIPE, ["grpo.micro_batch_tokens=16384"])
    naive = plan.plan(plan.inputs_from_config(config, naive=True), plan.plan_devices(config.mesh))
    planned = plan.plan(plan.inputs_from_config(config), plan.plan_devices(config.mesh))
    assert naive["per_device_peak_bytes"] > 50 * GIB
    assert planned["per_device_peak_bytes"] * 10 < naive["per_device_peak_bytes"]


def test_devices_this_process_runs_on_are_not_described():
    import jax

    assert not plan.is_described(jax.devices()[0])
    assert not plan.is_described(jax.devices("cpu")[-1])
